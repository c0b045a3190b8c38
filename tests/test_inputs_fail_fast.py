"""Every bad input fails fast and clearly (issue 17): a message naming the input and the fix, exit code 2, no
traceback, nothing analysed first and nothing left behind.

Each test is a row of the issue's table, run as a user would (the real command in a subprocess where the
process matters: start-up time, ``python -m``, another user's permissions). On the code before, each failed:
0 accepted as "the default", a read-only output found after the whole analysis, a bow-tie repaired in silence,
a DICOM called "truncated or damaged", a cohort told to use a flag it does not have, ``python -m
hepatoquant.cli cohort`` a NameError, pack weights private to their writer, a missing slide reported after
4-7 s of imports.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hepatoquant.errors import UnsupportedSlideError
from hepatoquant.regions import regions_from_geojson
from hepatoquant.slide import Slide

HEPATOQUANT = str(Path(sys.executable).with_name("hepatoquant"))


def run_cli(*args: str, cwd: str | None = None, module: bool = False,
            timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The installed ``hepatoquant`` command (or ``python -m hepatoquant.cli``), and its wall time in s."""
    command = [sys.executable, "-m", "hepatoquant.cli", *args] if module else [HEPATOQUANT, *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return done, time.perf_counter() - started


def assert_refused(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("hepatoquant: error: ")]
    assert len(errors) == 1, done.stderr[-2000:]  # one line (warnings may come before it)
    for phrase in phrases:
        assert phrase in done.stderr, (phrase, done.stderr)


# -- fast failure ----------------------------------------------------------------------------------------------


def test_a_missing_slide_fails_in_well_under_a_second(tmp_path: Path) -> None:
    done, seconds = run_cli("analyze", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "out"))
    assert_refused(done, "missing.svs", "does not exist")
    assert seconds < 1.0, seconds
    assert not (tmp_path / "out").exists()


def test_checks_run_before_torch_or_openslide_are_imported(tmp_path: Path) -> None:
    probe = (
        "import sys\nfrom hepatoquant.cli import main\n"
        f"rc = main(['analyze', {str(tmp_path / 'missing.svs')!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'timm', 'peft', 'openslide', 'cv2') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "2 []", (done.stdout, done.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["cohort", "run", "{tmp}/missing.csv", "--out", "{tmp}/cohort-out"],
        ["bench", "curate", "{tmp}/no-dataset"],
        ["analyze", "{tmp}/missing.svs"],
    ],
    ids=["cohort", "bench", "analyze"],
)
def test_python_dash_m_runs_every_command(tmp_path: Path, args: list[str]) -> None:
    done, _ = run_cli(*(a.format(tmp=tmp_path) for a in args), module=True, cwd=str(tmp_path))
    assert_refused(done, "does not exist")


# -- explicit values are validated, never replaced -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["analyze", "{slide}", "--tile-size", "0"], "--tile-size 0"),
        (["analyze", "{slide}", "--tile-spacing", "0"], "--tile-spacing 0.0"),
        (["analyze", "{slide}", "--tile-size", "-5"], "--tile-size -5"),
        (["cohort", "run", "{slide}", "--out", "{tmp}/c", "--tile-size", "0"], "--tile-size 0"),
    ],
)
def test_zero_is_refused_not_read_as_the_default(cmu_slide: Path, tmp_path: Path, args: list[str], option: str) -> None:
    done, seconds = run_cli(*(a.format(slide=cmu_slide, tmp=tmp_path) for a in args), "--out", str(tmp_path / "o"))
    assert_refused(done, option, "above 0")
    assert seconds < 5, seconds  # refused before the analysis
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


# -- output folders are checked before the work ------------------------------------------------------------------


def test_out_under_a_file_is_refused_before_the_analysis(cmu_slide: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    for args in (["analyze", str(cmu_slide)], ["cohort", "run", str(cmu_slide)]):
        done, seconds = run_cli(*args, "--out", str(blocker / "sub"))
        assert_refused(done, str(blocker), "is a file")
        assert seconds < 5, seconds
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def read_only_setup(cmu_slide: Path, tmp_path: Path):
    """A cohort CSV and an output folder that cannot be written: a folder without write permission when not
    root; as root (which writes through permission bits, as on a lab server) a read-only bind mount, or where
    mounting is not allowed, a folder under /sys (sysfs refuses new folders to root too)."""
    cohort = tmp_path / "cohort.csv"
    with cohort.open("w", newline="") as handle:
        csv.writer(handle).writerows([["slide", "slide_id"], [str(cmu_slide), "cmu"]])
    source, read_only = tmp_path / "source", tmp_path / "read-only"
    source.mkdir()
    read_only.mkdir()
    mounted = False
    if os.geteuid() != 0:
        read_only.chmod(0o555)
    elif subprocess.run(f"mount --bind {source} {read_only} && mount -o remount,ro,bind {read_only}",
                        shell=True, capture_output=True).returncode == 0:
        mounted = True
    else:
        subprocess.run(["umount", str(read_only)], capture_output=True)
        read_only = Path("/sys/hepatoquant-read-only-test")
    yield cohort, read_only
    if mounted:
        subprocess.run(["umount", str(read_only)], check=True)
    elif read_only.is_relative_to(tmp_path):
        read_only.chmod(0o755)


@pytest.mark.parametrize("command", ["analyze", "cohort"])
def test_read_only_out_is_refused_before_any_slide_is_analysed(read_only_setup, cmu_slide: Path, command: str) -> None:
    cohort, read_only = read_only_setup
    args = ["analyze", str(cmu_slide)] if command == "analyze" else ["cohort", "run", str(cohort)]
    done, seconds = run_cli(*args, "--out", str(read_only / "results"))
    assert_refused(done, "--out", str(read_only / "results"), "cannot be written")
    assert seconds < 5, seconds  # the old code analysed every slide first (48 s for one slide here)
    assert not (read_only / "results").exists()
    assert not read_only.exists() or list(read_only.iterdir()) == []


# -- messages that fit the input and the command -----------------------------------------------------------------


def _dicom_without_wsi_attributes(path: Path) -> Path:
    """A DICOM file (preamble, DICM, file meta, a few data elements) of the VL Whole Slide Microscopy class but
    without ImageType / NumberOfFrames, as pathml writes some: OpenSlide detects DICOM and cannot open it."""

    def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
        value = value + b"\0" * (len(value) % 2)
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            return struct.pack("<HH", group, number) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", group, number) + vr + struct.pack("<H", len(value)) + value

    sop_class = b"1.2.840.10008.5.1.4.1.1.77.1.6"
    meta = (element(2, 1, b"OB", b"\0\1") + element(2, 2, b"UI", sop_class) + element(2, 3, b"UI", b"1.2.3.4")
            + element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1"))
    body = (element(8, 0x16, b"UI", sop_class) + element(8, 0x18, b"UI", b"1.2.3.4")
            + element(0x28, 0x10, b"US", struct.pack("<H", 16)) + element(0x28, 0x11, b"US", struct.pack("<H", 16)))
    path.write_bytes(b"\0" * 128 + b"DICM" + element(2, 0, b"UL", struct.pack("<I", len(meta))) + meta + body)
    return path


def test_a_dicom_openslide_cannot_read_is_not_called_damaged(tmp_path: Path) -> None:
    dicom = _dicom_without_wsi_attributes(tmp_path / "pathml.dcm")
    with pytest.raises(UnsupportedSlideError) as caught:
        Slide(dicom)
    message = str(caught.value)
    assert "DICOM" in message and "ImageType" in message and "pathml.dcm" in message
    assert "truncated or damaged" not in message
    done, _ = run_cli("analyze", str(dicom), "--out", str(tmp_path / "out"))
    assert_refused(done, "DICOM")
    assert not (tmp_path / "out").exists()


def test_a_slide_without_mpp_in_a_cohort_is_told_about_the_csv_column(tcga_slide: Path, tmp_path: Path) -> None:
    from hepatoquant.cohort.inputs import CohortItem
    from hepatoquant.analysis_request import AnalysisRequest
    from hepatoquant.cohort.runner import CohortSettings, analyze_item

    settings = CohortSettings(AnalysisRequest(model="demo", segmenter_model="none"))
    outcome = analyze_item(CohortItem(slide_id="tcga", slide=tcga_slide), settings, tmp_path)
    assert not outcome.ok and outcome.error_type == "MissingMPPError"
    assert "mpp column of the cohort CSV" in outcome.error and "--mpp" not in outcome.error, outcome.error


def test_a_bow_tie_region_is_repaired_with_a_warning_naming_it(tmp_path: Path) -> None:
    bow_tie = [[0, 0], [1000, 1000], [1000, 0], [0, 1000], [0, 0]]
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [bow_tie]},
                 "properties": {"objectType": "annotation", "name": "crossed tumour",
                                "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    regions, warnings = regions_from_geojson(path, (2000, 2000))
    assert regions[0].geometry.is_valid and regions[0].geometry.area == pytest.approx(500_000)
    said = [w for w in warnings if "crossed tumour" in w]
    assert said and "Self-intersection" in said[0] and "2 parts" in said[0], warnings


# -- packs are shared like the rest of a models folder -----------------------------------------------------------


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_pack_files_follow_the_umask(tmp_path: Path, make_tiny_checkpoint, make_linear_head, umask: int,
                                     file_mode: int, dir_mode: int) -> None:
    from hepatoquant.pack_import import add_model_pack

    checkpoint, head = make_tiny_checkpoint(), make_linear_head(dim=32)
    previous = os.umask(umask)
    try:
        pack = add_model_pack(checkpoint, encoder="test_vit_micro", name="shared", models_dir=tmp_path / "m",
                              head=head)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [pack.path, *pack.path.rglob("*")]}
    assert modes.pop(pack.path.name) == dir_mode
    assert modes and all(mode == file_mode for mode in modes.values()), {k: oct(v) for k, v in modes.items()}


def test_models_add_takes_the_heads_classes(tmp_path: Path, make_tiny_checkpoint, make_linear_head) -> None:
    """The README's `models add ... --head ... --classes ...` works (the option did not exist)."""
    checkpoint, head = make_tiny_checkpoint(), make_linear_head(dim=32, num_classes=3)
    done, _ = run_cli("--models-dir", str(tmp_path / "m"), "models", "add", str(checkpoint), "--encoder",
                      "test_vit_micro", "--head", str(head), "--classes", "STE", "tumour", "REA", "--name", "three")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "m" / "three" / "hepatoquant-model.json").read_text())
    assert manifest["classes"] == ["STE", "TUM", "REA"]
