"""Peak memory vs slide size: analyse generated slides whose tissue area differs by 16x, each in a fresh process.

Peak RSS of each child process (``ru_maxrss``) is reported; if the pipeline never holds a whole slide, the
larger slide's peak stays close to the smaller one's (the difference being per-tile arrays and results).

Usage: python benchmarks/memory_scaling.py [--sizes 2048 8192] [--model demo]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hepatoquant.synthetic import SyntheticSlideSpec, write_synthetic_slide

_CHILD = """
import resource, sys, json
from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.pack_lookup import resolve_model_pack
from hepatoquant.outputs import write_outputs
result = analyze_slide(sys.argv[1], resolve_model_pack(sys.argv[2]), AnalysisOptions())
write_outputs(result, sys.argv[3])
print(json.dumps({"tiles": len(result.grid), "tissue_mm2": result.tissue.area_um2() / 1e6,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="slide sides in px (0.5 um/px)")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()
    import json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            slide = write_synthetic_slide(Path(tmp) / f"slide-{size}.tiff", SyntheticSlideSpec(width_px=size, height_px=size))
            started = time.perf_counter()
            output = subprocess.run(
                [sys.executable, "-c", _CHILD, str(slide), args.model, str(Path(tmp) / f"out-{size}")],
                check=True, capture_output=True, text=True,
            ).stdout
            stats = json.loads(output.strip().splitlines()[-1])
            stats.update(size=size, seconds=time.perf_counter() - started, file_mib=slide.stat().st_size / 2**20)
            rows.append(stats)
            slide.unlink()
    print(f"{'slide px':>12} {'file MiB':>9} {'tissue mm^2':>12} {'tiles':>7} {'seconds':>8} {'peak RSS MiB':>13}")
    for row in rows:
        print(f"{row['size']:>6} x {row['size']:<5} {row['file_mib']:>9.1f} {row['tissue_mm2']:>12.2f} {row['tiles']:>7} "
              f"{row['seconds']:>8.1f} {row['peak_rss_mib']:>13.1f}")
    first, last = rows[0], rows[-1]
    print(f"tissue area ratio {last['tissue_mm2'] / first['tissue_mm2']:.1f}x, "
          f"peak RSS ratio {last['peak_rss_mib'] / first['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
