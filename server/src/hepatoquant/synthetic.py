"""Synthetic H&E-like pyramidal TIFF slides for tests, benchmarks and the demo when no real slide is at hand.

Pixels are computed block by block from analytic shapes (ellipses of tissue on white glass, nuclei on a
jittered lattice), so a slide of any size is written without ever holding a level in memory. OpenSlide reads
the result as a generic tiled TIFF, with MPP from the TIFF resolution tags unless ``mpp_um_px`` is None.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

__all__ = ["Ellipse", "SyntheticSlideSpec", "write_synthetic_slide", "default_tissue"]

_TILE_PX = 256
_GLASS_RGB = (243, 241, 244)
_EOSIN_RGB = (232, 160, 196)
_NUCLEUS_RGB = (95, 60, 150)
_TUMOUR_EOSIN_RGB = (200, 120, 180)


@dataclass(frozen=True)
class Ellipse:
    """An axis-aligned ellipse in level-0 pixels: centre (cx, cy), radii (rx, ry)."""

    cx: float
    cy: float
    rx: float
    ry: float

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2 <= 1.0


def default_tissue(width: int, height: int) -> tuple[Ellipse, ...]:
    """Two tissue pieces covering about a third of the slide."""
    return (
        Ellipse(width * 0.35, height * 0.45, width * 0.25, height * 0.3),
        Ellipse(width * 0.72, height * 0.62, width * 0.17, height * 0.22),
    )


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """Size in level-0 px, pixel size (None: no MPP in the file), tissue shapes and "tumour" shapes.

    Tumour areas (inside tissue) have darker stroma and denser, larger nuclei: a texture a segmenter can learn.
    """

    width_px: int = 2048
    height_px: int = 2048
    mpp_um_px: float | None = 0.5
    tissue: tuple[Ellipse, ...] | None = None
    tumour: tuple[Ellipse, ...] = field(default_factory=tuple)
    seed: int = 0

    def tissue_shapes(self) -> tuple[Ellipse, ...]:
        return self.tissue if self.tissue is not None else default_tissue(self.width_px, self.height_px)


def _hash01(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random numbers in [0, 1) from integer lattice coordinates."""
    h = (a.astype(np.uint64) * np.uint64(73856093)) ^ (b.astype(np.uint64) * np.uint64(19349663))
    h ^= np.uint64(seed * 83492791 + 1)
    h = (h * np.uint64(2654435761)) % np.uint64(4294967296)
    return h.astype(np.float64) / 4294967296.0


def render_block(spec: SyntheticSlideSpec, x0: float, y0: float, width: int, height: int, downsample: float) -> np.ndarray:
    """RGB pixels of a block at ``downsample``, top-left at level-0 (x0, y0)."""
    xs = x0 + (np.arange(width) + 0.5) * downsample
    ys = y0 + (np.arange(height) + 0.5) * downsample
    x, y = np.meshgrid(xs, ys)
    tissue = np.zeros(x.shape, dtype=bool)
    for ellipse in spec.tissue_shapes():
        tissue |= ellipse.contains(x, y)
    tumour = np.zeros(x.shape, dtype=bool)
    for ellipse in spec.tumour:
        tumour |= ellipse.contains(x, y)
    tumour &= tissue

    # Nuclei: one per lattice cell, at a pseudo-random offset; denser and larger in tumour.
    def nuclei(cell_px: float, radius_px: float) -> np.ndarray:
        cx, cy = np.floor(x / cell_px), np.floor(y / cell_px)
        ox = (0.25 + 0.5 * _hash01(cx, cy, spec.seed)) * cell_px
        oy = (0.25 + 0.5 * _hash01(cy, cx, spec.seed + 7)) * cell_px
        return (x - cx * cell_px - ox) ** 2 + (y - cy * cell_px - oy) ** 2 <= radius_px**2

    normal_nuclei = nuclei(24.0, 4.0)
    tumour_nuclei = nuclei(14.0, 5.0)
    noise = (_hash01(np.floor(x), np.floor(y), spec.seed + 3) - 0.5) * 16.0

    rgb = np.empty(x.shape + (3,), dtype=np.float64)
    rgb[:] = _GLASS_RGB
    rgb[tissue] = _EOSIN_RGB
    rgb[tumour] = _TUMOUR_EOSIN_RGB
    rgb[tissue & ~tumour & normal_nuclei] = _NUCLEUS_RGB
    rgb[tumour & tumour_nuclei] = _NUCLEUS_RGB
    rgb += noise[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _tiles(spec: SyntheticSlideSpec, downsample: int, level_w: int, level_h: int) -> Iterator[np.ndarray]:
    for ty in range(0, level_h, _TILE_PX):
        for tx in range(0, level_w, _TILE_PX):
            yield render_block(spec, tx * downsample, ty * downsample, _TILE_PX, _TILE_PX, downsample)


def write_synthetic_slide(path: str | Path, spec: SyntheticSlideSpec = SyntheticSlideSpec()) -> Path:
    """Write a tiled, pyramidal (downsamples 1, 4, 16, ...) TIFF; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    downsample = 1
    with tifffile.TiffWriter(path, bigtiff=spec.width_px * spec.height_px * 3 > 2**31) as writer:
        while True:
            level_w, level_h = spec.width_px // downsample, spec.height_px // downsample
            options: dict = {}
            if spec.mpp_um_px is not None:
                pixels_per_cm = 1e4 / (spec.mpp_um_px * downsample)
                options = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
            writer.write(
                _tiles(spec, downsample, level_w, level_h),
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(_TILE_PX, _TILE_PX),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if downsample == 1 else 1,
                **options,
            )
            if max(level_w, level_h) <= 1024:
                break
            downsample *= 4
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic H&E-like pyramidal TIFF slide")
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", type=int, default=4096, help="width and height in px")
    parser.add_argument("--mpp", type=float, default=0.5)
    args = parser.parse_args(argv)
    size = args.size
    spec = SyntheticSlideSpec(
        width_px=size, height_px=size, mpp_um_px=args.mpp, tumour=(Ellipse(size * 0.3, size * 0.4, size * 0.1, size * 0.12),)
    )
    print(write_synthetic_slide(args.path, spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
