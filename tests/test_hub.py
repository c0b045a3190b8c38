"""Issue 21: `models add --from-hub` takes encoder weights from the Hugging Face Hub as users have them (a gated
repository, their token, the hub's cache, HF_HUB_OFFLINE), through huggingface_hub itself, against a local stand-in
for the hub's file endpoint (no network in tests) and a hub cache laid out as the hub lays it out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fake_hub import FakeHub, hub_environment, serving

from hepatoquant.encoders import create_encoder
from hepatoquant.hub import encoder_for_repository, hub_source
from hepatoquant.model_pack import load_model_pack

REPO = "hepatoquant-tests/vit-micro"


@pytest.fixture()
def weights(tmp_path: Path) -> bytes:
    torch.manual_seed(3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder("test_vit_micro").backbone.state_dict().items()}, str(path))
    return path.read_bytes()


@pytest.fixture()
def hub(weights: bytes):
    FakeHub.files, FakeHub.gated, FakeHub.requests = {REPO: {"model.safetensors": weights}}, {"MahmoodLab/UNI"}, []
    with serving() as endpoint:
        yield endpoint


def _add(tmp_path: Path, *args: str, endpoint: str = "http://127.0.0.1:9", offline: bool = False):
    env = hub_environment(tmp_path, endpoint, offline=offline)
    return subprocess.run([sys.executable, "-m", "hepatoquant.cli", "--models-dir", str(tmp_path / "models"),
                           "models", "add", *args], capture_output=True, text=True, env=env, timeout=300)


def test_weights_are_downloaded_once_then_the_cache_serves_them_even_offline(hub, tmp_path: Path, weights) -> None:
    first = _add(tmp_path, "--from-hub", REPO, "--hub-file", "model.safetensors", "--encoder", "test_vit_micro",
                 "--name", "from-hub", endpoint=hub)
    assert first.returncode == 0, first.stderr[-3000:]
    assert any(r.startswith("GET ") for r in FakeHub.requests)
    pack = load_model_pack(tmp_path / "models" / "from-hub")
    expected = load_file(str(tmp_path / "model.safetensors"))
    stored = load_file(str(pack.encoder_weights))
    assert set(stored) == set(expected) and all(torch.equal(stored[k], expected[k]) for k in expected)
    cached = list((tmp_path / "hub-cache").glob("models--hepatoquant-tests--vit-micro/snapshots/*/model.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == weights  # the hub's own cache layout
    FakeHub.requests.clear()
    second = _add(tmp_path, "--from-hub", REPO, "--hub-file", "model.safetensors", "--encoder", "test_vit_micro",
                  "--name", "offline", offline=True)  # no endpoint at all: the cache alone
    assert second.returncode == 0, second.stderr[-3000:]
    assert FakeHub.requests == [] and (tmp_path / "models" / "offline").is_dir()


@pytest.mark.parametrize(
    ("repo", "hub_file", "expected"),
    [
        ("MahmoodLab/UNI", "pytorch_model.bin", ["is gated", "request it on https://huggingface.co/MahmoodLab/UNI"]),
        ("nobody/nothing", "model.safetensors", ["not found on the hub", "HF_TOKEN"]),
        (REPO, "missing.bin", ["has no file 'missing.bin'", "--hub-file"]),
    ],
)
def test_hub_refusals_say_what_to_do(hub, tmp_path: Path, repo, hub_file, expected) -> None:
    run = _add(tmp_path, "--from-hub", repo, "--hub-file", hub_file, "--encoder", "test_vit_micro", "--name", "x",
               endpoint=hub)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert all(fragment in run.stderr for fragment in expected), run.stderr
    assert not (tmp_path / "models" / "x").exists()


def test_no_network_and_nothing_cached_says_so(tmp_path: Path) -> None:
    for offline in (True, False):  # HF_HUB_OFFLINE=1, and a hub that cannot be reached
        run = _add(tmp_path, "--from-hub", REPO, "--hub-file", "model.safetensors", "--encoder", "test_vit_micro",
                   "--name", "x", offline=offline)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert "not in the hub cache" in run.stderr and "HF_HUB_OFFLINE" in run.stderr, run.stderr


def test_the_encoder_is_found_from_the_repository_and_bad_combinations_are_refused(tmp_path: Path) -> None:
    assert encoder_for_repository("MahmoodLab/UNI") == "uni" and hub_source("uni") == ("MahmoodLab/UNI", "pytorch_model.bin")
    assert encoder_for_repository("paige-ai/Virchow2") == "virchow2"
    zoo = {"MahmoodLab/UNI2-h": ("uni2_h", "pytorch_model.bin"), "paige-ai/Virchow": ("virchow", "pytorch_model.bin"),
           "owkin/phikon": ("phikon", "model.safetensors"), "owkin/phikon-v2": ("phikon_v2", "model.safetensors"),
           "bioptimus/H-optimus-0": ("hoptimus0", "pytorch_model.bin"),
           "bioptimus/H-optimus-1": ("hoptimus1", "pytorch_model.bin"),
           "MahmoodLab/conchv1_5": ("conch_v15", "pytorch_model_vision.bin"),
           "1aurent/vit_small_patch8_224.lunit_dino": ("lunit_vits8", "model.safetensors")}
    for repository, (encoder, filename) in zoo.items():  # issue 21's zoo: the file each repository publishes
        assert encoder_for_repository(repository) == encoder and hub_source(encoder) == (repository, filename)
    with pytest.raises(Exception, match="no registered encoder"):
        encoder_for_repository("someone/else")
    neither = _add(tmp_path, "--name", "x")
    assert neither.returncode == 2 and "--from-hub" in neither.stderr
    both = _add(tmp_path, str(tmp_path / "w.bin"), "--from-hub", REPO, "--name", "x")
    assert both.returncode == 2 and "one of them" in both.stderr
