"""A generated patch dataset in the HepatoBench layout whose classes a probe can learn (tests and benchmarks).

Each class has its own stain colour and texture scale (H&E-like pinks and purples, blob sizes from fine to
coarse); every patch adds per-patch noise, so classes overlap a little but a working pipeline separates them
well above chance, and a broken one (labels shuffled, embeddings misaligned) cannot. ``metadata.csv`` gives each
patch a slide, so partitions are made by slide. Nothing here is tissue: never report accuracy on it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

__all__ = ["write_synthetic_patch_dataset"]

_STAINS = [(200, 80, 150), (230, 150, 190), (120, 60, 160), (170, 120, 120), (240, 180, 200), (150, 90, 190),
           (250, 220, 230), (210, 110, 110), (110, 90, 130), (190, 160, 210)]


def write_synthetic_patch_dataset(root: str | Path, *, classes: tuple[str, ...] = ("TUM", "FIB", "INF", "NEC", "NOR",
                                  "REA", "STE"), per_class: int = 24, slides: int = 12, size_px: int = 150,
                                  seed: int = 0) -> Path:
    """Writes ``root/<class>/*.png``, ``dataset_meta.json`` and ``metadata.csv`` (relpath, slide); returns root."""
    if len(classes) > len(_STAINS):
        raise ValueError(f"at most {len(_STAINS)} classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for index, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        stain = np.array(_STAINS[index], dtype=np.float32)
        blob = 2 + 3 * index  # texture scale in pixels: each class its own
        for n in range(per_class):
            noise = rng.normal(0, 1, (size_px // blob + 2, size_px // blob + 2)).astype(np.float32)
            texture = cv2.resize(noise, (size_px, size_px), interpolation=cv2.INTER_CUBIC)
            shade = rng.normal(0, 12, 3).astype(np.float32)  # per-patch stain variation
            pixels = stain[None, None, :] + shade + 40 * texture[..., None] * np.array([1.0, 0.7, 0.5], np.float32)
            pixels += rng.normal(0, 8, pixels.shape).astype(np.float32)  # sensor noise: no patch is blank or flat
            relpath = f"{label}/{label}-{n:04d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / relpath)
            rows.append((relpath, f"slide-{rng.integers(slides):02d}"))
    (root / "dataset_meta.json").write_text(json.dumps({
        "name": "synthetic-patches", "classes": list(classes), "patch_size_px": size_px, "mpp_um_px": 0.5,
        "description": "generated, class-dependent colour and texture; not tissue",
    }, indent=2) + "\n")
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["relpath", "slide"])
        writer.writerows(rows)
    return root
