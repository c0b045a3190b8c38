"""Tissue detection QC: pen ink, folds, faint tissue. The detector before pen handling against today's.

On QC slides made by ``hepatoquant.qc_slides`` (real H&E pieces from ../shared/testdata, pale / dense+fold /
IHC-like / blurred, blue / green / red / black pen blobs and lines over glass and tissue, dust, a bubble), with
tiles made as ``analyze`` makes them (>= half tissue, centre inside the tissue outline), per detector:

- per-piece recall: area of the tiles whose centre lies in the piece (ink on it excluded) / the piece's area,
  and the same for a perfect mask at the detector's resolution (whole tiles: the lattice limit);
- tiles on pen (centre on ink) and on glass (centre on no piece); share of the ink inside the "pen" artefact;
- time: reading the overview, and detection on it (separately).

On CMU-1-Small-Region and the TCGA slide (at 0.5 um/px): tissue area and tiles, before vs after. Detection time
on a 40k x 40k px slide's overview (8 um/px: 2,500 x 2,500 px, tiled from the QC slide's overview; reading such
an overview is timed separately on the QC slides, per overview pixel).

The detector before is ``server/src/hepatoquant/tissue.py`` at ``--before-rev`` (read with ``git show``).

Usage: python benchmarks/tissue_qc.py [--big-cols 6 --big-rows 4] [--before-rev fbb76a8...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hepatoquant.geometry import pixel_edge_polygons
from hepatoquant.qc_slides import QCSlideSpec, score_detection, write_qc_slide
from hepatoquant.slide import Slide
from hepatoquant.tiling import build_tile_grid
import hepatoquant.tissue as after

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata" / "slides"
BEFORE_REV = "fbb76a87bd25d68a4edcbec79625cb1bbb925d55"


def load_before(rev: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:server/src/hepatoquant/tissue.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "tissue_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("tissue_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tissue_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def detect_timed(module, slide: Slide) -> tuple[object, float, float]:
    """The module's TissueMask, seconds to read the overview, seconds to detect on it (best of 3)."""
    params = module.TissueDetectionParams()
    started = time.perf_counter()
    slide.read_overview(max(params.spacing_um_px, slide.mpp_um_px))
    read_s = time.perf_counter() - started
    detect = []
    for _ in range(3):
        started = time.perf_counter()
        tissue = module.detect_tissue(slide, params)
        detect.append(time.perf_counter() - started - read_s)
    return tissue, read_s, max(min(detect), 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-cols", type=int, default=6)
    parser.add_argument("--big-rows", type=int, default=4)
    parser.add_argument("--before-rev", default=BEFORE_REV)
    args = parser.parse_args(argv)
    before = load_before(args.before_rev)
    results: dict = {"qc": {}, "real": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in (("qc-small (test set)", QCSlideSpec()),
                           ("qc-big", QCSlideSpec(cols=args.big_cols, rows=args.big_rows, seed=1))):
            path = Path(tmp) / "qc.tiff"
            truth = write_qc_slide(path, spec)
            row = {"size_px": [truth.width_px, truth.height_px], "pieces": len(truth.pieces)}
            with Slide(path) as slide:
                for label, module in (("before", before), ("after", after)):
                    tissue, read_s, detect_s = detect_timed(module, slide)
                    score = score_detection(truth, tissue).summary()
                    score.update(read_overview_s=round(read_s, 3), detect_s=round(detect_s, 3),
                                 overview_px=list(tissue.mask.shape))
                    row[label] = score
            results["qc"][name] = row
            overview = tissue.overview_rgb
        # 40k x 40k px at 0.5 um/px: a 2,500 x 2,500 px overview at 8 um/px
        reps = (-(-2500 // overview.shape[0]), -(-2500 // overview.shape[1]), 1)
        big = np.ascontiguousarray(np.tile(overview, reps)[:2500, :2500])
        masks, polygons = [], []
        for _ in range(3):
            started = time.perf_counter()
            mask, _, artefacts = after.tissue_and_artefacts_from_rgb(big, 8.0, after.TissueDetectionParams())
            masks.append(time.perf_counter() - started)
            pixel_edge_polygons(mask, 16.0)
            pixel_edge_polygons(artefacts["pen"], 16.0)
            polygons.append(time.perf_counter() - started - masks[-1])
        results["detect_40k_overview_s"] = {"masks": round(statistics.median(masks), 3),
                                            "polygons": round(statistics.median(polygons), 3)}

    for name, file, mpp in (("CMU-1-Small-Region", "CMU-1-Small-Region.svs", None),
                            ("TCGA-CR-7395 (0.5 um/px)", "TCGA-CR-7395-01A-01-TS1.svs", 0.5)):
        row = {}
        with Slide(TESTDATA / file, mpp_override_um_px=mpp) as slide:
            for label, module in (("before", before), ("after", after)):
                tissue, read_s, detect_s = detect_timed(module, slide)
                grid = build_tile_grid(slide.dimensions, slide.mpp_um_px, tissue, regions=tissue.polygons)
                pen = getattr(tissue, "artefact_masks", {}).get("pen")
                row[label] = {"tissue_mm2": round(tissue.area_um2() / 1e6, 4), "tiles": len(grid),
                              "threshold": tissue.saturation_threshold, "detect_s": round(detect_s, 3),
                              "pen_px": None if pen is None else int(pen.sum())}
        results["real"][name] = row
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
