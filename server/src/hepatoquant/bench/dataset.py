"""A HepatoBench-layout patch dataset: one folder per class (the folder name is the label), ``dataset_meta.json``.

    ROOT/
      dataset_meta.json        {"name", "classes": [...], "patch_size_px", "mpp_um_px", ...}   (optional)
      TUM/ *.png|jpg|tif ...   one folder per class listed in the meta (default: the seven HepatoBench classes)
      FIB/ ...
      split.csv                the partition (see :mod:`hepatoquant.bench.split`)                (optional)

:func:`load_dataset` lists the patches (paths relative to ROOT, with ``/``), checks the class folders against the
meta's class list and never reads pixels; :func:`read_rgb` reads one patch and refuses what is not 8-bit RGB.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hepatoquant_client.classes import TISSUE_CLASS_CODES
from PIL import Image, UnidentifiedImageError

from hepatoquant.errors import InvalidParameterError

__all__ = [
    "IMAGE_SUFFIXES",
    "META_NAME",
    "DatasetError",
    "Patch",
    "PatchDataset",
    "load_dataset",
    "read_index",
    "read_rgb",
    "write_index",
]

META_NAME = "dataset_meta.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DatasetError(InvalidParameterError):
    """A dataset that does not follow the layout, or a patch that cannot be used; the message says which."""


@dataclass(frozen=True, order=True)
class Patch:
    """One patch: its path relative to the dataset root (``/`` separators) and its label (its class folder)."""

    relpath: str
    label: str


@dataclass(frozen=True)
class PatchDataset:
    root: Path
    meta: dict
    classes: tuple[str, ...]
    patches: tuple[Patch, ...]
    notes: tuple[str, ...] = field(default=())

    def path(self, patch: Patch) -> Path:
        return self.root / patch.relpath

    def counts(self) -> dict[str, int]:
        """Patches per class, in class order (0 for a class without patches)."""
        counted = Counter(p.label for p in self.patches)
        return {c: counted.get(c, 0) for c in self.classes}

    def restricted(self, relpaths: set[str]) -> PatchDataset:
        """The same dataset with only the patches named (e.g. a curated index)."""
        return PatchDataset(self.root, self.meta, self.classes, tuple(p for p in self.patches if p.relpath in relpaths),
                            self.notes)


def load_dataset(root: str | Path) -> PatchDataset:
    """The dataset at ``root``: every image file in each class folder, sorted, labels from the folder names.

    The class list comes from ``dataset_meta.json`` (``classes``), else the seven HepatoBench classes. A folder
    that is not a listed class, a listed class without a folder, or no images at all is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist; give the folder holding one subfolder per class")
    meta_path = root / META_NAME
    notes: list[str] = []
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{meta_path}: not valid JSON ({exc}); fix or remove it") from exc
        classes = meta.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes) \
                or len(set(classes)) != len(classes):
            raise DatasetError(f"{meta_path}: 'classes' must be a list of distinct class names (the folder names)")
        classes = tuple(classes)
    else:
        meta = {}
        classes = TISSUE_CLASS_CODES
        notes.append(f"no {META_NAME}: assuming the seven HepatoBench classes {', '.join(classes)}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise DatasetError(
            f"dataset {str(root)!r}: folder(s) {', '.join(unknown)} are not classes of this dataset "
            f"({', '.join(classes)}); rename them, or list them under 'classes' in {META_NAME}"
        )
    missing = [c for c in classes if c not in folders]
    if missing:
        raise DatasetError(
            f"dataset {str(root)!r}: class folder(s) {', '.join(missing)} are missing; every class needs a folder "
            f"(remove it from 'classes' in {META_NAME} if the dataset truly lacks it)"
        )
    patches = []
    for label in classes:
        for file in sorted((root / label).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                patches.append(Patch(file.relative_to(root).as_posix(), label))
    if not patches:
        raise DatasetError(f"dataset {str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return PatchDataset(root, meta, classes, tuple(patches), tuple(notes))


def read_rgb(path: str | Path) -> np.ndarray:
    """The patch as uint8 (height, width, 3). Unreadable files and images that are not 8-bit RGB are errors."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode != "RGB":
                raise DatasetError(
                    f"patch {str(path)!r} is {mode}, not 8-bit RGB; convert it to RGB (HepatoBench patches are "
                    "RGB H&E) or leave it out of the dataset"
                )
            return np.asarray(image, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"patch {str(path)!r} cannot be read as an image ({exc}); replace or remove it") from exc


def write_index(path: str | Path, patches: list[Patch] | tuple[Patch, ...]) -> None:
    """A patch index (``relpath,label``) written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    with temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["relpath", "label"])
        writer.writerows((p.relpath, p.label) for p in patches)
    temporary.replace(path)


def read_index(path: str | Path, dataset: PatchDataset) -> PatchDataset:
    """The dataset restricted to the patches an index names; an index naming a patch not in the dataset fails."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DatasetError(f"index {str(path)!r} cannot be read ({exc})") from exc
    if rows and not {"relpath", "label"} <= set(rows[0]):
        raise DatasetError(f"index {str(path)!r} needs the columns relpath,label")
    known = {p.relpath: p.label for p in dataset.patches}
    for row in rows:
        if known.get(row["relpath"]) != row["label"]:
            raise DatasetError(
                f"index {str(path)!r} names {row['relpath']!r} ({row['label']}), which is not a patch of the "
                f"dataset {str(dataset.root)!r}; was the index made for another dataset?"
            )
    return dataset.restricted({row["relpath"] for row in rows})
