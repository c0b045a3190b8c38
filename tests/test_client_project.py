"""Cohort tables, QuPath-project planning and the paquo layer of the client (real server over loopback)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hepatoquant_client import AnalysisOutcome, Client
from hepatoquant_client.classes import HEADLINE_INDICATORS, REGION_CLASSES, TISSUE_CLASS_CODES, TISSUE_CLASSES
from hepatoquant_client.cohort import CohortError, cohort_columns, cohort_rows, summary_table, write_cohort
from hepatoquant_client.hepatoquant_objects import is_hepatoquant_object, region_object, tile_object
from hepatoquant_client.project_plan import (
    UriMapping,
    UriMappingError,
    map_image_uri,
    nest_tiles,
    nested_features,
    parse_mappings,
    plan_hierarchy,
    plan_replacement,
    project_classes,
    uri_to_path,
)
from hepatoquant_client.qupath_geojson import (
    QuPathObject,
    check_qupath_nesting,
    parse_qupath_geojson,
    read_qupath_geojson,
)
from shapely.geometry import Point, box

from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

TOKEN = "project-s3cret"


# --- a real server and two real outcomes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path):
    base = tmp_path_factory.mktemp("project_server")
    root = base / "slides"
    root.mkdir()
    shutil.copy(synthetic_slide, root / "synthetic.tiff")
    models = base / "models"
    ensure_demo_pack(models, encoder="test_vit_micro")
    config = ServerConfig(slide_roots=(root.resolve(),), state_dir=base / "state", models_dir=models, token=TOKEN)
    running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
    yield {"target": f"127.0.0.1:{running.grpc_port}", "root": root.resolve()}
    running.stop(grace_seconds=1)


@pytest.fixture(scope="module")
def outcomes(server, synthetic_regions_geojson: str) -> dict[str, AnalysisOutcome]:
    with Client(server["target"], token=TOKEN) as client:
        whole = client.analyze("synthetic.tiff")
        regions = client.analyze("synthetic.tiff", regions_geojson=synthetic_regions_geojson,
                                 tumour_class_names=["Tumor"])
    return {"whole": whole, "regions": regions}


# --- cohort -----------------------------------------------------------------------------------------------


def test_cohort_rows_hold_the_outcomes_numbers_in_the_fixed_column_order(outcomes) -> None:
    rows = cohort_rows([("S-001", outcomes["whole"]), ("S-002", outcomes["regions"])])
    columns = cohort_columns()
    assert len(columns) == len(set(columns)) and columns[:5] == ["slide", "job_id", "slide_path", "model", "model_status"]
    assert all(list(row) == columns for row in rows)
    whole_row, regions_row = rows
    whole = outcomes["whole"]
    assert whole_row["slide"] == "S-001" and whole_row["job_id"] == whole.job_id
    assert whole_row["model"] == whole.report["model"]["name"] and whole_row["model"]
    assert whole_row["model_status"] == "untrained-demo"
    [tissue] = [r for r in whole.region_classes if r.region_class == "tissue"]
    assert whole_row["tissue_tiles"] == tissue.tile_count > 30
    assert whole_row["tile_count"] == whole.report["tiles"]["count"]
    for code in TISSUE_CLASS_CODES:
        assert whole_row[f"tissue_{code}_pct"] == pytest.approx(tissue.percent(code))
    assert whole_row["tumour_tiles"] is None and whole_row["headline_tumour_NEC_pct"] is None
    # The regions run: tumour / non-tumour columns and headline indicators, no whole-tissue columns.
    regions = outcomes["regions"]
    tumour = next(r for r in regions.region_classes if r.region_class == "tumour")
    assert regions_row["tumour_region_area_mm2"] == pytest.approx(tumour.region_area_mm2) and tumour.region_area_mm2 > 0
    assert regions_row["tumour_tiles"] == tumour.tile_count
    assert regions_row["tissue_tiles"] is None
    assert not any(r.region_class == "unassigned" for r in regions.region_classes)
    assert regions_row["unassigned_tiles"] is None
    assert regions.headline_indicators
    for key, value in regions.headline_indicators.items():
        region_class, code = key.split("/")
        assert regions_row[f"headline_{region_class}_{code}_pct"] == pytest.approx(value)
    # Same numbers as the server's own cohort CSV for the columns both tables share.
    for outcome, row in ((whole, whole_row), (regions, regions_row)):
        [server_row] = list(csv.DictReader(outcome.cohort_csv.decode().splitlines()))
        shared = [c for c in columns if c in server_row and c.endswith(("_pct", "_tiles"))]
        assert len(shared) > 30
        for column in shared:
            mine, theirs = row[column], server_row[column]
            assert (mine is None) == (theirs == ""), column
            if mine is not None:
                assert float(theirs) == pytest.approx(mine, abs=1e-3), column


def test_cohort_rows_unassigned_tiles_have_no_region_area(outcomes) -> None:
    """Rows come from the report (one definition for every table): tiles outside every region have no polygon,
    so no region area; a region class without columns of its own is left out."""
    regions = outcomes["regions"]
    report = copy.deepcopy(regions.report)
    tumour = next(r for r in report["composition"]["region_classes"] if r["region_class"] == "tumour")
    unassigned = dict(tumour, name="unassigned", region_class="unassigned", source="aggregate", region_area_mm2=None,
                      tile_count=3)
    other = dict(tumour, region_class="stroma-like")
    report["composition"]["region_classes"] += [unassigned, other]
    [row] = cohort_rows([("S-9", dataclasses.replace(regions, report=report))])
    assert row["unassigned_tiles"] == 3 and row["unassigned_region_area_mm2"] is None
    assert row["unassigned_TUM_pct"] == pytest.approx(tumour["class_percent"]["TUM"])
    assert list(row) == cohort_columns()


def test_cohort_rows_refuse_a_slide_twice(outcomes) -> None:
    with pytest.raises(CohortError, match="'S-1' appears twice"):
        cohort_rows([("S-1", outcomes["whole"]), ("S-1", outcomes["regions"])])


def test_write_cohort_writes_the_csv_atomically_and_reports_parquet(outcomes, tmp_path: Path) -> None:
    rows = cohort_rows([("S-001", outcomes["whole"]), ("S-002", outcomes["regions"])])
    target = tmp_path / "out" / "cohort.csv"
    files = write_cohort(rows, target)
    with target.open(newline="") as handle:
        reader = csv.DictReader(handle)
        back = list(reader)
    assert reader.fieldnames == cohort_columns()
    assert [r["slide"] for r in back] == ["S-001", "S-002"]
    assert back[0]["tumour_tiles"] == "" and int(back[0]["tissue_tiles"]) == rows[0]["tissue_tiles"]
    assert float(back[1]["headline_non_tumour_STE_pct"]) == pytest.approx(rows[1]["headline_non_tumour_STE_pct"])
    assert not list(target.parent.glob("*.partial"))
    parquet = target.with_suffix(".parquet")
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow.parquet as pq

        assert files.written == (target, parquet) and not files.not_written
        assert pq.read_table(parquet).column_names == cohort_columns()
    else:
        assert files.written == (target,)
        [(path, reason)] = files.not_written
        assert path == parquet and "pyarrow" in reason and not parquet.exists()


def test_write_cohort_writes_parquet_through_pyarrow(outcomes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Parquet branch, with a stand-in pyarrow that records what it is given (runs without pyarrow)."""
    seen: dict[str, object] = {}

    class Table:
        @staticmethod
        def from_pylist(rows, schema):
            seen["rows"], seen["schema"] = rows, schema
            return "table"

    fake = types.ModuleType("pyarrow")
    fake.Table = Table
    fake.string, fake.int64, fake.float64 = (lambda: "string"), (lambda: "int64"), (lambda: "float64")
    fake.schema = lambda fields: list(fields)
    fake_pq = types.ModuleType("pyarrow.parquet")

    def write_table(table, path):
        assert table == "table" and Path(path).name.endswith(".partial")
        Path(path).write_bytes(b"PAR1")

    fake_pq.write_table = write_table
    fake.parquet = fake_pq
    monkeypatch.setitem(sys.modules, "pyarrow", fake)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake_pq)
    rows = cohort_rows([("S-001", outcomes["whole"])])
    files = write_cohort(rows, tmp_path / "c.csv")
    assert files.written == (tmp_path / "c.csv", tmp_path / "c.parquet") and not files.not_written
    assert (tmp_path / "c.parquet").read_bytes() == b"PAR1" and not list(tmp_path.glob("*.partial"))
    schema = dict(seen["schema"])
    assert list(schema) == cohort_columns()
    assert schema["slide"] == "string" and schema["tissue_tiles"] == "int64" and schema["tissue_TUM_pct"] == "float64"
    assert seen["rows"][0]["slide"] == "S-001" and seen["rows"][0]["tumour_tiles"] is None


def test_write_cohort_refuses_foreign_columns_and_writes_nothing(outcomes, tmp_path: Path) -> None:
    rows = cohort_rows([("S-001", outcomes["whole"])])
    rows[0]["surprise"] = 1
    with pytest.raises(CohortError, match="surprise"):
        write_cohort(rows, tmp_path / "c.csv")
    assert not list(tmp_path.iterdir())


def test_summary_table_shows_each_slide_and_the_headline_indicators(outcomes) -> None:
    rows = cohort_rows([("S-001", outcomes["whole"]), ("S-002", outcomes["regions"])])
    text = summary_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and set(lines[1]) <= {"-", " "}
    assert lines[0].split()[:3] == ["slide", "model", "status"] and "non_tumour STE %" in lines[0]
    assert lines[2].startswith("S-001") and lines[3].startswith("S-002")
    assert lines[2].rstrip().endswith("-")  # no headline indicators without regions
    value = rows[1]["headline_tumour_INF_pct"]
    assert f"{value:.1f}" in lines[3].split()
    headline_count = sum(len(codes) for codes in HEADLINE_INDICATORS.values())
    assert len(lines[3].split()) == 3 + headline_count


# --- URI mapping --------------------------------------------------------------------------------------------


MAPPINGS = parse_mappings(["file:/C:/Slides=/data/slides", "/Volumes/lab/wsi=/srv/wsi", "/Volumes/lab=/srv/lab"])


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:/C:/Slides/liver/a.svs", "/data/slides/liver/a.svs"),  # QuPath's own URI form
        ("file:///C:/Slides/liver/a.svs", "/data/slides/liver/a.svs"),
        ("file:///c:/slides/liver/a.svs", "/data/slides/liver/a.svs"),  # drive and folders: case-insensitive
        ("file:/C:/Slides/case%2012/HE%20%231.svs", "/data/slides/case 12/HE #1.svs"),  # percent-decoding
        ("C:\\Slides\\b.ndpi", "/data/slides/b.ndpi"),  # a plain Windows path
        ("file:///Volumes/lab/wsi/x.tif", "/srv/wsi/x.tif"),  # longest prefix wins
        ("file:///Volumes/lab/other/x.tif", "/srv/lab/other/x.tif"),
        ("file://localhost/Volumes/lab/x%C3%A9.tif", "/srv/lab/x\u00e9.tif"),
    ],
)
def test_map_image_uri(uri: str, expected: str) -> None:
    assert map_image_uri(uri, MAPPINGS) == expected


def test_map_image_uri_without_a_match_names_the_uri_and_the_prefixes() -> None:
    with pytest.raises(UriMappingError) as caught:
        map_image_uri("file:/D:/elsewhere/a.svs", MAPPINGS)
    message = str(caught.value)
    assert "file:/D:/elsewhere/a.svs" in message and "'file:/C:/Slides'" in message and "'/Volumes/lab'" in message
    # A prefix matches whole folders only, and POSIX paths are case-sensitive.
    with pytest.raises(UriMappingError):
        map_image_uri("file:///Volumes/lab2/x.tif", MAPPINGS)
    with pytest.raises(UriMappingError):
        map_image_uri("file:///volumes/lab/x.tif", MAPPINGS)
    with pytest.raises(UriMappingError, match="none"):
        map_image_uri("file:///Volumes/lab/x.tif", [])


def test_uri_forms_and_bad_mappings() -> None:
    assert uri_to_path("file:///C:/a%20b/c.svs") == "C:/a b/c.svs"
    assert uri_to_path("file:/c:/x.svs") == "C:/x.svs"
    assert uri_to_path("file://server/share/x.svs") == "//server/share/x.svs"
    assert map_image_uri("file://server/share/x.svs", [UriMapping("//SERVER/share", "/mnt/share")]) == "/mnt/share/x.svs"
    with pytest.raises(UriMappingError, match="not a file URI"):
        map_image_uri("https://example.org/a.svs", MAPPINGS)
    with pytest.raises(UriMappingError, match="FROM=TO"):
        parse_mappings(["/no/equals/sign"])
    with pytest.raises(UriMappingError, match="FROM=TO"):
        UriMapping.parse("=/data")
    assert UriMapping.parse("C:/a=b=/srv") == UriMapping("C:/a", "b=/srv")


# --- replacement plan, nesting, classes ---------------------------------------------------------------------


def _ours() -> list[QuPathObject]:
    probabilities = dict.fromkeys(TISSUE_CLASS_CODES, 1 / 7)
    tiles = [tile_object(x, 200, 150, "FIB", probabilities, model_status="untrained-demo") for x in (100, 400)]
    region = region_object(box(0, 0, 1000, 1000), "tumour", "tumour 1", tile_count=2, tile_area_mm2=0.01,
                           region_area_mm2=0.25, class_tiles={"FIB": 2}, class_percent={"FIB": 100.0})
    return [*tiles, region]


def test_replacement_never_removes_a_pathologists_object(testdata: Path) -> None:
    pathologist = [o for f in sorted((testdata / "qupath").glob("*.geojson")) for o in read_qupath_geojson(f)]
    assert len(pathologist) >= 5 and not any(is_hepatoquant_object(o) for o in pathologist)
    # A look-alike that is not ours: "HepatoQuant" inside the name but not the prefix, other metadata.
    lookalike = QuPathObject(box(0, 0, 5, 5), name="checked HepatoQuant: ok", metadata={"reviewer": "hepatoquant"})
    previous = _ours()
    existing = [pathologist[0], *previous[:2], *pathologist[1:], lookalike, previous[2]]
    new = _ours()[::-1]
    to_remove, to_add = plan_replacement(existing, new)
    assert to_remove == previous and to_add == new
    assert not any(any(o is p for o in to_remove) for p in [*pathologist, lookalike])
    assert plan_replacement(pathologist, new).to_remove == []
    with pytest.raises(ValueError, match="new object 1"):
        plan_replacement(existing, [new[0], pathologist[0]])


def test_nest_tiles_follows_qupaths_resolve_hierarchy() -> None:
    big, small, apart = box(0, 0, 1000, 1000), box(100, 100, 400, 400), box(2000, 0, 2100, 100)
    overlapping = box(2050, 50, 2130, 130)  # overlaps apart (smaller than it), inside neither
    tiles = [
        box(150, 150, 250, 250),  # centre in small, which lies inside big -> small (the deepest)
        box(600, 600, 700, 700),  # big only
        box(950, 950, 1100, 1100),  # straddles big's edge, centre outside -> nowhere
        box(3000, 3000, 3100, 3100),  # nowhere
        box(1950, 0, 2050, 100),  # centre (2000, 50) on apart's edge -> apart
        box(2060, 60, 2080, 80),  # centre in apart AND overlapping -> apart: the larger of overlapping regions
        box(2110, 110, 2120, 120),  # overlapping only
    ]
    assert nest_tiles([big, small, apart, overlapping], tiles) == {0: [1], 1: [0], 2: [4, 5], 3: [6]}
    assert nest_tiles([overlapping, small, apart, big], tiles) == {0: [6], 1: [0], 2: [4, 5], 3: [1]}
    plan = plan_hierarchy([big, small, apart, overlapping], tiles)
    assert plan.region_parent == [None, 0, None, None]  # small is nested in big; overlapping ones are siblings
    assert plan.tile_parent == [1, 0, None, None, 2, 2, 3]
    assert nest_tiles([], tiles) == {} and nest_tiles([big], []) == {0: []}
    # Equal regions: the later one is nested in the earlier and takes the tile; QuPathObjects work as geometries.
    objects = [QuPathObject(box(0, 0, 10, 10)), QuPathObject(box(0, 0, 10, 10))]
    assert nest_tiles(objects, [QuPathObject(Point(5, 5).buffer(1), object_type="detection")]) == {0: [], 1: [0]}
    assert plan_hierarchy(objects, []).region_parent == [None, 0]


# Regions (x0, y0, x1, y1, name) and tile centres for the comparison with QuPath's own resolveHierarchy().
_KIT_REGIONS = [(0, 0, 1000, 1000, "big"), (100, 100, 400, 400, "small in big"), (150, 150, 300, 300, "smaller"),
                (800, 800, 1600, 1500, "overlaps big"), (1500, 0, 2000, 500, "apart"), (1900, 400, 2000, 450, "edge"),
                (1550, 50, 1700, 200, "in apart")]
_KIT_CENTRES = [(x, y) for x in range(25, 2100, 75) for y in range(25, 1600, 75)] + [(1000, 500), (1500, 100),
                                                                                 (1900, 425), (800, 800)]


def test_nest_tiles_matches_qupath_resolve_hierarchy(qupath_kit) -> None:
    """nest_tiles against QuPath 0.6's own PathObjectHierarchy.resolveHierarchy() on nested, overlapping and
    touching regions, with tile centres inside, outside and on edges (one JVM, in a subprocess)."""
    regions = [box(x0, y0, x1, y1) for x0, y0, x1, y1, _ in _KIT_REGIONS]
    tiles = [box(x - 20, y - 20, x + 20, y + 20) for x, y in _KIT_CENTRES]
    code = f"""
import json
import paquo.java  # starts QuPath's JVM as paquo does
from jpype import JClass
ROIs, PO = JClass("qupath.lib.roi.ROIs"), JClass("qupath.lib.objects.PathObjects")
plane = JClass("qupath.lib.regions.ImagePlane").getDefaultPlane()
rect = lambda x0, y0, x1, y1: ROIs.createRectangleROI(float(x0), float(y0), float(x1 - x0), float(y1 - y0), plane)
regions = []
for x0, y0, x1, y1, name in {_KIT_REGIONS!r}:
    a = PO.createAnnotationObject(rect(x0, y0, x1, y1)); a.setName(name); regions.append(a)
tiles = [PO.createDetectionObject(rect(x - 20, y - 20, x + 20, y + 20)) for x, y in {_KIT_CENTRES!r}]
H = JClass("qupath.lib.objects.hierarchy.PathObjectHierarchy")()
H.addObjects(JClass("java.util.ArrayList")([*tiles, *regions]))
H.resolveHierarchy()
name = lambda o: None if o.getParent() == H.getRootObject() else str(o.getParent().getName())
print(json.dumps({{"tiles": [name(t) for t in tiles], "regions": [name(r) for r in regions]}}))
"""
    run = qupath_kit.python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    names = [name for *_, name in _KIT_REGIONS]
    plan = plan_hierarchy(regions, tiles)
    assert [None if p is None else names[p] for p in plan.region_parent] == run.result["regions"]
    mine = [None if p is None else names[p] for p in plan.tile_parent]
    assert mine == run.result["tiles"]
    assert all(mine.count(name) for name in names) and mine.count(None)
    # In the overlap of "big" and the smaller "overlaps big" (neither inside the other) the larger keeps the tiles.
    overlap = [i for i, (x, y) in enumerate(_KIT_CENTRES) if 800 <= x <= 1000 and 800 <= y <= 1000]
    assert overlap and {mine[i] for i in overlap} == {"big"}


def test_nested_features_put_tiles_inside_their_region_properties() -> None:
    ours = _ours()
    outside = tile_object(5000, 5000, 150, "TUM", dict.fromkeys(TISSUE_CLASS_CODES, 1 / 7))
    features = nested_features([*ours, outside])
    assert [f["properties"]["objectType"] for f in features] == ["annotation", "detection"]
    region = features[0]
    assert region["properties"]["name"] == "HepatoQuant: tumour 1"
    assert "childObjects" not in region  # QuPath 0.6 ignores it there: the children would be lost
    children = region["properties"]["childObjects"]
    assert [c["properties"]["objectType"] for c in children] == ["detection", "detection"]
    assert [c["geometry"]["coordinates"][0][0][0] for c in children] in ([250, 550], [100, 400])
    assert features[1]["geometry"]["coordinates"][0][0][0] in (5000, 5150)
    check_qupath_nesting(features)
    assert [o.name for o in parse_qupath_geojson(features)][:1] == ["HepatoQuant: tumour 1"]
    assert len(parse_qupath_geojson(features)) == 4  # nothing lost when read as QuPath reads it
    # A region inside another is nested in it, with the tiles QuPath would give it.
    inner = region_object(box(50, 150, 300, 400), "tumour", "inner", tile_count=1, tile_area_mm2=0.01,
                          region_area_mm2=0.1, class_tiles={"FIB": 1}, class_percent={"FIB": 100.0})
    [outer] = nested_features([*ours, inner])
    [tile, nested_inner] = outer["properties"]["childObjects"]  # in input order
    assert nested_inner["properties"]["name"] == "HepatoQuant: inner"
    assert tile["properties"]["objectType"] == "detection"
    [inner_tile] = nested_inner["properties"]["childObjects"]
    assert inner_tile["geometry"]["coordinates"][0][2] == [100, 350]  # the tile at x 100..250
    with pytest.raises(ValueError, match="cells"):
        nested_features([QuPathObject(box(0, 0, 1, 1), object_type="cell")])


def test_project_classes_are_the_class_table() -> None:
    classes = project_classes()
    assert classes[: len(TISSUE_CLASSES)] == [(c.qupath_name, c.color_rgb) for c in TISSUE_CLASSES]
    assert classes[len(TISSUE_CLASSES):] == [(c.qupath_name, c.color_rgb) for c in REGION_CLASSES]
    assert len({name for name, _ in classes}) == len(classes) == 10


# --- the paquo layer ----------------------------------------------------------------------------------------


def test_importing_the_project_modules_imports_neither_paquo_nor_the_server() -> None:
    code = ("import sys, hepatoquant_client.paquo_project, hepatoquant_client.project_plan, "
            "hepatoquant_client.cohort; "
            "bad = [m for m in ('paquo', 'jpype', 'torch', 'hepatoquant', 'pyarrow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def _project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "project.qpproj").write_text("{}")
    return folder


def test_without_paquo_the_error_names_paquo_qupath_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hepatoquant_client.paquo_project import PaquoUnavailableError, analyze_project

    monkeypatch.setitem(sys.modules, "paquo", None)  # as if paquo were not installed
    with pytest.raises(PaquoUnavailableError, match="PAQUO_QUPATH_DIR") as caught:
        analyze_project(_project(tmp_path), client=None, mappings=MAPPINGS)
    assert "paquo is not installed" in str(caught.value)


def test_without_qupath_the_error_names_paquo_qupath_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hepatoquant_client.paquo_project import PaquoUnavailableError, analyze_project

    # paquo importable, but starting QuPath's classes fails (as it does when no QuPath is found).
    monkeypatch.setitem(sys.modules, "paquo", types.ModuleType("paquo"))
    for name in ("paquo.classes", "paquo.pathobjects", "paquo.projects"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("PAQUO_QUPATH_DIR", "/nowhere/qupath")
    with pytest.raises(PaquoUnavailableError, match="PAQUO_QUPATH_DIR='/nowhere/qupath' holds no usable QuPath"):
        analyze_project(_project(tmp_path), client=None, mappings=MAPPINGS)
    with pytest.raises(FileNotFoundError, match="project.qpproj"):
        analyze_project(tmp_path / "missing", client=None, mappings=MAPPINGS)


# A stand-in for paquo's project, entries and hierarchy, kept only where real QuPath cannot go: a QuPath that
# fails in the middle of a write (the undo path cannot be provoked in the real one). Everything else the paquo
# layer and the CLI do with a project (replacing, nesting, isolating a failed image, import-geojson,
# export-annotations, the cohort) runs on QuPath's own code in tests/test_qupath_kit_project.py. The stand-in
# reads children as QuPath 0.6 does: only from properties.childObjects (a childObjects beside properties is
# ignored, and those children are lost, as in QuPath).


class _FakeObject:
    def __init__(self, feature: dict) -> None:
        self.feature = feature
        self.java_object = self

    def to_geojson(self) -> dict:
        return json.loads(json.dumps(self.feature))

    def descendants(self) -> list[_FakeObject]:
        if not hasattr(self, "children"):
            self.children = [_FakeObject(child) for child in self.feature["properties"].get("childObjects", [])]
        return [self, *(d for child in self.children for d in child.descendants())]


class _FakeJavaHierarchy:
    def __init__(self, features: list[dict]) -> None:
        self.objects = [_FakeObject(f) for f in features]

    def addPathObjects(self, objects) -> None:  # noqa: N802  (QuPath's name)
        for obj in objects:  # QuPath lists nested children among the hierarchy's objects too
            self.objects += obj.descendants()

    fail_removal = False

    def removeObjects(self, objects, keep_children) -> None:  # noqa: N802
        if self.fail_removal and keep_children:
            raise RuntimeError("simulated QuPath failure")
        ids = {id(o) for o in objects}
        if not keep_children:  # QuPath removes the descendants too
            ids |= {id(d) for o in objects if hasattr(o, "children") for d in o.descendants()[1:]}
        self.objects = [o for o in self.objects if id(o) not in ids]


class _FakeHierarchy:
    def __init__(self, features: list[dict]) -> None:
        self.java_object = _FakeJavaHierarchy(features)

    @property
    def annotations(self) -> list[_FakeObject]:
        return [o for o in self.java_object.objects if o.feature["properties"]["objectType"] == "annotation"]

    @property
    def detections(self) -> list[_FakeObject]:
        return [o for o in self.java_object.objects if o.feature["properties"]["objectType"] != "annotation"]

    def flush(self, invalidate_proxy_cache: bool = False) -> None:
        pass


class _FakeEntry:
    def __init__(self, name: str, uri: str, features: list[dict]) -> None:
        self.image_name, self.uri, self.hierarchy, self.saves = name, uri, _FakeHierarchy(features), 0

    def save(self) -> None:
        self.saves += 1


class _FakeClass:
    def __init__(self, name: str, color=None) -> None:
        self.name, self.color = name, color


def _fake_paquo(entries: list[_FakeEntry], classes: list[_FakeClass]) -> types.SimpleNamespace:
    class Project:
        def __init__(self, path: str, mode: str) -> None:
            assert mode in ("a", "r") and Path(path, "project.qpproj").is_file()
            self.images, self.path_classes = entries, classes

        def __enter__(self):
            return self

        def __exit__(self, *exc_info) -> None:
            classes[:] = self.path_classes

    return types.SimpleNamespace(QuPathProject=Project, QuPathPathClass=_FakeClass, object_from_geojson=_FakeObject,
                                 add_objects=lambda hierarchy, objects: hierarchy.addPathObjects(objects))


def test_a_failed_write_is_undone_and_the_run_goes_on(server, testdata: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hepatoquant_client import paquo_project
    from hepatoquant_client.qupath_geojson import to_feature

    features = [*read_features(testdata), *(to_feature(o) for o in _ours())]
    broken = _FakeEntry("broken", "file:/C:/Slides/synthetic.tiff", features)
    broken.hierarchy.java_object.fail_removal = True
    fine = _FakeEntry("fine", "file:/C:/Slides/synthetic.tiff", features)
    before = list(broken.hierarchy.java_object.objects)
    monkeypatch.setattr(paquo_project, "load_paquo", lambda: _fake_paquo([broken, fine], []))
    with Client(server["target"], token=TOKEN) as client:
        first, second = paquo_project.analyze_project(
            _project(tmp_path), client, mappings=[UriMapping("file:/C:/Slides", str(server["root"]))])
    assert first.status == "failed" and "simulated QuPath failure" in first.error
    assert broken.hierarchy.java_object.objects == before and broken.saves == 0
    assert second.status == "written" and fine.saves == 1


def read_features(testdata: Path) -> list[dict]:
    return json.loads((testdata / "qupath" / "qupath-0.6.0-export-featurecollection.geojson").read_text())["features"]


def test_cli_project_commands_without_paquo_or_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys) -> None:
    from hepatoquant_client.cli import main

    monkeypatch.setitem(sys.modules, "paquo", None)
    assert main(["export-annotations", str(_project(tmp_path)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PAQUO_QUPATH_DIR" in err
    assert main(["import-geojson", str(tmp_path / "nowhere"), "img", str(tmp_path / "x.geojson")]) == 2
    assert "is not a QuPath project" in capsys.readouterr().err
