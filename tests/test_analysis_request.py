"""``AnalysisRequest`` is the one schema of what an analysis can be asked (issue 18): every field reaches the
request from the command line, a cohort (CSV column or ``cohort run`` flag), the Python client, gRPC and the
HTTP gateway (the proto's JSON mapping), and :func:`resolve_options` is the only place defaults are applied;
values given, 0 included, are validated and never replaced. The QuPath scripts' side is tested in
tests/test_qupath_scripts.py (``test_script_settings_reach_every_request_field``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format

from hepatoquant.analysis_request import CLI_FLAGS, COHORT_SOURCES, AnalysisRequest, Runtime, resolve_options
from hepatoquant.cli import _analysis_request, _build_parser
from hepatoquant.cohort.inputs import read_cohort
from hepatoquant.cohort.runner import CohortSettings
from hepatoquant.errors import InvalidParameterError
from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.convert import request_from_json
from hepatoquant_client.client import ANALYSIS_OPTIONS

FIELDS = [field.name for field in AnalysisRequest.DESCRIPTOR.fields]
# A value for every field that differs from its default (so "reached" cannot mean "left at the default").
GIVEN = {
    "slide": "a.svs", "mpp_um_px": 0.25, "regions_geojson": "regions.geojson", "model": "demo",
    "segmenter_model": "demo-seg", "tile_size_px": 224, "tile_spacing_um_px": 1.0, "min_tissue_fraction": 0.3,
    "tumour_class_names": ["HCC", "Tumor"], "tile_object_type": "tile", "omit_tiles": True,
    "include_embeddings": True, "tissue_threshold": 20, "window_overlap": 0.5, "min_focus": 10.0,
    "keep_artefacts": True, "precision": "fp32", "embeddings_format": "h5",
}
FLAG_VALUES = {
    "--mpp": ["0.25"], "--regions": ["regions.geojson"], "--model": ["demo"], "--seg-model": ["demo-seg"],
    "--tile-size": ["224"], "--tile-spacing": ["1.0"], "--min-tissue-fraction": ["0.3"],
    "--tumour-classes": ["HCC,Tumor"], "--tile-object": ["tile"], "--omit-tiles": [], "--save-embeddings": [],
    "--tissue-threshold": ["20"], "--window-overlap": ["0.5"], "--min-focus": ["10"], "--keep-artefacts": [],
    "--precision": ["fp32"], "--embeddings-format": ["h5"],
}


def _reached(request: AnalysisRequest, name: str) -> bool:
    value = getattr(request, name)
    return list(value) == GIVEN[name] if name == "tumour_class_names" else value == GIVEN[name]


def test_every_field_has_a_home_at_every_entry_point() -> None:
    assert set(GIVEN) == set(FIELDS)
    assert set(CLI_FLAGS) == set(FIELDS) and set(COHORT_SOURCES) == set(FIELDS)
    assert set(ANALYSIS_OPTIONS) == set(FIELDS) - {"slide"}  # the Python client takes the rest as options


def test_every_field_is_reachable_from_the_command_line() -> None:
    argv = ["analyze", "a.svs"] + [item for flag, values in FLAG_VALUES.items() for item in (flag, *values)]
    args = _build_parser().parse_args(argv)
    request = _analysis_request(args)
    for name in FIELDS:
        if name == "regions_geojson":  # a file on the command line: resolved as regions_path, read once
            assert args.regions == Path(GIVEN[name])
            continue
        assert _reached(request, name), (name, CLI_FLAGS[name], request)


def test_every_field_is_reachable_from_a_cohort(tmp_path: Path) -> None:
    (tmp_path / "cohort.csv").write_text("slide,slide_id,mpp,regions\na.svs,a,0.25,regions.geojson\n")
    [item] = read_cohort(tmp_path / "cohort.csv")
    flags = [item for flag, values in FLAG_VALUES.items() if flag not in ("--mpp", "--regions")
             for item in (flag, *values)]
    args = _build_parser().parse_args(["cohort", "run", str(tmp_path / "cohort.csv"), "--out", "o", *flags])
    request = CohortSettings(_analysis_request(args)).for_item(item)
    for name in FIELDS:
        if name == "regions_geojson":
            assert item.regions.name == GIVEN[name]
        elif name == "slide":
            assert Path(request.slide).name == "a.svs"
        else:
            assert _reached(request, name), (name, COHORT_SOURCES[name], request)


def test_every_field_is_reachable_over_http_and_from_the_client() -> None:
    from hepatoquant_client.client import Client

    sent = AnalysisRequest(**GIVEN)
    over_http = request_from_json(json_format.MessageToJson(sent))  # what the gateway parses
    assert over_http == sent and all(_reached(over_http, name) for name in FIELDS)
    options = {name: GIVEN[name] for name in ANALYSIS_OPTIONS if name != "regions_geojson"}
    built = Client.analysis_request("a.svs", **options)  # what Client.submit sends
    assert all(_reached(built, name) for name in options)


@pytest.fixture(scope="module")
def demo_pack(tmp_path_factory: pytest.TempPathFactory):
    return ensure_demo_pack(tmp_path_factory.mktemp("models"))


def test_resolve_applies_every_field(demo_pack) -> None:
    request = AnalysisRequest(**{k: v for k, v in GIVEN.items() if k != "regions_geojson"})
    options = resolve_options(request, demo_pack, Runtime(device="cpu", batch_size=7, num_workers=3,
                                                          readers="processes"),
                              regions_path=Path("r.geojson"))
    assert options.mpp_override_um_px == 0.25 and options.regions_path == Path("r.geojson")
    assert (options.tile.tile_size_px, options.tile.spacing_um_px, options.tile.min_tissue_fraction) == (224, 1.0, 0.3)
    assert options.tumour_class_names == ("HCC", "Tumor") and options.tile_object_type == "tile"
    assert options.keep_embeddings and options.keep_artefacts and options.precision == "fp32"
    assert options.embeddings_formats == ("h5",)
    assert options.tissue.saturation_threshold == 20 and options.windows.overlap == 0.5 and options.min_focus == 10.0
    assert (options.device, options.batch_size, options.num_workers, options.windows.num_workers) == ("cpu", 7, 3, 3)
    assert options.readers == "processes"


def test_absent_fields_take_the_defaults_in_one_place(demo_pack) -> None:
    options = resolve_options(AnalysisRequest(slide="a.svs"), demo_pack, Runtime(precision="bf16"))
    assert (options.tile.tile_size_px, options.tile.spacing_um_px) == (demo_pack.tile_size_px, demo_pack.spacing_um_px)
    assert options.tile.min_tissue_fraction == 0.5 and options.min_focus == 50.0 and options.windows.overlap == 0.25
    assert options.tissue.saturation_threshold is None and options.mpp_override_um_px is None
    assert options.precision == "bf16" and options.tile_object_type == "detection" and not options.keep_artefacts
    assert options.embeddings_formats == ("h5", "npz")  # both, when embeddings are asked for


@pytest.mark.parametrize(("fields", "message"), [
    ({"include_embeddings": True, "embeddings_format": "pt"}, "'pt' is not one of h5, npz, both"),
    ({"embeddings_format": "h5"}, "no embeddings are kept: ask for them too"),
])
def test_an_embeddings_format_that_cannot_be_honoured_is_refused(demo_pack, fields: dict, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        resolve_options(AnalysisRequest(slide="a.svs", **fields), demo_pack, Runtime())


def test_zero_is_a_value_not_the_default(demo_pack) -> None:
    runtime = Runtime()
    kept = resolve_options(AnalysisRequest(min_focus=0, min_tissue_fraction=0, window_overlap=0, tissue_threshold=0),
                           demo_pack, runtime)
    assert kept.min_focus == 0 and kept.tile.min_tissue_fraction == 0 and kept.windows.overlap == 0
    assert kept.tissue.saturation_threshold == 0
    for field, fragment in (("tile_size_px", "tile size 0 px"), ("tile_spacing_um_px", "tile spacing 0.0"),
                            ("mpp_um_px", "mpp_um_px = 0.0")):
        with pytest.raises(InvalidParameterError, match=fragment):
            resolve_options(AnalysisRequest(**{field: 0}), demo_pack, runtime)
