"""Training data for the tumour / non-tumour segmenter: image / mask pairs, and windows cut from annotated slides.

Two sources give the same items, ``(image, mask)``: ``image`` a float tensor (3, S, S) normalised with the
model's mean / std, ``mask`` a long tensor (S, S) of labels 0 background, 1 non-tumour, 2 tumour, 255 ignore
(see :mod:`hepatoquant.segmentation`), with S the model's input size in pixels.

- :func:`load_pair_list` reads the PFM_Segmentation dataset list (``{"num_classes": 3, "data": {"train":
  [{"image_path": ..., "mask_path": ...}], "val": [...], "test": [...]}}``) and :class:`PairDataset` serves it.
- :class:`SlideWindowDataset` samples windows from whole slides with QuPath GeoJSON annotations, labelled from
  the annotations and the detected tissue, read at a fixed spacing (um/px) without ever loading a whole slide.

Augmentations (:func:`train_transforms`, :func:`eval_transforms`) transform image and mask together with
torchvision's ``transforms.v2``; masks are ``tv_tensors.Mask``, so colour changes skip them and they are always
resampled nearest-neighbour (``nearest-exact``: pixel centres aligned with the image's resampling).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from hepatoquant_client.classes import TUMOUR_REGION
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from hepatoquant.errors import InvalidParameterError
from hepatoquant.regions import DEFAULT_TUMOUR_CLASS_NAMES, regions_from_geojson
from hepatoquant.segmentation import BACKGROUND, IGNORE_INDEX, NON_TUMOUR, SEG_CLASS_NAMES, TUMOUR
from hepatoquant.segmentation.rasterize import rasterize_labels
from hepatoquant.slide import Slide
from hepatoquant.tissue import TissueDetectionParams, detect_tissue

__all__ = [
    "SPLITS",
    "PairTransform",
    "load_pair_list",
    "PairDataset",
    "SlideWindow",
    "SlideWindowDataset",
    "RandomRotate90",
    "train_transforms",
    "eval_transforms",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
VALID_LABELS: frozenset[int] = frozenset({BACKGROUND, NON_TUMOUR, TUMOUR, IGNORE_INDEX})
_LABELS_TEXT = ", ".join(f"{i} {name}" for i, name in enumerate(SEG_CLASS_NAMES)) + f", {IGNORE_INDEX} ignore"

_PathLike = str | os.PathLike[str]
PairTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]
"""A joint transform: (uint8 image (3, H, W), uint8 mask (H, W)) -> (float image (3, S, S), long mask (S, S))."""


# -- the PFM_Segmentation pair list ---------------------------------------------------------------------------


def load_pair_list(path: str | os.PathLike[str]) -> dict[str, list[tuple[Path, Path]]]:
    """(image, mask) paths per split (``train``, ``val``, ``test``; a split left out is empty) of a PFM list.

    Relative paths are resolved against the folder of the JSON file. ``num_classes`` must be 3 (background,
    non-tumour, tumour); every listed image and mask must exist.
    """
    file = Path(path)
    fix_paths = f"relative paths are resolved against the JSON file's folder {str(file.parent)!r}"
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidParameterError(f"dataset list {str(file)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(
            f"dataset list {str(file)!r} could not be read ({exc}); give a UTF-8 JSON file"
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(
            f"dataset list {str(file)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            'fix it: the format is {"num_classes": 3, "data": {"train": [{"image_path": ..., "mask_path": ...}], '
            '"val": [...], "test": [...]}}'
        ) from None
    if not isinstance(config, dict) or "num_classes" not in config or "data" not in config:
        found = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise InvalidParameterError(
            f"dataset list {str(file)!r} needs the keys 'num_classes' and 'data' at its top level (found "
            f'{found}); the format is {{"num_classes": 3, "data": {{"train": [...], "val": [...], "test": [...]}}}}'
        )
    num_classes = config["num_classes"]
    if isinstance(num_classes, bool) or num_classes != len(SEG_CLASS_NAMES):
        raise InvalidParameterError(
            f"dataset list {str(file)!r} has num_classes {num_classes!r}, but the segmenter has exactly "
            f"{len(SEG_CLASS_NAMES)} classes ({_LABELS_TEXT}); relabel the masks to these values and set "
            f'"num_classes": {len(SEG_CLASS_NAMES)}'
        )
    data = config["data"]
    if not isinstance(data, dict):
        raise InvalidParameterError(
            f"dataset list {str(file)!r}: 'data' must be an object of splits (train, val, test), not "
            f"{type(data).__name__}"
        )
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise InvalidParameterError(
            f"dataset list {str(file)!r}: unknown split(s) {', '.join(map(repr, unknown))} in 'data'; "
            f"use {', '.join(SPLITS)}"
        )
    pairs: dict[str, list[tuple[Path, Path]]] = {split: [] for split in SPLITS}
    missing: list[str] = []
    for split in SPLITS:
        entries = data.get(split, [])
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise InvalidParameterError(
                f"dataset list {str(file)!r}: data.{split} must be a list of "
                f'{{"image_path": ..., "mask_path": ...}} objects, not {type(entries).__name__}'
            )
        for index, entry in enumerate(entries):
            where = f"data.{split}[{index}]"
            paths = []
            for key in ("image_path", "mask_path"):
                value = entry.get(key) if isinstance(entry, dict) else None
                if not isinstance(value, str) or not value:
                    raise InvalidParameterError(
                        f"dataset list {str(file)!r}: entry {where} ({json.dumps(entry)[:200]}) has no {key!r}; "
                        'every entry needs "image_path" and "mask_path" (file paths as strings)'
                    )
                resolved = file.parent / value
                if not resolved.is_file():
                    missing.append(f"{where} {key.split('_')[0]} {str(resolved)!r}")
                paths.append(resolved)
            pairs[split].append((paths[0], paths[1]))
    if missing:
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise InvalidParameterError(
            f"dataset list {str(file)!r}: entry {missing[0]} does not exist{more}; fix the paths ({fix_paths})"
        )
    return pairs


class PairDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Image / mask pairs (e.g. one split of :func:`load_pair_list`) as ``(image, mask)`` items.

    ``transform`` is :func:`train_transforms` or :func:`eval_transforms` (or any joint transform with their
    contract); it resizes / crops to the model's input size and normalises the image. Each pair is checked
    when it is loaded: mask size must equal image size, and labels must be in {0, 1, 2, 255}.
    """

    def __init__(self, pairs: Sequence[tuple[_PathLike, _PathLike]], transform: PairTransform) -> None:
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The pair's pixels before any transform: RGB uint8 (H, W, 3) and labels uint8 (H, W), validated."""
        from PIL import Image  # torchvision's own dependency; imported here to keep module import light

        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as image_file:
            image = np.array(image_file.convert("RGB"))
        with Image.open(mask_path) as mask_file:
            mask_mode = mask_file.mode
            mask = np.array(mask_file)  # palette ("P") masks give their indices, which are the labels
        if mask.shape[:2] != image.shape[:2]:
            raise InvalidParameterError(
                f"mask {str(mask_path)!r} is {mask.shape[1]} x {mask.shape[0]} px but its image "
                f"{str(image_path)!r} is {image.shape[1]} x {image.shape[0]} px; a mask must have its image's "
                "size (one label per pixel): export them again at the same size"
            )
        if mask.ndim == 3:
            if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, mask.shape[2])):
                raise InvalidParameterError(
                    f"mask {str(mask_path)!r} is a colour ({mask_mode}) image; save masks as single-channel "
                    f"8-bit PNGs whose pixel values are the labels ({_LABELS_TEXT})"
                )
            mask = mask[..., 0]
        values = np.unique(mask)
        bad = sorted(int(v) for v in values if int(v) not in VALID_LABELS)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
            raise InvalidParameterError(
                f"mask {str(mask_path)!r} has label values {shown} outside {{{_LABELS_TEXT}}}; map them to "
                f"these labels (or to {IGNORE_INDEX} to ignore those pixels) and save the mask again"
            )
        return image, mask.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        return _apply(self.transform, image, mask)


# -- windows from annotated slides --------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideWindow:
    """One training window: the level-0 square at (x, y) of side ``side_level0_px`` on slide ``slide_index``."""

    slide_index: int
    x_level0_px: int
    y_level0_px: int
    side_level0_px: float


@dataclass(frozen=True)
class _SlideLabels:
    """What a dataset keeps per slide: where it is, and its label raster (pixel (i, j) covers level-0
    x in [j * downsample, (j + 1) * downsample), y likewise)."""

    path: Path
    mpp_override_um_px: float | None
    mpp_um_px: float
    size_px: tuple[int, int]
    labels: np.ndarray
    downsample: float


class SlideWindowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows sampled from whole slides annotated in QuPath, as ``(image, mask)`` items.

    ``slides``: (slide path, QuPath GeoJSON path[, MPP override in um/px]) per slide. Each window shows
    ``input_size_px`` pixels at ``window_spacing_um_px`` (a side of ``input_size_px * spacing / MPP`` level-0
    pixels) read from the best pyramid level. Labels: polygon annotations whose class is in
    ``tumour_class_names`` are 2 (tumour), other polygon annotations 1 (non-tumour), tumour drawn over
    non-tumour where they overlap; the rest of the detected tissue is 1 with ``rest_of_tissue="non_tumour"``
    or 255 (ignored) with ``"ignore"``; everything else is 0 (background).

    Each slide's labels are computed once, at ``label_spacing_um_px`` (the tissue-detection spacing), and
    sampled nearest-neighbour per window. Window positions are drawn once from ``seed`` (per slide, so adding
    a slide leaves the others' windows as they were): when a slide has tumour, at least half its windows
    contain tumour; the others lie anywhere on labelled tissue. Slides are opened lazily in each process that
    reads them (DataLoader workers included); the dataset pickles without open handles.
    """

    def __init__(
        self,
        slides: Sequence[tuple[_PathLike, _PathLike] | tuple[_PathLike, _PathLike, float | None]],
        *,
        input_size_px: int,
        windows_per_slide: int,
        transform: PairTransform,
        window_spacing_um_px: float = 2.0,
        rest_of_tissue: Literal["non_tumour", "ignore"] = "non_tumour",
        tumour_class_names: Sequence[str] = DEFAULT_TUMOUR_CLASS_NAMES,
        seed: int = 0,
        label_spacing_um_px: float = 8.0,
    ) -> None:
        if rest_of_tissue not in ("non_tumour", "ignore"):
            raise InvalidParameterError(
                f"rest_of_tissue {rest_of_tissue!r} is not an option; use 'non_tumour' (unannotated tissue is "
                "non-tumour) or 'ignore' (unannotated tissue is left out of the loss)"
            )
        if isinstance(input_size_px, bool) or not isinstance(input_size_px, int) or input_size_px < 8:
            raise InvalidParameterError(f"input size {input_size_px!r} px must be a whole number >= 8")
        if isinstance(windows_per_slide, bool) or not isinstance(windows_per_slide, int) or windows_per_slide < 1:
            raise InvalidParameterError(f"windows per slide {windows_per_slide!r} must be a whole number >= 1")
        for name, value in (("window spacing", window_spacing_um_px), ("label spacing", label_spacing_um_px)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidParameterError(f"{name} {value!r} um/px must be a positive number of um per pixel")
        if not slides:
            raise InvalidParameterError("no slides given; give at least one (slide, annotations) pair")
        self.input_size_px = input_size_px
        self.window_spacing_um_px = float(window_spacing_um_px)
        self.rest_of_tissue = rest_of_tissue
        self.tumour_class_names = tuple(tumour_class_names)
        self.seed = seed
        self.transform = transform
        self.warnings: list[str] = []
        self._slides: list[_SlideLabels] = []
        windows: list[SlideWindow] = []
        rest_label = NON_TUMOUR if rest_of_tissue == "non_tumour" else IGNORE_INDEX
        tissue_params = TissueDetectionParams(spacing_um_px=label_spacing_um_px)
        for slide_index, entry in enumerate(slides):
            if len(entry) not in (2, 3):
                raise InvalidParameterError(
                    f"slide entry {slide_index + 1} {entry!r} must be (slide path, annotations path) or "
                    "(slide path, annotations path, MPP override in um/px)"
                )
            slide_path, annotations_path = Path(entry[0]), Path(entry[1])
            mpp_override = entry[2] if len(entry) == 3 else None
            labelled = self._label_slide(slide_path, annotations_path, mpp_override, rest_label, tissue_params)
            self._slides.append(labelled)
            windows.extend(self._sample_windows(slide_index, labelled, windows_per_slide))
        self.windows: tuple[SlideWindow, ...] = tuple(windows)
        self._handles: dict[int, Slide] = {}
        self._handles_pid = os.getpid()

    # -- construction ---------------------------------------------------------------------------------------
    def _label_slide(
        self,
        slide_path: Path,
        annotations_path: Path,
        mpp_override: float | None,
        rest_label: int,
        tissue_params: TissueDetectionParams,
    ) -> _SlideLabels:
        with Slide(slide_path, mpp_override_um_px=mpp_override) as slide:
            mpp = slide.mpp_um_px
            size = slide.dimensions
            regions, warnings = regions_from_geojson(
                annotations_path, size, tumour_class_names=self.tumour_class_names
            )
            tissue = detect_tissue(slide, tissue_params)
        self.warnings.extend(warnings)
        height, width = tissue.mask.shape
        labels = np.where(tissue.mask, np.uint8(rest_label), np.uint8(BACKGROUND)).astype(np.uint8)
        is_tumour = [r.region_class == TUMOUR_REGION.code for r in regions]
        shapes = [(r.geometry, NON_TUMOUR) for r, t in zip(regions, is_tumour) if not t]
        shapes += [(r.geometry, TUMOUR) for r, t in zip(regions, is_tumour) if t]  # later shapes win
        annotated = rasterize_labels(shapes, (width, height), tissue.downsample, fill=BACKGROUND)
        labels = np.where(annotated != BACKGROUND, annotated, labels).astype(np.uint8)
        return _SlideLabels(
            path=slide_path,
            mpp_override_um_px=mpp_override,
            mpp_um_px=mpp,
            size_px=size,
            labels=labels,
            downsample=tissue.downsample,
        )

    def _sample_windows(self, slide_index: int, slide: _SlideLabels, count: int) -> list[SlideWindow]:
        rng = np.random.default_rng([self.seed, slide_index])
        side = self.input_size_px * self.window_spacing_um_px / slide.mpp_um_px
        flat = slide.labels.ravel()
        tumour_cells = np.flatnonzero(flat == TUMOUR)
        labelled_cells = np.flatnonzero(flat != BACKGROUND)
        if labelled_cells.size == 0:  # annotations too small to fill a label pixel, and no tissue found
            labelled_cells = np.arange(flat.size)
        n_tumour = math.ceil(count / 2) if tumour_cells.size else 0
        cells = np.concatenate(
            [rng.choice(tumour_cells, n_tumour), rng.choice(labelled_cells, count - n_tumour)]
        ).astype(np.int64)
        rows, cols = np.divmod(cells, slide.labels.shape[1])
        # Put each chosen label pixel's centre at a random place in its window, then keep the window on the
        # slide (which keeps that centre inside it).
        offsets = rng.uniform(0.0, side, size=(count, 2))
        width, height = slide.size_px
        windows = []
        for row, col, (off_x, off_y) in zip(rows, cols, offsets):
            x = _place((col + 0.5) * slide.downsample - off_x, side, width)
            y = _place((row + 0.5) * slide.downsample - off_y, side, height)
            windows.append(SlideWindow(slide_index, x, y, side))
        return windows

    # -- items ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.windows)

    def window_labels(self, index: int) -> np.ndarray:
        """Labels (uint8, input_size_px square) of window ``index``, before any transform."""
        window = self.windows[index]
        slide = self._slides[window.slide_index]
        size = self.input_size_px
        step = window.side_level0_px / size
        centres = (np.arange(size) + 0.5) * step
        rows = np.floor((window.y_level0_px + centres) / slide.downsample).astype(np.int64)
        cols = np.floor((window.x_level0_px + centres) / slide.downsample).astype(np.int64)
        in_rows = (rows >= 0) & (rows < slide.labels.shape[0])
        in_cols = (cols >= 0) & (cols < slide.labels.shape[1])
        out = np.full((size, size), BACKGROUND, dtype=np.uint8)
        out[np.ix_(in_rows, in_cols)] = slide.labels[np.ix_(rows[in_rows], cols[in_cols])]
        return out

    def window_pixels(self, index: int) -> np.ndarray:
        """RGB pixels (uint8, input_size_px square, 3) of window ``index``, before any transform."""
        window = self.windows[index]
        side = window.side_level0_px
        return self._slide(window.slide_index).read_scaled(
            (window.x_level0_px, window.y_level0_px), (side, side), (self.input_size_px, self.input_size_px)
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _apply(self.transform, self.window_pixels(index), self.window_labels(index))

    # -- slide handles: one set per process, never pickled -------------------------------------------------
    def _slide(self, slide_index: int) -> Slide:
        if self._handles_pid != os.getpid():  # a forked worker: the parent's handles are not ours to use
            self._handles, self._handles_pid = {}, os.getpid()
        handle = self._handles.get(slide_index)
        if handle is None:
            info = self._slides[slide_index]
            handle = Slide(info.path, mpp_override_um_px=info.mpp_override_um_px)
            self._handles[slide_index] = handle
        return handle

    def close(self) -> None:
        """Close the slides this process opened (they reopen on the next read)."""
        if self._handles_pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles, self._handles_pid = {}, os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles, self._handles_pid = {}, os.getpid()


def _place(start: float, side: float, extent: int) -> int:
    """Window start (level-0 px) moved so the window lies on the slide; centred when it is larger than that."""
    if side >= extent:
        return int(round((extent - side) / 2))
    return int(round(min(max(start, 0.0), extent - side)))


def _apply(transform: PairTransform, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transform`` on an RGB (H, W, 3) uint8 array and a (H, W) label array; plain tensors out."""
    image_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    mask_t = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
    out_image, out_mask = transform(image_t, mask_t)
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor).long()


# -- augmentations ------------------------------------------------------------------------------------------


class _MaskNearestExact:
    """Resample masks with ``nearest-exact`` (pixel centres aligned, as in the image's bilinear resize).

    torchvision resizes a ``tv_tensors.Mask`` with plain ``nearest`` in ``resized_crop``, which samples source
    pixel floor(i * scale) rather than floor((i + 0.5) * scale): labels end up shifted by up to a pixel
    from the image they label. Mixed into a crop / resize transform, this resizes masks the aligned way.
    """

    size: Any

    def _resize_mask(self, mask: tv_tensors.Mask) -> tv_tensors.Mask:
        return F.resize(mask, list(self.size), interpolation=v2.InterpolationMode.NEAREST_EXACT)


class _RandomResizedCrop(_MaskNearestExact, v2.RandomResizedCrop):
    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            cropped = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
            return self._resize_mask(cropped)
        return super().transform(inpt, params)


class _Resize(_MaskNearestExact, v2.Resize):
    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return self._resize_mask(inpt)
        return super().transform(inpt, params)


class RandomRotate90(v2.Transform):
    """Rotate image and mask together by 0, 90, 180 or 270 degrees (exact: no resampling)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0 or not isinstance(inpt, torch.Tensor):
            return inpt
        rotated = torch.rot90(inpt, params["k"], dims=(-2, -1))
        return tv_tensors.wrap(rotated, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else rotated


def _to_float_and_normalise(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise InvalidParameterError(
            f"normalisation mean {tuple(mean)} / std {tuple(std)} must have 3 values each (RGB), std > 0"
        )
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def train_transforms(input_size_px: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Training augmentation, joint on image and mask: random resized crop (50-100 % of the area) to
    ``input_size_px``, horizontal / vertical flips, 90-degree rotations; mild colour jitter on the image only."""
    return v2.Compose(
        [
            _RandomResizedCrop(input_size_px, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            RandomRotate90(),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
            *_to_float_and_normalise(mean, std),
        ]
    )


def eval_transforms(input_size_px: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Evaluation: resize to ``input_size_px`` square (nearest for masks) and normalise; nothing random."""
    return v2.Compose(
        [_Resize((input_size_px, input_size_px), antialias=True), *_to_float_and_normalise(mean, std)]
    )
