"""Patch classification: a pack's encoder and linear head over uint8 tiles, batch by batch."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hepatoquant.classify import BatchPrediction, PatchClassifier, choose_device, load_classifier, predict_batches
from hepatoquant.encoders import create_encoder
from hepatoquant.errors import InvalidParameterError, ModelPackError
from hepatoquant.model_pack import MANIFEST_NAME, ModelPack, load_head_weights, load_model_pack
from hepatoquant.pack_import import add_model_pack

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Batch:
    """What the tile reader hands over: the first tile's index and uint8 (batch, height, width, 3) pixels."""

    start: int
    pixels: np.ndarray


def _tiles(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _manual(pack: ModelPack, tiles_uint8_nhwc: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and embeddings computed step by step: scale, normalise, encoder, head, softmax."""
    x = torch.from_numpy(tiles_uint8_nhwc).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(pack.mean).view(1, 3, 1, 1)
    std = torch.tensor(pack.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    encoder = create_encoder(pack.encoder_name, weights=pack.encoder_weights)
    head = load_file(str(pack.head_weights))
    with torch.no_grad():
        embeddings = encoder(x)
        logits = embeddings @ head["weight"].T + head["bias"]
    return torch.softmax(logits, dim=1), embeddings


@pytest.fixture(scope="module")
def classifier(tiny_classifier_pack: ModelPack) -> PatchClassifier:
    return load_classifier(tiny_classifier_pack, CPU)


def test_load_classifier_builds_a_frozen_model_from_the_pack(tiny_classifier_pack: ModelPack, classifier) -> None:
    assert isinstance(classifier, PatchClassifier)
    assert classifier.classes == tiny_classifier_pack.classes
    assert not classifier.training and not classifier.encoder.training
    assert not any(p.requires_grad for p in classifier.parameters())
    assert all(p.device.type == "cpu" for p in classifier.parameters())
    head = load_file(str(tiny_classifier_pack.head_weights))
    assert torch.equal(classifier.head.weight, head["weight"]) and torch.equal(classifier.head.bias, head["bias"])
    stored = load_file(str(tiny_classifier_pack.encoder_weights))
    loaded = classifier.encoder.backbone.state_dict()
    assert set(loaded) == set(stored) and all(torch.equal(loaded[k], stored[k]) for k in stored)


def test_classifier_on_uint8_tiles_matches_a_manual_computation(tiny_classifier_pack: ModelPack, classifier) -> None:
    tiles = _tiles(5, tiny_classifier_pack.input_size_px, seed=0)
    with torch.no_grad():
        logits, embeddings = classifier(torch.from_numpy(tiles))
    probabilities = torch.softmax(logits, dim=1)
    assert tuple(probabilities.shape) == (5, len(tiny_classifier_pack.classes))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5))
    expected_probabilities, expected_embeddings = _manual(tiny_classifier_pack, tiles)
    torch.testing.assert_close(embeddings, expected_embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probabilities, expected_probabilities, rtol=1e-4, atol=1e-6)
    # Normalisation matters: skipping it would give other probabilities.
    unnormalised = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        wrong = torch.softmax(classifier.head(classifier.encoder(unnormalised)), dim=1)
    assert not torch.allclose(wrong, expected_probabilities, atol=1e-4)


def test_predict_batches_keeps_order_and_starts(tiny_classifier_pack: ModelPack, classifier) -> None:
    size = tiny_classifier_pack.input_size_px
    batches = [Batch(0, _tiles(3, size, 1)), Batch(3, _tiles(5, size, 2)), Batch(8, _tiles(1, size, 3))]
    results = list(predict_batches(classifier, iter(batches), CPU))
    assert [r.start for r in results] == [0, 3, 8]
    for batch, result in zip(batches, results, strict=True):
        assert isinstance(result, BatchPrediction)
        assert isinstance(result.probabilities, np.ndarray) and result.probabilities.dtype == np.float32
        assert result.probabilities.shape == (len(batch.pixels), len(tiny_classifier_pack.classes))
        np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert result.embeddings is None
        expected, _ = _manual(tiny_classifier_pack, batch.pixels)
        np.testing.assert_allclose(result.probabilities, expected.numpy(), rtol=1e-4, atol=1e-6)
    # Each tile's result does not depend on how tiles are batched.
    together = next(predict_batches(classifier, [Batch(0, np.concatenate([b.pixels for b in batches]))], CPU))
    np.testing.assert_allclose(
        np.concatenate([r.probabilities for r in results]), together.probabilities, rtol=1e-4, atol=1e-6
    )


def test_the_next_batch_is_launched_before_a_batchs_results_are_fetched(tiny_classifier_pack: ModelPack,
                                                                        classifier) -> None:
    """On a GPU kernels run asynchronously: launching batch k + 1 before waiting for batch k's results keeps the
    GPU busy while this thread waits and reads. The order is the same on a CPU, where it is observable."""
    size = tiny_classifier_pack.input_size_px
    events: list[str] = []

    def model(tiles):
        events.append(f"launch {len(tiles)}")
        return classifier(tiles)

    def reading():
        for start, count in ((0, 2), (2, 3), (5, 4)):
            events.append(f"read {count}")
            yield Batch(start, _tiles(count, size, start))

    for prediction in predict_batches(model, reading(), CPU):
        events.append(f"result {len(prediction.probabilities)}")
    assert events == ["read 2", "launch 2", "read 3", "launch 3", "result 2", "read 4", "launch 4", "result 3",
                      "result 4"]


def test_predict_batches_keeps_embeddings_when_asked(tiny_classifier_pack: ModelPack, classifier) -> None:
    tiles = _tiles(4, tiny_classifier_pack.input_size_px, 4)
    (result,) = predict_batches(classifier, [Batch(10, tiles)], CPU, keep_embeddings=True)
    assert result.start == 10
    assert result.embeddings is not None and result.embeddings.dtype == np.float32
    assert result.embeddings.shape == (4, classifier.encoder.config.embedding_dim)
    _, expected = _manual(tiny_classifier_pack, tiles)
    np.testing.assert_allclose(result.embeddings, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_predict_batches_is_lazy(classifier) -> None:
    def never():
        raise AssertionError("batches were read before results were asked for")
        yield

    predictions = predict_batches(classifier, never(), CPU)  # no batch read yet
    with pytest.raises(AssertionError, match="batches were read"):
        next(predictions)


def test_classifier_with_a_registered_encoder_pack(tmp_path: Path, make_tiny_checkpoint, make_linear_head) -> None:
    """A pack made with `models add` (not the demo) classifies the same way."""
    pack = add_model_pack(
        make_tiny_checkpoint("enc.bin", seed=9), encoder="test_vit_micro", name="added",
        models_dir=tmp_path, head=make_linear_head(dim=32),
    )
    model = load_classifier(pack, CPU)
    tiles = _tiles(3, pack.input_size_px, 5)
    (result,) = predict_batches(model, [Batch(0, tiles)], CPU)
    expected, _ = _manual(pack, tiles)
    np.testing.assert_allclose(result.probabilities, expected.numpy(), rtol=1e-4, atol=1e-6)


def test_an_encoder_pack_is_not_a_classifier(tmp_path: Path, make_tiny_checkpoint) -> None:
    pack = add_model_pack(make_tiny_checkpoint(), encoder="test_vit_micro", name="enc-only", models_dir=tmp_path)
    with pytest.raises(ModelPackError) as info:
        load_classifier(pack, CPU)
    assert "'enc-only'" in str(info.value) and "encoder pack" in str(info.value)
    with pytest.raises(ModelPackError, match="without a classifier head"):
        load_head_weights(pack)


def test_a_head_that_does_not_fit_the_manifest_classes(tmp_path: Path, tiny_classifier_pack: ModelPack) -> None:
    """A hand-edited manifest with 3 classes but the 7-class head: our error, not a torch traceback."""
    pack_dir = tmp_path / "edited"
    shutil.copytree(tiny_classifier_pack.path, pack_dir)
    manifest = json.loads((pack_dir / MANIFEST_NAME).read_text())
    manifest["classes"] = ["TUM", "NOR", "STE"]
    (pack_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelPackError) as info:
        load_classifier(load_model_pack(pack_dir), CPU)
    message = str(info.value)
    assert str(pack_dir) in message and "head" in message
    assert "(3, 32)" in message and "(7, 32)" in message


# --- devices -----------------------------------------------------------------------------------------------


def test_choose_device_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == CPU
    assert choose_device() == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto").type == "cuda"


def test_choose_device_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("cpu") == CPU
    for requested in ("cuda", "cuda:1"):
        with pytest.raises(InvalidParameterError) as info:
            choose_device(requested)
        assert requested in str(info.value) and "--device cpu" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present; this checks the behaviour without one (patched in the test above)")
def test_cuda_without_cuda_is_an_error_here() -> None:
    assert choose_device("auto") == CPU
    with pytest.raises(InvalidParameterError):
        choose_device("cuda")


@pytest.mark.parametrize("requested", ["gpu", "cuda:x", ""])
def test_choose_device_refuses_unknown_names(requested: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        choose_device(requested)
    assert repr(requested) in str(info.value) or requested in str(info.value)
