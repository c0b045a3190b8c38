"""The QuPath GeoJSON writer's fast path for tiles (issue 20): every tile Feature equal to what the general path
(``to_feature(tile_object(...))``, the dialect QuPath reads, checked with the kit elsewhere) makes of it, on a
real slide; bad numbers refused as the general path refuses them."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from hepatoquant_client.qupath_geojson import InvalidGeoJSONError, to_feature

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.outputs.geojson import _tile, _tile_features, write_qupath_geojson


@pytest.fixture(scope="module")
def result(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory):
    pack = ensure_demo_pack(tmp_path_factory.mktemp("models"), encoder="test_vit_micro")
    result = analyze_slide(cmu_slide, pack, AnalysisOptions(num_workers=1))
    # the untrained demo model calls every tile one class: spread them over all seven as a trained one would
    probabilities = np.random.default_rng(0).dirichlet(np.ones(len(result.classes)), len(result.grid))
    return dataclasses.replace(result, probabilities=probabilities.astype(np.float32))


def _without_id(feature: dict) -> dict:
    return {key: value for key, value in json.loads(json.dumps(feature)).items() if key != "id"}


@pytest.mark.parametrize("tile_px", [None, 150.3])  # whole-number corners (ints in JSON) and fractional ones
def test_every_tile_feature_equals_the_general_paths(result, tile_px) -> None:
    if tile_px is not None:  # a slide whose tile is not a whole number of level-0 pixels
        result = dataclasses.replace(result, grid=dataclasses.replace(result.grid, size_level0_px=tile_px))
    fast = list(_tile_features(result))
    general = [to_feature(_tile(result, i, result.predicted_class)) for i in range(len(result.grid))]
    assert len(fast) == len(general) > 50
    assert [_without_id(f) for f in fast] == [_without_id(g) for g in general]
    ids = [f["id"] for f in fast]
    assert len(set(ids)) == len(ids) and all(str(uuid.UUID(i)) == i for i in ids)
    assert len({int(c) for c in result.predicted_class}) == 7  # every class's template was used


def test_a_tile_with_a_number_json_cannot_hold_is_refused_naming_it(result, tmp_path: Path) -> None:
    probabilities = result.probabilities.copy()
    probabilities[7, 2] = np.nan
    broken = dataclasses.replace(result, probabilities=probabilities)
    with pytest.raises(InvalidGeoJSONError, match=r"tile 7: prob_\w+ is not finite"):
        write_qupath_geojson(broken, tmp_path / "broken.geojson")


def test_the_written_file_is_one_feature_collection_regions_first(result, tmp_path: Path) -> None:
    path = tmp_path / "slide.geojson"
    write_qupath_geojson(result, path)
    features = json.loads(path.read_text())["features"]
    kinds = [f["properties"]["metadata"]["hepatoquant"] for f in features]
    assert kinds == sorted(kinds, key=lambda kind: kind == "tile") and kinds.count("tile") == len(result.grid)
