"""Cost of the QuPath GeoJSON dialect layer: writing and parsing N tile features vs plain ``json``.

The input is what an analysis writes: N square tile detections made by ``hepatoquant_objects.tile_object``
(seven ``prob_*`` measurements, a class with its colour, the ``hepatoquant`` metadata marker), preceded by a
few region annotations (``region_object``, buffered-circle polygons of a few hundred vertices each).

Writing, measured on the same objects:
- ``dumps_feature_collection(objects)``: the whole FeatureCollection built in memory, then one ``json.dumps``;
- streamed: ``to_feature`` per object + ``json.dumps`` per feature written to a file, as
  ``server/src/hepatoquant/outputs/geojson.py`` (``write_qupath_geojson``) does;
- baselines: plain ``json.dumps`` of the same, already-built feature dictionaries (one call for the whole
  collection, and one call per feature to the same kind of file for the streamed form), with the same
  ``separators`` / ``ensure_ascii`` / ``allow_nan`` arguments. The ratio dialect / plain is the price of
  building the features (geojson's Feature and geometry objects with their validity checks, coordinates as
  they are (never rounded), uuid4 ids, checking measurements).
Parsing, measured on the text written by ``dumps_feature_collection``:
- ``parse_qupath_geojson(text)`` (JSON decode + QuPath's checks + shapely geometries + ``QuPathObject`` s);
- baseline: plain ``json.loads(text)``.

Seconds are the median of ``--repeats`` timed runs with tracemalloc off. Peak memory is measured in one
separate run under ``tracemalloc`` (which slows Python allocation, so it is never timed): the peak of Python
allocations above what was held before the call, including the returned value. GEOS allocates the shapely
geometries with C malloc, which tracemalloc does not see, so the parse peak undercounts them (shapely's Python
wrapper objects are counted). The objects to write (and, for the baselines, the built features) exist before
either measurement starts and are not counted.

Usage: python benchmarks/geojson_dialect.py [--features 100000] [--regions 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import Point

from hepatoquant_client.classes import REGION_CLASSES, TISSUE_CLASS_CODES
from hepatoquant_client.hepatoquant_objects import region_object, tile_object
from hepatoquant_client.qupath_geojson import (
    QuPathObject,
    dumps_feature_collection,
    parse_qupath_geojson,
    to_feature,
)

_TILE_PX = 448.0  # 224 px at 1 um/px read from a 0.5 um/px level 0: a typical tile side in level-0 pixels
_DUMPS = {"separators": (",", ":"), "ensure_ascii": False, "allow_nan": False}  # as dumps_feature_collection
_STREAM_DUMPS = {"separators": (",", ":"), "allow_nan": False}  # as write_qupath_geojson


def build_objects(n_tiles: int, n_regions: int, seed: int = 0) -> list[QuPathObject]:
    """Regions first, then tiles on a square grid, as ``qupath_objects`` yields them."""
    rng = np.random.default_rng(seed)
    side = max(1, int(np.ceil(np.sqrt(n_tiles))))
    extent = side * _TILE_PX
    objects: list[QuPathObject] = []
    for i in range(n_regions):
        centre = extent * (i + 1) / (n_regions + 1)
        geometry = Point(centre, centre).buffer(extent / (2 * n_regions + 2), quad_segs=64)  # 257 vertices
        cls = REGION_CLASSES[i % len(REGION_CLASSES)]
        percent = dict(zip(TISSUE_CLASS_CODES, rng.dirichlet(np.ones(len(TISSUE_CLASS_CODES))) * 100))
        objects.append(
            region_object(
                geometry, cls.code, f"{cls.display_name} {i + 1}",
                tile_count=n_tiles // max(1, n_regions), tile_area_mm2=0.05 * n_tiles / max(1, n_regions),
                region_area_mm2=geometry.area * 0.25e-6,
                class_tiles={code: int(p * 10) for code, p in percent.items()}, class_percent=percent,
                model_status="untrained-demo", segmenter_status="untrained-demo",
            )
        )
    probabilities = rng.dirichlet(np.ones(len(TISSUE_CLASS_CODES)), size=n_tiles)
    predicted = probabilities.argmax(axis=1)
    for i in range(n_tiles):
        row, col = divmod(i, side)
        objects.append(
            tile_object(
                col * _TILE_PX, row * _TILE_PX, _TILE_PX, TISSUE_CLASS_CODES[predicted[i]],
                dict(zip(TISSUE_CLASS_CODES, probabilities[i].tolist())), model_status="untrained-demo",
            )
        )
    return objects


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median and all run times in seconds (tracemalloc off); the result is dropped between runs."""
    runs = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - started)
        del result
    return statistics.median(runs), runs


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak traced Python memory above the starting level while ``fn`` runs and its result is held (MiB)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return (peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=100_000, help="number of tile features")
    parser.add_argument("--regions", type=int, default=3, help="number of region annotations before the tiles")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement; medians reported")
    args = parser.parse_args()

    started_all = time.perf_counter()
    started = time.perf_counter()
    objects = build_objects(args.features, args.regions)
    build_s = time.perf_counter() - started
    built = [to_feature(obj) for obj in objects]  # the baselines' input: the same features, already built

    with tempfile.TemporaryDirectory() as tmp:
        stream_path = Path(tmp) / "stream.geojson"

        def stream(features_of: Callable[[], Any]) -> int:
            """Write a FeatureCollection feature by feature, as write_qupath_geojson does; returns bytes written."""
            with stream_path.open("w") as handle:
                handle.write('{"type":"FeatureCollection","features":[')
                for index, feature in enumerate(features_of()):
                    if index:
                        handle.write(",")
                    handle.write(json.dumps(feature, **_STREAM_DUMPS))
                handle.write("]}\n")
            return stream_path.stat().st_size

        cases: dict[str, Callable[[], Any]] = {
            "dumps_feature_collection": lambda: dumps_feature_collection(objects),
            "json.dumps (built features)": lambda: json.dumps(
                {"type": "FeatureCollection", "features": built}, **_DUMPS
            ),
            "streamed to_feature + dumps": lambda: stream(lambda: (to_feature(o) for o in objects)),
            "streamed json.dumps (built)": lambda: stream(lambda: built),
        }
        text = dumps_feature_collection(objects)
        cases["parse_qupath_geojson"] = lambda: parse_qupath_geojson(text)
        cases["json.loads"] = lambda: json.loads(text)

        results = {}
        for name, fn in cases.items():
            median_s, runs = timed(fn, args.repeats)
            results[name] = (median_s, runs, peak_mib(fn))

    total = len(objects)
    print(f"objects: {total} ({args.features} tile detections with {len(TISSUE_CLASS_CODES)} prob_ measurements, "
          f"{args.regions} region annotations); built in {build_s:.2f} s")
    print(f"FeatureCollection text: {len(text.encode()) / 2**20:.1f} MiB; repeats {args.repeats} (medians)")
    print(f"{'':30s} {'seconds':>8s} {'us/feature':>11s} {'peak MiB':>9s}   runs")
    for name, (median_s, runs, peak) in results.items():
        print(f"{name:30s} {median_s:8.3f} {median_s / total * 1e6:11.1f} {peak:9.2f}   "
              f"{', '.join(f'{t:.3f}' for t in runs)}")

    def ratio(a: str, b: str) -> str:
        (ta, _, ma), (tb, _, mb) = results[a], results[b]
        return f"{a} / {b}: {ta / tb:.1f}x time, {ma / mb:.2f}x peak memory"

    print("ratios (dialect / plain json):")
    print("  " + ratio("dumps_feature_collection", "json.dumps (built features)"))
    print("  " + ratio("streamed to_feature + dumps", "streamed json.dumps (built)"))
    print("  " + ratio("parse_qupath_geojson", "json.loads"))
    print(f"total benchmark time: {time.perf_counter() - started_all:.1f} s")


if __name__ == "__main__":
    main()
