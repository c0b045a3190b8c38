"""Shared fixtures: the team's real test data, small synthetic slides, a private models directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from hepatoquant.synthetic import Ellipse, SyntheticSlideSpec, write_synthetic_slide

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """``../shared/testdata`` (real slides, patches, QuPath exports); tests skip where it is absent."""
    if not TESTDATA.is_dir():
        pytest.skip(f"the team's test data folder {TESTDATA} is absent (CI always has it)")
    return TESTDATA


@pytest.fixture(scope="session")
def cmu_slide(testdata: Path) -> Path:
    """Real Aperio SVS, 2220 x 2967 px, one level, 0.499 um/px."""
    return testdata / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tcga_slide(testdata: Path) -> Path:
    """Real Aperio SVS, 4443 x 3567 px, two levels, JPEG 2000, no MPP in its metadata."""
    return testdata / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048 x 2048 px pyramidal TIFF at 0.5 um/px with two tissue pieces and a tumour-textured area."""
    path = tmp_path_factory.mktemp("slides") / "synthetic.tiff"
    spec = SyntheticSlideSpec(width_px=2048, height_px=2048, tumour=(Ellipse(600, 900, 220, 260),))
    return write_synthetic_slide(path, spec)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory private to this test session (never the user's)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def _private_models_dir(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    monkeypatch.setenv("HEPATOQUANT_MODELS_DIR", str(models_dir))
