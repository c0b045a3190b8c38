"""Frozen-encoder embeddings of a split's patches, cached on disk and resumable.

The encoder comes from a model pack (``hepatoquant models add WEIGHTS --encoder uni --name uni`` makes one from
a local checkpoint), with its own preprocessing: each patch is resized to the encoder's input size (bicubic, as
timm's pathology encoders are configured), scaled and normalised with the pack's mean and std. Patches are decoded
and resized by a thread pool while the model runs (OpenCV and PIL release the GIL), batched, under
``torch.inference_mode`` and autocast at the precision policy's choice (:mod:`hepatoquant.precision`).

The cache, ``CACHE/<pack>/<split>/``, holds ``cache.json`` (the encoder, its weights' SHA-256, the preprocessing
and the exact patch list) and shards of 1024 embeddings. A run with a complete cache loads it without building
the encoder; an interrupted run computes only the missing shards; a cache made by another encoder, other
weights, other preprocessing or another patch list is an error, never reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from hepatoquant import __version__
from hepatoquant.bench.dataset import DatasetError, Patch, PatchDataset, read_rgb
from hepatoquant.classify import normalisation_buffers, normalise_uint8_nhwc
from hepatoquant.encoders import Encoder, create_encoder, encoder_config
from hepatoquant.model_pack import ModelPack, file_sha256
from hepatoquant.precision import autocast_for, resolve_precision

__all__ = ["SHARD_SIZE", "Embeddings", "CacheMismatchError", "extract_embeddings", "preprocessing_record"]

SHARD_SIZE = 1024
CACHE_FORMAT = 1
RESIZE = "bicubic (cv2.INTER_CUBIC) to the encoder's input size"

ProgressCallback = Callable[[int, int], object]


class CacheMismatchError(DatasetError):
    """An embedding cache made with another encoder, weights, preprocessing or patch list."""


@dataclass(frozen=True)
class Embeddings:
    """A split's embeddings (n, dim) float32, labels (n,) as class indices, and the patches in the same order."""

    vectors: np.ndarray
    labels: np.ndarray
    relpaths: tuple[str, ...]
    record: dict
    seconds: float  # spent computing (0 when everything came from the cache)
    computed: int  # patches embedded in this run


def preprocessing_record(pack: ModelPack) -> dict:
    """What makes embeddings comparable: the encoder, its exact weights and how pixels reach it."""
    config = encoder_config(pack.encoder_name)
    weights_sha256 = pack.manifest["encoder"].get("sha256") or file_sha256(pack.encoder_weights)
    return {
        "encoder": pack.encoder_name,
        "pack": pack.name,
        "weights_sha256": weights_sha256,
        "embedding_dim": config.embedding_dim,
        "pooling": config.pooling,
        "input_size_px": pack.input_size_px,
        "resize": RESIZE,
        "mean": list(pack.mean),
        "std": list(pack.std),
    }


def _patch_list_sha256(patches: Sequence[Patch]) -> str:
    digest = hashlib.sha256()
    for p in patches:
        digest.update(f"{p.relpath}\t{p.label}\n".encode())
    return digest.hexdigest()


def _check_or_write_meta(folder: Path, meta: dict) -> None:
    path = folder / "cache.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        differing = sorted(k for k in set(meta) | set(existing) if k != "created_by" and meta.get(k) != existing.get(k))
        if differing:
            details = "; ".join(f"{k}: cache {existing.get(k)!r}, now {meta.get(k)!r}" for k in differing[:4])
            raise CacheMismatchError(
                f"embedding cache {str(folder)!r} was made differently ({details}); use another --cache folder or "
                "delete this one (embeddings from another encoder or preprocessing must never be mixed)"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / ".cache.json.partial"
    temporary.write_text(json.dumps(meta, indent=2) + "\n")
    temporary.replace(path)


def extract_embeddings(
    dataset: PatchDataset,
    patches: Sequence[Patch],
    pack: ModelPack,
    cache_dir: str | Path,
    split: str,
    *,
    device: torch.device | None = None,
    batch_size: int = 64,
    workers: int = 4,
    progress: ProgressCallback | None = None,
    encoder: Encoder | None = None,
    precision: str = "auto",
) -> Embeddings:
    """The embeddings of ``patches`` (one split), from the cache where present, computing the missing shards.
    ``precision`` follows :mod:`hepatoquant.precision` and is part of the cache's record."""
    if not patches:
        raise DatasetError(f"split {split!r} has no patches; check the partition")
    device = device or torch.device("cpu")
    precision = resolve_precision(precision, device, encoder_config(pack.encoder_name).recommended_dtype)
    record = {**preprocessing_record(pack), "precision": precision}
    folder = Path(cache_dir) / pack.name / split
    meta = {"format_version": CACHE_FORMAT, **record, "dataset": str(dataset.root.resolve()), "split": split,
            "patches": len(patches), "patch_list_sha256": _patch_list_sha256(patches), "shard_size": SHARD_SIZE,
            "created_by": f"hepatoquant {__version__}"}
    _check_or_write_meta(folder, meta)
    shards = [(start, min(start + SHARD_SIZE, len(patches))) for start in range(0, len(patches), SHARD_SIZE)]
    missing = [(s, e) for s, e in shards if not (folder / _shard_name(s, e)).is_file()]
    started = time.perf_counter()
    if missing:
        model = encoder or create_encoder(pack.encoder_name, weights=pack.encoder_weights)
        model = model.to(device).eval().requires_grad_(False)
        done = len(patches) - sum(e - s for s, e in missing)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="patch-decode") as pool:
            for start, end in missing:
                vectors = _embed(model, dataset, patches[start:end], pack, device, batch_size, pool, precision)
                _save_shard(folder / _shard_name(start, end), vectors)
                done += end - start
                if progress is not None:
                    progress(done, len(patches))
    elif progress is not None:
        progress(len(patches), len(patches))
    seconds = time.perf_counter() - started if missing else 0.0
    vectors = np.concatenate([np.load(folder / _shard_name(s, e)) for s, e in shards])
    labels = np.array([dataset.classes.index(p.label) for p in patches], dtype=np.int64)
    return Embeddings(vectors, labels, tuple(p.relpath for p in patches), record, seconds,
                      sum(e - s for s, e in missing))


def _shard_name(start: int, end: int) -> str:
    return f"shard-{start:08d}-{end:08d}.npy"


def _save_shard(path: Path, vectors: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.partial.npy")
    np.save(temporary, vectors.astype(np.float32, copy=False))
    temporary.replace(path)


def decoded_batches(dataset: PatchDataset, patches: Sequence[Patch], size_px: int, batch_size: int,
                    pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """uint8 (batch, size, size, 3) arrays, decoded and resized by ``pool`` ahead of the consumer."""

    def load(patch: Patch) -> np.ndarray:
        pixels = read_rgb(dataset.path(patch))
        if pixels.shape[:2] != (size_px, size_px):
            pixels = cv2.resize(pixels, (size_px, size_px), interpolation=cv2.INTER_CUBIC)
        return pixels

    pending = pool.map(load, patches)  # submitted at once, consumed in order: decoding runs ahead of the model
    batch: list[np.ndarray] = []
    for pixels in pending:
        batch.append(pixels)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def _embed(model: Encoder, dataset: PatchDataset, patches: Sequence[Patch], pack: ModelPack, device: torch.device,
           batch_size: int, pool: ThreadPoolExecutor, precision: str) -> np.ndarray:
    mean_255, std_255 = (t.to(device) for t in normalisation_buffers(pack.mean, pack.std))
    outputs = []
    with torch.inference_mode(), autocast_for(device, precision):
        for batch in decoded_batches(dataset, patches, pack.input_size_px, batch_size, pool):
            tiles = torch.from_numpy(batch).to(device, non_blocking=True)
            outputs.append(model(normalise_uint8_nhwc(tiles, mean_255, std_255)).float().cpu().numpy())
    return np.concatenate(outputs)
