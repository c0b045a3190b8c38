"""Tile embeddings in the HDF5 layout that CLAM- and TRIDENT-style MIL code reads.

``features`` [N, D] float32 and ``coords`` [N, 2] int64 (each tile's top-left corner in level-0 pixels, x then
y), with the attributes those tools read on ``coords``: ``patch_size`` (the tile's side at its own resolution),
``patch_size_level0``, ``patch_level`` (0: the coordinates' level), the magnifications and the slide's size.
Beside them, what MIL code needs to know what it holds: ``probabilities`` [N, classes] and attributes naming
the classes, the encoder and the pixel sizes in um/px.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from hepatoquant.analysis import AnalysisResult

__all__ = ["write_features_h5"]


def _magnification(um_per_px: float) -> int:
    """The objective magnification that conventionally gives ``um_per_px`` (20x = 0.5 um/px)."""
    return int(round(10.0 / um_per_px))


def write_features_h5(result: AnalysisResult, path: Path) -> None:
    if result.embeddings is None:
        raise ValueError("the analysis kept no embeddings (--save-embeddings)")
    grid, tile = result.grid, result.options.tile
    with h5py.File(path, "w") as out:
        out.create_dataset("features", data=np.asarray(result.embeddings, dtype=np.float32))
        corners = np.stack([grid.x_level0_px, grid.y_level0_px], axis=1)
        coords = out.create_dataset("coords", data=np.rint(corners).astype(np.int64))
        coords.attrs.update({
            "patch_size": int(tile.tile_size_px),
            "patch_size_level0": int(round(grid.size_level0_px)),
            "patch_level": 0,
            "level0_magnification": _magnification(result.slide.mpp_um_px),
            "target_magnification": _magnification(tile.spacing_um_px),
            "level0_mpp": float(result.slide.mpp_um_px),
            "target_mpp": float(tile.spacing_um_px),
            "level0_width": int(result.slide.width_px),
            "level0_height": int(result.slide.height_px),
            "overlap": 0,
            "name": Path(result.slide.path).stem,
        })
        out.create_dataset("probabilities", data=np.asarray(result.probabilities, dtype=np.float32))
        out.attrs.update({
            "classes": np.array(result.classes, dtype=h5py.string_dtype()),
            "encoder": str(result.model["encoder"]),
            "model_status": str(result.model["model_status"]),
            "source": "HepatoQuant",
        })
