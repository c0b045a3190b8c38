# The two commands of the README. Each sets everything up first (scripts/install.sh), so both work on a
# fresh clone.
SAMPLE_SLIDE ?= ../shared/testdata/slides/CMU-1-Small-Region.svs
OUT ?= demo-output
VENV := .venv

.PHONY: install demo test benchmark

install:
	bash scripts/install.sh

# The main job through the server: start it, submit a sample slide, stream progress, fetch and write the
# GeoJSON, report, CSV and overlay into $(OUT)/, stop it. Built-in demo models (untrained, made on first use).
# Without ../shared (the team's test data) a synthetic slide is generated instead.
demo: install
	@if [ -f "$(SAMPLE_SLIDE)" ]; then slide="$(SAMPLE_SLIDE)"; else \
		slide="$(OUT)/synthetic-sample.tiff"; mkdir -p $(OUT); \
		$(VENV)/bin/python -m hepatoquant.synthetic "$$slide"; fi; \
	$(VENV)/bin/hepatoquant demo "$$slide" --out $(OUT)

test:
	bash scripts/install.sh --test-tools
	$(VENV)/bin/python -m pytest tests

benchmark: install
	$(VENV)/bin/python benchmarks/pipeline_efficiency.py
	$(VENV)/bin/python benchmarks/memory_scaling.py
	$(VENV)/bin/python benchmarks/segmentation.py
	$(VENV)/bin/python benchmarks/server_overhead.py
	$(VENV)/bin/python benchmarks/geojson_dialect.py
	$(VENV)/bin/python benchmarks/hepatobench.py
	$(VENV)/bin/python benchmarks/cohort_throughput.py
	$(VENV)/bin/python benchmarks/capacity_model.py
	$(VENV)/bin/python benchmarks/precision.py
	$(VENV)/bin/python benchmarks/segmenter_backends.py
	$(VENV)/bin/python benchmarks/reader_gil.py
	$(VENV)/bin/python benchmarks/peer_wsinfer.py
	$(VENV)/bin/python benchmarks/tissue_qc.py
