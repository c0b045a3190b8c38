"""Shared fixtures: the team's real test data, small synthetic slides, a private models directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from hepatoquant.synthetic import Ellipse, SyntheticSlideSpec, write_synthetic_slide

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """``../shared/testdata`` (real slides, patches, QuPath exports); tests skip where it is absent, and fail in
    CI (``CI=true``), which always has it."""
    if not TESTDATA.is_dir():
        message = f"the team's test data folder {TESTDATA} is absent: clone the repository with ../shared beside it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return TESTDATA


@pytest.fixture(scope="session")
def cmu_slide(testdata: Path) -> Path:
    """Real Aperio SVS, 2220 x 2967 px, one level, 0.499 um/px."""
    return testdata / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def damaged_cmu_slide(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1-Small-Region with its tile data overwritten and its directories intact: it opens, its pixels fail."""
    data = bytearray(cmu_slide.read_bytes())
    data[100_000:1_200_000] = bytes(1_100_000)
    path = tmp_path_factory.mktemp("damaged") / "damaged.svs"
    path.write_bytes(bytes(data))
    return path


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
def synthetic_regions_geojson() -> str:
    """QuPath GeoJSON for ``synthetic_slide``: a Tumor polygon over its tumour ellipse, a Non-tumor square
    over its second tissue piece."""
    ring = [[600 + 220 * math.cos(2 * math.pi * i / 48), 900 + 260 * math.sin(2 * math.pi * i / 48)] for i in range(48)]
    ring.append(ring[0])
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "name": "tumour A",
                        "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature",
         "geometry": {"type": "Polygon",
                      "coordinates": [[[1250, 1050], [1650, 1050], [1650, 1500], [1250, 1500], [1250, 1050]]]},
         "properties": {"objectType": "annotation", "name": "background liver",
                        "classification": {"name": "Non-tumor", "color": [0, 160, 0]}}},
    ]
    return json.dumps({"type": "FeatureCollection", "features": features})


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory private to this test session (never the user's)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def _private_models_dir(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    monkeypatch.setenv("HEPATOQUANT_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("HEPATOQUANT_CACHE_DIR", str(models_dir.parent / "cache"))  # not the user's ~/.cache


# --- tiny models for encoder, model pack and classifier tests ---------------------------------------------

TINY_ENCODER = "test_vit_micro"


def _tiny_encoder(encoder: str, seed: int, layer_scale: float | None):
    """A registered (small) encoder with fixed-seed random weights and, optionally, LayerScale gammas set.

    Freshly initialised, ``test_vit_micro``'s LayerScale gammas are 1e-5, so its class token (the embedding)
    hardly depends on the input (tiles differ by ~1e-5): useless for telling tiles apart. Setting the gammas
    to ``layer_scale`` (like a trained model) makes the embedding depend on the pixels.
    """
    import torch

    from hepatoquant.encoders import create_encoder

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_encoder(encoder)
    if layer_scale is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".gamma"):
                    parameter.fill_(layer_scale)
    return model


@pytest.fixture(scope="session")
def build_tiny_encoder():
    """``build_tiny_encoder(encoder=TINY_ENCODER, seed=0, layer_scale=1.0)``: the model ``make_tiny_checkpoint`` saves."""

    def build(encoder: str = TINY_ENCODER, seed: int = 0, layer_scale: float | None = 1.0):
        return _tiny_encoder(encoder, seed, layer_scale)

    return build


@pytest.fixture
def make_tiny_checkpoint(tmp_path: Path):
    """Factory: save a tiny encoder's backbone state dict and return the file's path.

    ``make_tiny_checkpoint(filename, encoder=..., seed=..., layer_scale=1.0, wrap=None | "state_dict" |
    "model")`` saves the weights of ``build_tiny_encoder(encoder, seed, layer_scale)``: a ``.safetensors``
    name with safetensors, any other with ``torch.save`` (optionally as ``{wrap: state_dict}``), in the
    test's ``tmp_path``.
    """
    import torch
    from safetensors.torch import save_file

    def make(
        filename: str = "tiny.safetensors",
        *,
        encoder: str = TINY_ENCODER,
        seed: int = 0,
        layer_scale: float | None = 1.0,
        wrap: str | None = None,
    ) -> Path:
        state_dict = _tiny_encoder(encoder, seed, layer_scale).backbone.state_dict()
        path = tmp_path / filename
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
        else:
            torch.save({wrap: state_dict} if wrap else state_dict, path)
        return path

    return make


def _linear_head(path: Path, dim: int, num_classes: int, prefix: str) -> Path:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(dim * 100 + num_classes)
    state = {
        prefix + "weight": torch.randn(num_classes, dim, generator=generator),
        prefix + "bias": torch.randn(num_classes, generator=generator),
    }
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture
def make_linear_head(tmp_path: Path):
    """Factory: save a linear head ``weight [classes, dim]``, ``bias [classes]`` and return the file's path.

    ``make_linear_head(filename, dim=32, num_classes=7, prefix="")``; ``.safetensors`` or ``torch.save``.
    """

    def make(filename: str = "head.safetensors", *, dim: int = 32, num_classes: int = 7, prefix: str = "") -> Path:
        return _linear_head(tmp_path / filename, dim, num_classes, prefix)

    return make


@pytest.fixture(scope="session")
def tiny_classifier_pack(tmp_path_factory: pytest.TempPathFactory):
    """A trained-kind classifier pack ``tiny``: ``test_vit_micro`` encoder + 7-class linear head.

    Made with ``add_model_pack`` from fixed-seed random weights (LayerScale gammas 1, so tiles give different
    embeddings). Shared by the session: tests that change it copy ``pack.path`` first.
    """
    from safetensors.torch import save_file

    from hepatoquant.pack_import import add_model_pack

    source = tmp_path_factory.mktemp("tiny_pack_source")
    checkpoint = source / "encoder.safetensors"
    state_dict = _tiny_encoder(TINY_ENCODER, 0, 1.0).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(checkpoint))
    head = _linear_head(source / "head.safetensors", 32, 7, "")
    return add_model_pack(
        checkpoint, encoder=TINY_ENCODER, name="tiny", models_dir=tmp_path_factory.mktemp("tiny_pack"), head=head
    )


@pytest.fixture(scope="session")
def qupath_kit():
    """QuPath 0.6.0's own code through ``../shared/qupath-kit`` (see ``tests/qupath_kit.py``)."""
    from qupath_kit import load_kit

    return load_kit()


@pytest.fixture()
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key, made with openssl, for the TLS tests."""
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key
