"""Issue 20: `benchmarks/gpu_e2e.py` runs on a CPU as a small smoke test, so that a session lent a GPU can run it
in one call: mosaic slide, random-weight pack, bare encoder, `analyze` with and without a segmenter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_small_on_a_cpu(cmu_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_e2e.py"), "--smoke", "--device", "cpu",
                          "--source", str(cmu_slide), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["slide_px"] == [4440, 2967] and results["bare_tiles_per_s"] > 0
    for label in ("with_segmenter", "classifier_only", "classifier_only_processes"):
        timings = results[label]["timings_s"]
        assert results[label]["tiles"] > 100 and 0 < results[label]["efficiency_vs_bare"] <= 1.5
        stages = sum(v for k, v in timings.items() if k not in ("overlapped", "total"))
        assert abs(stages - timings.get("overlapped", 0.0) - timings["total"]) < 0.01  # they add up
        assert timings["total"] <= results[label]["wall_s"] + 0.02
    assert "segmentation" in results["with_segmenter"]["timings_s"]
    assert "segmentation" not in results["classifier_only"]["timings_s"]
    # On a CPU auto reads with threads; the third run reads with processes (on a GPU: the other way round).
    assert [results[label]["readers"] for label in ("classifier_only", "classifier_only_processes")] == \
        ["threads", "processes"]
    assert results["classifier_only"]["tiles"] == results["classifier_only_processes"]["tiles"]
    assert results["gpu_utilisation"] == "no GPU" and "classifier_only (threads): wall" in run.stdout
