"""Whole-slide image access through OpenSlide: metadata, pixel size, and reads from the best pyramid level.

All locations are level-0 pixel coordinates (x right, y down), the space QuPath uses for objects; all sizes
are (width, height). Reads never touch more than the requested region, so nothing here holds a whole slide.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import openslide

from hepatoquant.errors import CorruptSlideError, InvalidParameterError, MissingMPPError, UnsupportedSlideError
from hepatoquant.input_checks import MPP_RANGE_UM_PX, require_slide_file, validate_mpp

__all__ = ["Slide", "SlideInfo", "MPP_RANGE_UM_PX", "validate_mpp"]

# A pyramid level whose downsample exceeds the wanted one by less than this still counts as "not coarser".
_LEVEL_TOLERANCE = 1.01
# Largest region (pixels per side at the level read) fetched at once when scaling big areas down: 2048 px
# RGBA is 16 MiB, whatever the slide's size or pyramid.
_MAX_READ_SIDE_PX = 2048
_MAX_RUN_PX = 8192  # widest run of boxes read at once (Slide.read_scaled_boxes): 8192 x 150 px is 4.7 MB of RGBA

_CONVERT_HINT = (
    "convert it to a tiled pyramidal TIFF or SVS (e.g. `vips tiffsave IN OUT.tif --tile --pyramid "
    "--compression jpeg`) or export it from the scanner software in a format OpenSlide reads "
    "(Aperio SVS, Hamamatsu NDPI, Leica SCN, MIRAX, Philips TIFF, Ventana BIF, generic tiled TIFF)"
)


def _open_error(path: Path, exc: Exception) -> CorruptSlideError | UnsupportedSlideError:
    """Why OpenSlide could not open a file it recognised. A format OpenSlide detects but cannot read is most
    often a file that lacks what OpenSlide needs (a DICOM without the whole-slide attributes, a vendor file
    without its companion folder), not a damaged one: say so, with OpenSlide's own words."""
    detail = " ".join(str(exc).split())
    vendor = openslide.OpenSlide.detect_format(str(path))
    if vendor == "dicom":
        return UnsupportedSlideError(
            f"slide {str(path)!r} is a DICOM file OpenSlide cannot read as a whole-slide image ({detail}): OpenSlide "
            "reads DICOM WSI (VL Whole Slide Microscopy Image objects with ImageType, NumberOfFrames and the total "
            "pixel matrix attributes, all instances of the series in one folder). Export it again as DICOM WSI "
            f"from the scanner or converter (e.g. wsidicomizer), or {_CONVERT_HINT}"
        )
    if vendor is not None:
        return CorruptSlideError(
            f"slide {str(path)!r} looks like a {vendor} slide but OpenSlide could not open it ({detail}). Check "
            "that any companion files or folder the format needs sit beside it (MIRAX: the .mrxs and its folder; "
            "Hamamatsu VMS: all its files), and that its size matches the original (an interrupted copy), or "
            + _CONVERT_HINT
        )
    return CorruptSlideError(
        f"slide {str(path)!r} could not be opened ({detail}); the file may be truncated or damaged: copy it "
        "again from the scanner or archive"
    )


@dataclass(frozen=True)
class SlideInfo:
    """What reports record about a slide (no pixels)."""

    path: str
    vendor: str | None
    width_px: int
    height_px: int
    level_count: int
    level_downsamples: tuple[float, ...]
    mpp_um_px: float
    mpp_source: str  # "override" or "metadata"
    objective_power: float | None
    associated_images: tuple[str, ...]
    file_size_bytes: int


class Slide:
    """An open whole-slide image. Use as a context manager, or call :meth:`close`.

    ``mpp_override_um_px`` (from ``--mpp`` or a request field) wins over the slide's metadata; without either
    :attr:`mpp_um_px` raises :class:`MissingMPPError` rather than guessing.
    """

    def __init__(self, path: str | os.PathLike[str], *, mpp_override_um_px: float | None = None) -> None:
        self.path = Path(path)
        if mpp_override_um_px is not None:
            validate_mpp(mpp_override_um_px, what="--mpp")
        self._mpp_override = mpp_override_um_px
        require_slide_file(self.path)
        try:
            self._osr = openslide.OpenSlide(str(self.path))
            # Read the pyramid geometry once: after a failed read OpenSlide refuses every further call on the
            # handle, and level choice must still work so that the next read reports CorruptSlideError.
            self._level_dimensions = tuple(tuple(dims) for dims in self._osr.level_dimensions)
            self._level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedSlideError(
                f"slide {str(self.path)!r} is not a whole-slide format OpenSlide can read (a plain, untiled "
                f"TIFF, a DICOM file, a non-image file, or a copy truncated in transfer: compare its size with "
                f"the original); {_CONVERT_HINT}"
            ) from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise _open_error(self.path, exc) from exc

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self._level_dimensions[0]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    @property
    def vendor(self) -> str | None:
        return self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR)

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(self._osr.associated_images.keys())

    @cached_property
    def mpp_um_px(self) -> float:
        """Level-0 pixel size in micrometres: the override, else the metadata, else an error."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        props = self._osr.properties
        try:
            mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
            mpp_y = float(props[openslide.PROPERTY_NAME_MPP_Y])
        except (KeyError, ValueError):
            raise MissingMPPError(str(self.path)) from None
        if abs(mpp_x - mpp_y) > 0.02 * max(mpp_x, mpp_y):
            raise InvalidParameterError(
                f"slide {str(self.path)!r} has non-square pixels (mpp-x {mpp_x}, mpp-y {mpp_y}); "
                "HepatoQuant needs square pixels: pass --mpp to state the pixel size to use"
            )
        return validate_mpp((mpp_x + mpp_y) / 2, what=f"the MPP in the metadata of {str(self.path)!r}")

    @property
    def mpp_source(self) -> str:
        return "override" if self._mpp_override is not None else "metadata"

    def info(self) -> SlideInfo:
        power = self._osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        try:
            objective_power = float(power) if power is not None else None
        except ValueError:
            objective_power = None
        width, height = self.dimensions
        return SlideInfo(
            path=str(self.path),
            vendor=self.vendor,
            width_px=width,
            height_px=height,
            level_count=len(self.level_downsamples),
            level_downsamples=self.level_downsamples,
            mpp_um_px=self.mpp_um_px,
            mpp_source=self.mpp_source,
            objective_power=objective_power,
            associated_images=self.associated_image_names,
            file_size_bytes=self.path.stat().st_size,
        )

    # -- pixels ------------------------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample not coarser than ``downsample`` (level 0 if none is)."""
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * _LEVEL_TOLERANCE:
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (height, width, 3) of ``size`` pixels at ``level``, top-left at level-0 ``location``.

        Transparent pixels (outside the scanned area) are composited onto white, as they look on glass.
        """
        try:
            rgba = np.asarray(self._osr.read_region(location, level, size))
        except openslide.OpenSlideError as exc:
            raise CorruptSlideError(
                f"slide {str(self.path)!r}: reading {size} px at level {level}, location {location} failed "
                f"({exc}); the file may be truncated or damaged: copy it again from the scanner or archive"
            ) from exc
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        weight = alpha[..., None].astype(np.float32) / 255.0
        return (rgb * weight + 255.0 * (1.0 - weight)).astype(np.uint8)

    def read_scaled(
        self, location: tuple[float, float], size_level0: tuple[float, float], out_size: tuple[int, int]
    ) -> np.ndarray:
        """RGB array of ``out_size`` showing the level-0 box at ``location`` of ``size_level0``.

        Reads from the best pyramid level for the needed downsample and resizes (area interpolation when
        shrinking, so fine detail is averaged rather than aliased).
        """
        out_w, out_h = out_size
        downsample = min(size_level0[0] / out_w, size_level0[1] / out_h)
        level = self.best_level(downsample)
        level_downsample = self.level_downsamples[level]
        x0, y0 = int(round(location[0])), int(round(location[1]))
        read_w = max(1, int(round(size_level0[0] / level_downsample)))
        read_h = max(1, int(round(size_level0[1] / level_downsample)))
        pixels = self.read_region((x0, y0), level, (read_w, read_h))
        if (read_w, read_h) == (out_w, out_h):
            return pixels
        shrinking = read_w > out_w
        return cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)

    def read_scaled_boxes(
        self, xs: np.ndarray, ys: np.ndarray, size_level0: float, out_px: int
    ) -> Iterator[np.ndarray]:
        """``read_scaled`` of the square level-0 boxes at ``(xs, ys)``, in order, pixel for pixel the same, with
        one read per run of boxes along a row that overlap, touch or leave gaps of under a quarter box (tiles on a
        0.499 um/px slide are 150.3 px apart: whole-pixel steps of 150 and 151) (tiles and windows come in row
        order): each
        decoded slide tile is then read once per run instead of once per box, and OpenSlide is called once.
        A box joins a run only where its offset is whole pixels of the level read, so cutting it out of the run
        gives exactly what a read of its own would (OpenSlide interpolates at fractional level positions)."""
        level = self.best_level(size_level0 / out_px)
        downsample = self.level_downsamples[level]
        read_px = max(1, int(round(size_level0 / downsample)))
        left, top = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
        start = 0
        while start < len(xs):
            stop = start + 1
            while stop < len(xs) and top[stop] == top[start]:
                step = (left[stop] - left[stop - 1]) / downsample
                offset = (left[stop] - left[start]) / downsample
                if not (0 < step <= 1.25 * read_px and offset == round(offset) and offset + read_px <= _MAX_RUN_PX):
                    break
                stop += 1
            if stop - start == 1:
                yield self.read_scaled((xs[start], ys[start]), (size_level0, size_level0), (out_px, out_px))
            else:
                width = int(round((left[stop - 1] - left[start]) / downsample)) + read_px
                run = self.read_region((int(left[start]), int(top[start])), level, (width, read_px))
                for index in range(start, stop):
                    offset = int(round((left[index] - left[start]) / downsample))
                    box = run[:, offset : offset + read_px]
                    yield box if read_px == out_px else cv2.resize(
                        box, (out_px, out_px), interpolation=cv2.INTER_AREA if read_px > out_px else cv2.INTER_LINEAR)
            start = stop

    def read_overview(self, spacing_um_px: float) -> np.ndarray:
        """The whole slide as an RGB array at ``spacing_um_px`` (coarser than level 0), read block by block.

        Used for tissue detection and overlays; memory is that of the output plus one block, whatever the
        slide's size or number of pyramid levels.
        """
        scale = spacing_um_px / self.mpp_um_px  # level-0 pixels per output pixel
        if scale < 1:
            raise InvalidParameterError(
                f"overview spacing {spacing_um_px} um/px is finer than the slide's {self.mpp_um_px} um/px"
            )
        width, height = self.dimensions
        out_w, out_h = max(1, int(width / scale)), max(1, int(height / scale))
        read_px_per_out_px = scale / self.level_downsamples[self.best_level(scale)]
        block_side_out_px = max(8, int(_MAX_READ_SIDE_PX / read_px_per_out_px))
        overview = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for bx, by, bw, bh in _blocks(out_w, out_h, block_side_out_px):
            overview[by : by + bh, bx : bx + bw] = self.read_scaled(
                (bx * scale, by * scale), (bw * scale, bh * scale), (bw, bh)
            )
        return overview


def _blocks(width: int, height: int, side: int) -> Iterator[tuple[int, int, int, int]]:
    """(x, y, width, height) blocks of at most ``side`` px covering a ``width`` x ``height`` raster."""
    for y in range(0, height, side):
        for x in range(0, width, side):
            yield x, y, min(side, width - x), min(side, height - y)
