"""HepatoBench curation: find the patches a benchmark should not count, and say why; never touch the dataset.

Each patch file is read once (by a thread pool: hashing, PNG/JPEG decoding and OpenCV release the GIL); its
MD5 comes from the bytes and the pixels from the same bytes. Then, in sorted relpath order so that a run is
reproducible and "the first" is well defined:

- **unreadable**: bytes that do not decode, or an image that is not 8-bit RGB (HepatoBench patches are RGB H&E).
  One bad file is recorded, never fatal; a dataset that does not load at all is (:class:`DatasetError`).
- **duplicate**: the same bytes (MD5) as an earlier patch; the first is kept.
- **blurred**: variance of the Laplacian of the grey image below ``blur_min_laplacian_var``.
- **background**: more than ``background_max_fraction`` of the pixels near-white (all three channels above
  ``background_min_intensity``).
- **colour**: the patch's mean tissue colour (CIELAB over its non-background pixels) lies further from the
  dataset's median tissue colour than ``max(colour_max_mad * MAD, colour_min_delta_e)`` (CIE76 ΔE), where MAD is
  the median of those distances: a robust, dataset-relative "this is not H&E" test (ink, failed scans).
- **near_duplicate**: a perceptual hash (``imagehash.phash``) within ``near_duplicate_max_distance_bits`` of a
  patch already kept. Only patches that pass the quality filters are kept against each other, so a blurred copy
  never costs the sharp one its place; patches removed for quality are still told which kept patch they repeat.
  Pairs are found through a :class:`HammingIndex` (banded LSH), not by comparing every pair. Duplicates across
  classes are removed the same way and their reasons name both labels: they are label conflicts, listed apart in
  the report.

Defaults (:class:`CurationConfig`) were set on the 32 real CRC-VAL-HE-7K patches of the team's test data (224 px
at 0.5 um/px) so that every one of them is kept, with margins stated at each field.

:meth:`CurationResult.write` puts ``clean_index.csv`` (the kept patches, for
:func:`hepatoquant.bench.dataset.read_index`), ``removed.csv`` (``relpath,label,reason``, one row per reason) and
``curation_report.json`` into an output folder, all or nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from hepatoquant import __version__
from hepatoquant.atomic_write import staged_files
from hepatoquant.bench.dataset import Patch, PatchDataset, load_dataset, write_index
from hepatoquant.errors import InvalidParameterError, OutputWriteError

__all__ = [
    "CLEAN_INDEX_NAME",
    "REASON_KINDS",
    "REMOVED_NAME",
    "REPORT_NAME",
    "CurationConfig",
    "CurationResult",
    "HammingIndex",
    "LabelConflict",
    "PatchMeasurement",
    "PixelStats",
    "Reason",
    "Removal",
    "curate",
    "measure_patch",
]

CLEAN_INDEX_NAME = "clean_index.csv"
REMOVED_NAME = "removed.csv"
REPORT_NAME = "curation_report.json"
REASON_KINDS = ("unreadable", "duplicate", "near_duplicate", "blurred", "background", "colour")

ProgressCallback = Callable[[int, int], object]


@dataclass(frozen=True)
class CurationConfig:
    """The curation thresholds. Every field can be set in a JSON file (:meth:`from_json`); absent keys keep these
    defaults, measured on 32 real CRC-VAL-HE-7K patches (224 px, 0.5 um/px, eight tissue classes)."""

    near_duplicate_max_distance_bits: int | None = 4
    """Hamming distance between 64-bit pHashes at or below which two patches count as one. A JPEG re-encoding or
    a small brightness change moves a pHash by 0-2 bits; the closest distinct real patches were 20 bits apart.
    ``null`` turns near-duplicate detection off."""
    phash_size: int = 8
    """``imagehash.phash``'s hash_size: the hash has ``phash_size ** 2`` bits."""
    blur_min_laplacian_var: float = 30.0
    """Below this variance of the Laplacian (grey, uint8 scale) a patch is blurred. The least sharp real patch
    (adipose, three quarters white) measured 227; a Gaussian blur of sigma 2 px brings most tissue under 30.
    The measure depends on pixel size: retune for patches far from 0.5 um/px. 0 turns the filter off."""
    background_min_intensity: int = 220
    """A pixel is near-white background when all three channels exceed this (uint8)."""
    background_max_fraction: float = 0.9
    """Above this fraction of near-white pixels a patch is mostly background. Real adipose patches are up to 76 %
    near-white (fat vacuoles are white), so the limit sits well above; 1 turns the filter off."""
    colour_max_mad: float | None = 12.0
    """How many MADs a patch's mean tissue colour may lie from the dataset's median. Strongly haematoxylin-stained
    real debris patches sat 9.5 MADs out; pure green ink sits about 17 out. ``null`` turns the filter off."""
    colour_min_delta_e: float = 60.0
    """The colour limit is never below this CIE76 distance, so that a very uniform dataset (tiny MAD) does not
    lose its ordinary stain variation."""

    def __post_init__(self) -> None:
        _check_int(self, "phash_size", minimum=2)
        bits = self.phash_size ** 2
        if self.near_duplicate_max_distance_bits is not None:
            _check_int(self, "near_duplicate_max_distance_bits", minimum=0, maximum=bits - 1,
                       fix=f"use 0 to {bits - 1} for a {bits}-bit hash, or null to turn near-duplicate detection off")
        _check_number(self, "blur_min_laplacian_var", minimum=0.0, fix="use 0 to turn the blur filter off")
        _check_int(self, "background_min_intensity", minimum=0, maximum=254)
        _check_number(self, "background_max_fraction", minimum=0.0, maximum=1.0,
                      fix="use a fraction; 1 turns the background filter off")
        if self.colour_max_mad is not None:
            _check_number(self, "colour_max_mad", minimum=0.0, exclusive_minimum=True,
                          fix="use a positive number, or null to turn the colour filter off")
        _check_number(self, "colour_min_delta_e", minimum=0.0)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "curation config") -> CurationConfig:
        """A config from a mapping; unknown keys are an error (a misspelt key would otherwise be ignored)."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise InvalidParameterError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; the allowed keys are {', '.join(allowed)}"
            )
        try:
            return cls(**values)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{source}: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> CurationConfig:
        """A config from a JSON object of the fields to change, e.g. ``{"blur_min_laplacian_var": 50}``."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except OSError as exc:
            raise InvalidParameterError(
                f"curation config {str(path)!r} cannot be read ({exc}); check the path"
            ) from exc
        except json.JSONDecodeError as exc:
            raise InvalidParameterError(f"curation config {str(path)!r} is not valid JSON ({exc}); fix it") from exc
        if not isinstance(values, dict):
            raise InvalidParameterError(
                f"curation config {str(path)!r} must be a JSON object of the thresholds to change, "
                'e.g. {"blur_min_laplacian_var": 50}'
            )
        return cls.from_dict(values, source=f"curation config {str(path)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def phash_bits(self) -> int:
        return self.phash_size ** 2


def _check_int(config: CurationConfig, name: str, *, minimum: int, maximum: int | None = None, fix: str = "") -> None:
    value = getattr(config, name)
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise InvalidParameterError(f"{name} must be an integer {bounds} (got {value!r}){'; ' + fix if fix else ''}")


def _check_number(config: CurationConfig, name: str, *, minimum: float, maximum: float | None = None,
                  exclusive_minimum: bool = False, fix: str = "") -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if exclusive_minimum else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        low = f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}"
        bounds = f"{low} and <= {maximum:g}" if maximum is not None else low
        raise InvalidParameterError(f"{name} must be a number {bounds} (got {value!r}){'; ' + fix if fix else ''}")
    object.__setattr__(config, name, float(value))


class HammingIndex:
    """Stored integer hashes, searchable for those within ``max_distance`` bits of a query.

    The ``nbits`` bits are cut into ``max_distance + 1`` contiguous bands. Two hashes that differ in at most
    ``max_distance`` bits cannot differ in every band (pigeonhole), so they share the exact value of at least one
    band: a query only compares against the stored hashes in its ``max_distance + 1`` buckets, which for hashes
    that are spread out is a small fraction of all of them (banded locality-sensitive hashing, no false misses).
    """

    def __init__(self, nbits: int, max_distance: int) -> None:
        if not 0 <= max_distance < nbits:
            raise InvalidParameterError(
                f"max_distance must be from 0 to {nbits - 1} for {nbits}-bit hashes (got {max_distance})"
            )
        bands = max_distance + 1
        edges = [band * nbits // bands for band in range(bands + 1)]
        self.nbits = nbits
        self.max_distance = max_distance
        self._bands = [(start, (1 << (end - start)) - 1) for start, end in itertools.pairwise(edges)]
        self._buckets: dict[tuple[int, int], list[int]] = {}
        self._hashes: list[int] = []
        self._items: list[Any] = []

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, value: int, item: Any) -> None:
        """Store hash ``value`` under ``item`` (any object: an index, a relpath)."""
        if not 0 <= value < 1 << self.nbits:
            raise InvalidParameterError(f"hash {value} does not fit in {self.nbits} bits")
        slot = len(self._hashes)
        self._hashes.append(value)
        self._items.append(item)
        for band, (shift, mask) in enumerate(self._bands):
            self._buckets.setdefault((band, (value >> shift) & mask), []).append(slot)

    def query(self, value: int) -> list[tuple[int, Any]]:
        """``(distance, item)`` of every stored hash within ``max_distance`` bits, nearest first, then in the
        order they were added."""
        seen: set[int] = set()
        found: list[tuple[int, int]] = []
        for band, (shift, mask) in enumerate(self._bands):
            for slot in self._buckets.get((band, (value >> shift) & mask), ()):
                if slot not in seen:
                    seen.add(slot)
                    distance = (self._hashes[slot] ^ value).bit_count()
                    if distance <= self.max_distance:
                        found.append((distance, slot))
        return [(distance, self._items[slot]) for distance, slot in sorted(found)]


@dataclass(frozen=True)
class PixelStats:
    """What the filters look at in a decoded patch."""

    phash: int  # imagehash.phash bits, first bit most significant
    laplacian_var: float  # of the grey image, uint8 scale
    background_fraction: float  # near-white pixels
    tissue_lab: tuple[float, float, float] | None  # mean CIELAB (L 0-100) of the other pixels; None if there are none


@dataclass(frozen=True)
class PatchMeasurement:
    """What curation measured on one patch: ``stats``, or ``error`` saying why it could not be used (``md5`` is
    None too when the file could not even be read)."""

    md5: str | None
    error: str | None = None
    stats: PixelStats | None = None


def measure_patch(path: str | Path, config: CurationConfig) -> PatchMeasurement:
    """Read ``path`` once and measure it; a file that cannot be used gives a measurement with ``error``, not an
    exception, because finding such files is what curation is for."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return PatchMeasurement(md5=None, error=f"cannot be read ({exc.strerror or exc})")
    md5 = hashlib.md5(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "RGB":
                return PatchMeasurement(md5=md5, error=f"image mode is {image.mode}, not 8-bit RGB; convert it to RGB")
            image.load()
            phash = imagehash.phash(image, hash_size=config.phash_size)
            rgb = np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:
        return PatchMeasurement(
            md5=md5, error="cannot be decoded as an image (not a format Pillow recognises, or damaged)"
        )
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return PatchMeasurement(md5=md5, error=f"cannot be decoded as an image ({exc})")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    background = (rgb > config.background_min_intensity).all(axis=2)
    tissue = ~background
    tissue_lab = None
    if tissue.any():
        lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
        lightness, a, b = (float(v) for v in lab[tissue].mean(axis=0))
        tissue_lab = (lightness, a, b)
    return PatchMeasurement(md5=md5, stats=PixelStats(
        phash=_hash_to_int(phash),
        laplacian_var=float(cv2.Laplacian(grey, cv2.CV_64F).var()),
        background_fraction=float(background.mean()),
        tissue_lab=tissue_lab,
    ))


def _hash_to_int(value: imagehash.ImageHash) -> int:
    result = 0
    for bit in value.hash.flatten():
        result = (result << 1) | int(bit)
    return result


@dataclass(frozen=True)
class Reason:
    """Why a patch was removed: ``kind`` is one of :data:`REASON_KINDS`, ``text`` the sentence for people."""

    kind: str
    text: str


@dataclass(frozen=True)
class Removal:
    patch: Patch
    reasons: tuple[Reason, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(r.kind for r in self.reasons)


@dataclass(frozen=True)
class LabelConflict:
    """A (near-)duplicate pair whose labels differ: the removed patch, the kept one, their distance in bits
    (0 for identical bytes)."""

    relpath: str
    label: str
    kept_relpath: str
    kept_label: str
    distance_bits: int
    identical_bytes: bool


@dataclass(frozen=True)
class CurationResult:
    """The outcome of :func:`curate`: kept patches in dataset order, removals in relpath order."""

    dataset: PatchDataset
    config: CurationConfig
    kept: tuple[Patch, ...]
    removed: tuple[Removal, ...]
    measurements: Mapping[str, PatchMeasurement]  # relpath -> what was measured
    label_conflicts: tuple[LabelConflict, ...]
    colour_reference: Mapping[str, Any]  # the dataset's median tissue colour, its MAD and the limit applied
    seconds: float

    def counts_before(self) -> dict[str, int]:
        return self.dataset.counts()

    def counts_after(self) -> dict[str, int]:
        counted = Counter(p.label for p in self.kept)
        return {c: counted.get(c, 0) for c in self.dataset.classes}

    def removed_by_kind(self) -> dict[str, int]:
        """Removed patches per reason kind; a patch with several reasons counts under each."""
        counted = Counter(kind for removal in self.removed for kind in set(removal.kinds))
        return {kind: counted.get(kind, 0) for kind in REASON_KINDS}

    def report(self) -> dict[str, Any]:
        return {
            "created_by": f"hepatoquant {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dataset_root": str(self.dataset.root.resolve()),
            "dataset_notes": list(self.dataset.notes),
            "config": self.config.to_dict(),
            "patches": {"before": len(self.dataset.patches), "kept": len(self.kept), "removed": len(self.removed)},
            "counts_before": self.counts_before(),
            "counts_after": self.counts_after(),
            "removed_by_kind": self.removed_by_kind(),
            "removed_by_kind_note": "patches per reason kind; a patch removed for several reasons counts under each",
            "label_conflicts": [dataclasses.asdict(c) for c in self.label_conflicts],
            "colour_reference": dict(self.colour_reference),
            "seconds": round(self.seconds, 3),
            "files": {"clean_index": CLEAN_INDEX_NAME, "removed": REMOVED_NAME},
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``clean_index.csv``, ``removed.csv`` and ``curation_report.json`` into ``out_dir`` (created if
        needed): all are written into a temporary folder there first and renamed into place only when complete.
        Nothing in the dataset is written, moved or deleted."""
        out_dir = Path(out_dir)
        names = {"clean_index": CLEAN_INDEX_NAME, "removed": REMOVED_NAME, "report": REPORT_NAME}
        try:
            with staged_files(out_dir, names.values(), prefix=".curation.") as staging:
                write_index(staging / CLEAN_INDEX_NAME, self.kept)
                with (staging / REMOVED_NAME).open("w", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(["relpath", "label", "reason"])
                    for removal in self.removed:
                        writer.writerows((removal.patch.relpath, removal.patch.label, r.text) for r in removal.reasons)
                (staging / REPORT_NAME).write_text(json.dumps(self.report(), indent=2) + "\n")
        except OSError as exc:
            raise OutputWriteError(
                f"could not write the curation outputs into {str(out_dir)!r} ({exc}); check that the folder is "
                "writable and the disk has space, or choose another output folder (the dataset was not touched)"
            ) from exc
        return {key: out_dir / name for key, name in names.items()}


def curate(dataset: PatchDataset | str | Path, config: CurationConfig | None = None, *, workers: int | None = None,
           progress: ProgressCallback | None = None) -> CurationResult:
    """Curate ``dataset`` (a loaded dataset or its root folder) with ``config`` (default thresholds if None).

    ``workers`` threads read and measure the patches (default: the CPU count, at most 8); ``progress(done, total)``
    is called as patches are measured. A folder that is not a dataset raises :class:`DatasetError`; bad patches
    do not raise but are removed as ``unreadable``.
    """
    started = time.perf_counter()
    config = config or CurationConfig()
    if not isinstance(dataset, PatchDataset):
        dataset = load_dataset(dataset)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidParameterError(f"workers must be a positive integer (got {workers!r})")
    patches = sorted(dataset.patches, key=lambda p: p.relpath)
    measured = _measure_all(dataset, patches, config, workers, progress)

    reasons: dict[str, list[Reason]] = {p.relpath: [] for p in patches}
    candidates, copies, conflicts = _unreadable_and_duplicates(patches, measured, reasons)
    _quality_filters(candidates, config, reasons)
    colour_reference = _colour_filter(candidates, config, reasons)
    for copy, original in copies.items():  # identical bytes, identical measurements, identical quality reasons
        reasons[copy.relpath].extend(r for r in reasons[original.relpath] if r.kind != "unreadable")
    if config.near_duplicate_max_distance_bits is not None:
        index = HammingIndex(config.phash_bits, config.near_duplicate_max_distance_bits)
        conflicts += _near_duplicates(candidates, index, reasons)

    removed = tuple(Removal(p, tuple(reasons[p.relpath])) for p in patches if reasons[p.relpath])
    gone = {r.patch.relpath for r in removed}
    return CurationResult(
        dataset=dataset,
        config=config,
        kept=tuple(p for p in dataset.patches if p.relpath not in gone),
        removed=removed,
        measurements=measured,
        label_conflicts=tuple(sorted(conflicts, key=lambda c: c.relpath)),
        colour_reference=colour_reference,
        seconds=time.perf_counter() - started,
    )


def _unreadable_and_duplicates(
    patches: Sequence[Patch], measured: Mapping[str, PatchMeasurement], reasons: dict[str, list[Reason]]
) -> tuple[dict[Patch, PixelStats], dict[Patch, Patch], list[LabelConflict]]:
    """Record unreadable files and byte-identical copies (the first in relpath order is the original). Returns
    the readable originals with their stats (in relpath order), each copy's original, and cross-class copies."""
    candidates: dict[Patch, PixelStats] = {}
    copies: dict[Patch, Patch] = {}
    conflicts: list[LabelConflict] = []
    first_with_md5: dict[str, Patch] = {}
    for patch in patches:
        m = measured[patch.relpath]
        if m.error is not None:
            reasons[patch.relpath].append(Reason("unreadable", f"unreadable: {m.error}"))
        if m.md5 is not None:
            original = first_with_md5.setdefault(m.md5, patch)
            if original is not patch:
                copies[patch] = original
                text = f"duplicate of {original.relpath}{_conflict_note(patch, original)}"
                reasons[patch.relpath].append(Reason("duplicate", text))
                if original.label != patch.label:
                    conflicts.append(
                        LabelConflict(patch.relpath, patch.label, original.relpath, original.label, 0, True)
                    )
                continue
        if m.stats is not None:
            candidates[patch] = m.stats
    return candidates, copies, conflicts


def _quality_filters(candidates: Mapping[Patch, PixelStats], config: CurationConfig,
                     reasons: dict[str, list[Reason]]) -> None:
    for patch, m in candidates.items():
        if m.laplacian_var < config.blur_min_laplacian_var:
            text = f"blurred (laplacian variance {m.laplacian_var:.1f} < {config.blur_min_laplacian_var:g})"
            reasons[patch.relpath].append(Reason("blurred", text))
        if m.background_fraction > config.background_max_fraction:
            text = (f"mostly background ({m.background_fraction:.1%} of pixels near-white, all channels > "
                    f"{config.background_min_intensity}; limit {config.background_max_fraction:.0%})")
            reasons[patch.relpath].append(Reason("background", text))


def _measure_all(dataset: PatchDataset, patches: Sequence[Patch], config: CurationConfig, workers: int,
                 progress: ProgressCallback | None) -> dict[str, PatchMeasurement]:
    measured: dict[str, PatchMeasurement] = {}
    total = len(patches)
    if progress:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="curate") as pool:
        futures = {pool.submit(measure_patch, dataset.path(p), config): p.relpath for p in patches}
        for done, future in enumerate(as_completed(futures), start=1):
            measured[futures[future]] = future.result()
            if progress:
                progress(done, total)
    return measured


def _colour_filter(candidates: Mapping[Patch, PixelStats], config: CurationConfig,
                   reasons: dict[str, list[Reason]]) -> dict[str, Any]:
    """Flag patches whose mean tissue colour is far from the dataset's; only patches with enough tissue (not
    removed as background) take part, in the reference as in the test."""
    usable = {p: m.tissue_lab for p, m in candidates.items()
              if m.tissue_lab is not None and m.background_fraction <= config.background_max_fraction}
    if config.colour_max_mad is None or not usable:
        return {"applied": False, "patches": len(usable)}
    lab = np.array(list(usable.values()), dtype=np.float64)
    centre = np.median(lab, axis=0)
    distances = np.linalg.norm(lab - centre, axis=1)
    mad = float(np.median(distances))  # the median distance to the median: a multivariate MAD
    limit = max(config.colour_max_mad * mad, config.colour_min_delta_e)
    for patch, distance in zip(usable, distances, strict=True):
        if distance > limit:
            reasons[patch.relpath].append(Reason(
                "colour", f"extreme colour (mean tissue colour {distance:.1f} CIELAB units from the dataset "
                          f"median; limit {limit:.1f} = max({config.colour_max_mad:g} x MAD {mad:.1f}, "
                          f"{config.colour_min_delta_e:g}))"))
    return {"applied": True, "patches": len(usable), "median_lab": [round(float(v), 2) for v in centre],
            "mad_delta_e": round(mad, 3), "limit_delta_e": round(limit, 3)}


def _near_duplicates(candidates: Mapping[Patch, PixelStats], index: HammingIndex,
                     reasons: dict[str, list[Reason]]) -> list[LabelConflict]:
    """Greedy in relpath order over the patches that pass the quality filters: one is kept unless it lies within
    the threshold of one already kept, so no two kept patches are near-duplicates and each removed one names
    the kept patch it repeats. Quality-removed patches are then matched against the kept ones for the record."""
    conflicts: list[LabelConflict] = []
    passing = [p for p in candidates if not reasons[p.relpath]]
    failing = [p for p in candidates if reasons[p.relpath]]
    for pass_number, group in enumerate((passing, failing)):
        for patch in group:
            matches = index.query(candidates[patch].phash)
            if not matches:
                if pass_number == 0:
                    index.add(candidates[patch].phash, patch)
                continue
            distance, kept = matches[0]
            text = f"near-duplicate of {kept.relpath} (distance {distance}){_conflict_note(patch, kept)}"
            reasons[patch.relpath].append(Reason("near_duplicate", text))
            if kept.label != patch.label:
                conflicts.append(LabelConflict(patch.relpath, patch.label, kept.relpath, kept.label, distance, False))
    return conflicts


def _conflict_note(patch: Patch, kept: Patch) -> str:
    if patch.label == kept.label:
        return ""
    return f"; cross-class: labelled {patch.label} here, {kept.label} there"
