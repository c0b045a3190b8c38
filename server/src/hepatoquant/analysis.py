"""One slide, start to end: tissue, tiles, classification, regions, composition.

:func:`analyze_slide` is the function the command line, the server and the benchmarks call; it returns an
:class:`AnalysisResult` in memory, and :func:`hepatoquant.outputs.write_outputs` turns that into files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import shapely
from hepatoquant_client.classes import TISSUE_CLASS_CODES
from hepatoquant_client.qupath_geojson import polygonal_part, read_qupath_geojson

from hepatoquant.classify import choose_device, load_classifier, predict_batches
from hepatoquant.errors import InvalidParameterError, ModelPackError, NoTissueError
from hepatoquant.heap import freeze_long_lived
from hepatoquant.encoders import encoder_config
from hepatoquant.model_pack import ModelPack
from hepatoquant.inference_backend import resolve_backend
from hepatoquant.precision import resolve_precision
from hepatoquant.quantify import Composition, assign_tiles, quantify
from hepatoquant.run_clock import RunClock
from hepatoquant.regions import (
    DEFAULT_TUMOUR_CLASS_NAMES,
    Region,
    artefacts_from_objects,
    regions_from_objects,
    whole_tissue_region,
)
from hepatoquant.segmentation.inference import SegmentationMap, SlidingWindowParams, WindowSegmenter, segment_slide
from hepatoquant.slide import Slide, SlideInfo
from hepatoquant.tile_reader import READERS, iter_tile_batches, resolve_readers, start_reader_processes
from hepatoquant.tiling import TileGrid, TileSpec, build_tile_grid, without_artefacts
from hepatoquant.tissue import TissueDetectionParams, TissueMask, detect_tissue

__all__ = ["AnalysisOptions", "AnalysisResult", "ModelCache", "ProgressCallback", "analyze_slide", "demo_model_warning"]

# stage name, done, total: called after tissue detection, tiling, and every classified batch.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class AnalysisOptions:
    """Everything that shapes one analysis besides the slide and the model."""

    tile: TileSpec = field(default_factory=TileSpec)
    tissue: TissueDetectionParams = field(default_factory=TissueDetectionParams)
    mpp_override_um_px: float | None = None
    regions_path: Path | None = None
    tumour_class_names: tuple[str, ...] = DEFAULT_TUMOUR_CLASS_NAMES
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    keep_embeddings: bool = False
    embeddings_formats: tuple[str, ...] = ("h5", "npz")  # with keep_embeddings: .features.h5 and/or .npz
    tile_object_type: str = "detection"
    windows: SlidingWindowParams = field(default_factory=SlidingWindowParams)
    precision: str = "auto"  # see hepatoquant.precision
    backend: str = "auto"  # the models': torch, or openvino on CPUs (see hepatoquant.inference_backend)
    readers: str = "auto"  # tiles and windows read by threads or processes (tile_reader.resolve_readers)
    # With a segmenter: run it alongside the classification (True) or before it (False); None: alongside when
    # the models run on a GPU (see analyze_slide).
    segment_alongside: bool | None = None
    # Tiles whose focus score (tile_reader.focus_score) is below this are left out of the composition and
    # counted as excluded (blur); 0 keeps every tile. Measured on 60 tiles each of CMU-1-Small-Region and the
    # TCGA slide at 150 px: in focus, 5th percentile 697 / 214 (lowest of all their tiles 449 / 62); the same
    # tiles Gaussian-blurred by sigma 2 px, 95th percentile 45 / 25; sigma 4, 5 / 4. 50 lies between.
    min_focus: float = 50.0
    keep_artefacts: bool = False  # True: tiles touching detected artefacts (pen, ...) are analysed too

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 4096:
            raise InvalidParameterError(f"batch size {self.batch_size} is outside 1..4096")
        if not 1 <= self.num_workers <= 64:
            raise InvalidParameterError(f"reader workers {self.num_workers} is outside 1..64")
        if self.readers not in ("auto", *READERS):
            raise InvalidParameterError(f"tile readers {self.readers!r} must be one of auto, {', '.join(READERS)}")
        if not 0.0 <= self.min_focus <= 1e6:
            raise InvalidParameterError(f"minimum focus {self.min_focus} is outside 0..1e6 (0 keeps every tile)")
        if self.tile_object_type not in ("detection", "tile"):
            raise InvalidParameterError(
                f"tile object type {self.tile_object_type!r} must be 'detection' or 'tile'"
            )


@dataclass(frozen=True)
class AnalysisResult:
    """Everything an analysis found, in memory (tiles in grid order)."""

    slide: SlideInfo
    options: AnalysisOptions
    model: dict
    device: str
    classes: tuple[str, ...]
    tissue: TissueMask
    grid: TileGrid
    probabilities: np.ndarray  # (tiles, classes) float32
    embeddings: np.ndarray | None  # (tiles, dim) float32 when asked for
    regions: list[Region]
    assignment: np.ndarray  # region index per tile, -1 = unassigned
    composition: Composition
    clock: RunClock  # where the run's time went (stages, other, total); outputs add their own stages
    warnings: list[str]
    segmenter: dict | None = None  # the segmenter pack's summary when it made the regions
    segmentation: SegmentationMap | None = None
    precision: str = "fp32"  # the classifier's resolved precision (fp32, bf16, fp16)
    backend: str = "torch"  # the classifier's resolved backend (torch, openvino)
    readers: str = "threads"  # who read the tiles and windows (resolved: threads, processes)
    focus: np.ndarray | None = None  # (tiles,) focus score of each kept tile
    excluded_tiles: dict[str, int] = field(default_factory=dict)  # reason (artefact kind, "blur") -> tiles left out

    @property
    def predicted_class(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) if len(self.probabilities) else np.empty(0, dtype=np.int64)

    @property
    def timings_s(self) -> dict[str, float]:
        """Seconds per stage, then ``other`` and ``total`` (the wall time so far): they add up."""
        return self.clock.summary()

    @property
    def tiles_per_second(self) -> float:
        seconds = self.clock.stages.get("classification", 0.0)
        return len(self.grid) / seconds if seconds > 0 else 0.0


def demo_model_warning(pack: ModelPack) -> str:
    segmenter = pack.kind == "segmenter"
    what = "tumour / non-tumour regions are" if segmenter else "tissue labels are"
    how = "`hepatoquant seg train`" if segmenter else "`hepatoquant models add`"
    return (
        f"model pack {pack.name!r} is the UNTRAINED DEMO: its {what} random and mean nothing; "
        f"use a trained {pack.kind} pack ({how}) for real measurements"
    )


class ModelCache:
    """Loaded models kept for the next slide: a cohort worker analyses many slides with one copy of each model.

    Keyed by the pack's folder and the device; a pack replaced on disk (another manifest) is loaded again.
    With ``freeze_after_load`` (a server) each load ends with :func:`hepatoquant.heap.freeze_long_lived`: a
    model and the libraries its first load imports then cost the garbage collector nothing for good.
    """

    def __init__(self, *, freeze_after_load: bool = False) -> None:
        self._models: dict[tuple, object] = {}
        self._freeze_after_load = freeze_after_load
        self._lock = threading.Lock()  # a server's jobs and ClassifyTiles calls share it: one load per model

    def _get(self, kind: str, pack: ModelPack, device: torch.device, load: Callable[[ModelPack, torch.device], object]):
        key = (kind, str(pack.path.resolve()), json.dumps(pack.manifest, sort_keys=True), str(device))
        with self._lock:
            if key not in self._models:
                self._models[key] = load(pack, device)
                if self._freeze_after_load:
                    freeze_long_lived()
            return self._models[key]

    def classifier(self, pack: ModelPack, device: torch.device, backend: str = "torch", precision: str = "fp32"):
        """The pack's classifier: PyTorch's, or compiled by OpenVINO at ``precision`` (one per precision)."""
        if backend == "torch":
            return self._get("classifier", pack, device, load_classifier)
        from hepatoquant.inference_backend import load_openvino_classifier

        return self._get(f"classifier-{backend}-{precision}", pack, device, lambda pack, device:
                         load_openvino_classifier(pack, precision, lambda: load_classifier(pack, device)))

    def segmenter(self, pack: ModelPack, device: torch.device, backend: str = "torch", precision: str = "fp32"):
        """The pack's segmenter on uint8 windows (:class:`WindowSegmenter`): PyTorch's, or compiled by OpenVINO at
        ``precision``."""
        from hepatoquant.segmentation.pack import load_segmenter

        def load_torch(pack: ModelPack, device: torch.device) -> WindowSegmenter:
            return WindowSegmenter(load_segmenter(pack, device), pack.mean, pack.std).eval()

        if backend == "torch":
            return self._get("segmenter", pack, device, load_torch)
        from hepatoquant.inference_backend import load_openvino_segmenter

        return self._get(f"segmenter-{backend}-{precision}", pack, device, lambda pack, device:
                         load_openvino_segmenter(pack, precision, lambda: load_torch(pack, device)))


def _segment(
    slide_path: str | Path,
    slide_info: SlideInfo,
    tissue: TissueMask,
    segmenter: ModelPack,
    options: AnalysisOptions,
    report_progress: ProgressCallback,
    *,
    device: torch.device,
    readers: str,
    models: ModelCache,
    clock: RunClock,
) -> tuple[SegmentationMap, list[Region], list[str]]:
    """Tumour / non-tumour regions from the segmenter pack (sliding windows, then polygons)."""
    from hepatoquant.segmentation.vectorize import regions_from_label_mask

    warnings = []
    if segmenter.is_untrained_demo:
        warnings.append(demo_model_warning(segmenter))
    precision = resolve_precision(options.precision, device, encoder_config(segmenter.encoder_name).recommended_dtype)
    backend = resolve_backend(options.backend, device)
    with clock.stage("segmenter_loading"):
        model = models.segmenter(segmenter, device, backend, precision)
    with clock.stage("segmentation"):
        segmentation = segment_slide(
            slide_path,
            (slide_info.width_px, slide_info.height_px),
            slide_info.mpp_um_px,
            tissue,
            model,
            mean=segmenter.mean,
            std=segmenter.std,
            window_spacing_um_px=options.windows.spacing_um_px or segmenter.spacing_um_px,
            params=options.windows,
            device=device,
            progress=lambda done, total: report_progress("windows", done, total),
            precision=precision,
            readers=readers,
        )
        segmentation = dataclasses.replace(segmentation, backend=backend)
    with clock.stage("regions"):
        regions = regions_from_label_mask(
            segmentation.mask, downsample=segmentation.downsample, mpp_um_px=slide_info.mpp_um_px
        )
    if not regions:
        warnings.append(
            f"the segmenter {segmenter.name!r} found no tumour or non-tumour region larger than the minimum area: "
            "every tile is counted as unassigned"
        )
    return segmentation, regions, warnings


def analyze_slide(
    slide_path: str | Path,
    pack: ModelPack,
    options: AnalysisOptions = AnalysisOptions(),
    *,
    segmenter: ModelPack | None = None,
    progress: ProgressCallback | None = None,
    models: ModelCache | None = None,
    clock: RunClock | None = None,
) -> AnalysisResult:
    """Analyse one slide with a classifier pack; regions from ``options.regions_path``, else the ``segmenter``
    pack, else the whole tissue. Raises our errors (bad slide, no tissue, bad regions). ``models`` keeps the
    loaded models for the next call (cohorts); without it they are loaded for this slide only. ``clock`` times
    the stages (pass one started earlier, e.g. with the process, to have that time in the report too)."""
    report_progress = progress or (lambda stage, done, total: None)
    models = models or ModelCache()
    foreign = [name for name in pack.classes if name not in TISSUE_CLASS_CODES]
    if foreign:
        raise ModelPackError(
            f"classifier pack {pack.name!r} predicts {', '.join(foreign)}, which are not HepatoQuant tissue classes "
            f"({', '.join(TISSUE_CLASS_CODES)}); `analyze` reports composition in those. Use a pack whose head "
            "outputs are named with them (`hepatoquant models import-head --classes ...`); packs for other class "
            "sets are for `hepatoquant bench`"
        )
    clock = clock or RunClock()
    warnings: list[str] = []
    if pack.is_untrained_demo:
        warnings.append(demo_model_warning(pack))
    device = choose_device(options.device)
    readers = resolve_readers(options.readers, device)
    if readers == "processes":
        start_reader_processes(options.num_workers)  # they start while the tissue is found and the models load
    with clock.stage("tissue_detection"), Slide(slide_path, mpp_override_um_px=options.mpp_override_um_px) as slide:
        slide_info = slide.info()
        tissue = detect_tissue(slide, options.tissue)
    report_progress("tissue", 1, 1)

    regions: list[Region]
    segmentation: SegmentationMap | None = None
    if options.regions_path is not None:
        slide_size = (slide_info.width_px, slide_info.height_px)
        with clock.stage("regions"):
            annotations = read_qupath_geojson(options.regions_path)  # read once: regions, and artefacts to leave out
            regions, region_warnings = regions_from_objects(
                annotations, options.regions_path, slide_size, tumour_class_names=options.tumour_class_names
            )
            reviewed = artefacts_from_objects(annotations, slide_size)
        warnings += region_warnings
        if reviewed:
            tissue = dataclasses.replace(tissue, artefacts=_merged(tissue.artefacts, reviewed))
            warnings.append(
                "artefact annotations in the regions file are left out as well: "
                + ", ".join(f"{kind} ({geometry.area * slide_info.mpp_um_px**2 / 1e6:.3f} mm^2)"
                            for kind, geometry in reviewed.items())
            )
        if segmenter is not None:
            warnings.append(f"regions given with --regions: the segmenter {segmenter.name!r} was not used")
            segmenter = None
    elif segmenter is not None:
        regions = []  # the segmenter's, from its run below (before or alongside the classification)
    else:
        regions = [whole_tissue_region(tissue.polygons)]

    # Tiles are made only where QuPath would nest them: with regions from a file, inside them; for the whole
    # tissue, inside its outline (a tile mostly on tissue whose centre lies just off the traced outline would
    # otherwise be counted in a region QuPath does not put it under). Segmenter regions do not restrict the
    # tiles: tissue they leave out is reported as tiles outside every region.
    with clock.stage("tiling"):
        restrict_to = None
        if options.regions_path is not None:
            restrict_to = shapely.union_all([r.geometry for r in regions])
        elif segmenter is None:
            restrict_to = regions[0].geometry
        grid = build_tile_grid(
            (slide_info.width_px, slide_info.height_px), slide_info.mpp_um_px, tissue, options.tile, restrict_to
        )
        excluded: dict[str, int] = {}
        if not options.keep_artefacts:
            grid, excluded = without_artefacts(grid, tissue.artefacts)
    if not len(grid):
        where = "inside the given regions" if options.regions_path is not None else "on the slide"
        raise NoTissueError(
            f"slide {str(slide_path)!r}: no tile of {options.tile.tile_size_um:g} um has at least "
            f"{options.tile.min_tissue_fraction:.0%} tissue {where} (tissue found: "
            f"{tissue.area_um2() / 1e6:.3f} mm^2). If the slide is blank there is nothing to measure; if its "
            "tissue is faint, lower --min-tissue-fraction or set --tissue-threshold"
        )

    # The segmenter reads its own windows and runs its own model, and only the quantification needs both its
    # regions and the tiles' classes: on a GPU it runs alongside the classification (its window readers, not the
    # GPU, set its pace); on a CPU before it (the two would share the cores: 5-10 % slower measured, README).
    alongside = None
    if segmenter is not None:
        segment = functools.partial(_segment, slide_path, slide_info, tissue, segmenter, options, device=device,
                                    readers=readers, models=models, clock=clock)
        if segments_alongside(options, device):
            alongside = _Alongside(segment, report_progress)
        else:
            segmentation, regions, segmentation_warnings = segment(report_progress)
            warnings += segmentation_warnings
    report_progress("tiles", 0, len(grid))
    try:
        precision = resolve_precision(options.precision, device, encoder_config(pack.encoder_name).recommended_dtype)
        backend = resolve_backend(options.backend, device)
        with clock.stage("model_loading"):
            model = models.classifier(pack, device, backend, precision)

        def classification_progress(stage: str, done: int, total: int) -> None:
            if alongside is not None:
                alongside.raise_if_failed()
            report_progress(stage, done, total)

        with clock.stage("classification"):
            probabilities, embeddings, focus = _classify(slide_path, grid, pack, model, device, precision, options,
                                                         readers, classification_progress)
    except BaseException:
        if alongside is not None:
            alongside.stop()
        raise
    if alongside is not None:
        segmentation, regions, segmentation_warnings = alongside.result()
        warnings += segmentation_warnings
    sharp = focus >= options.min_focus
    if not sharp.all():
        excluded["blur"] = int((~sharp).sum())
        grid, probabilities, focus = grid.subset(sharp), probabilities[sharp], focus[sharp]
        embeddings = embeddings[sharp] if embeddings is not None else None
    if excluded:
        warnings.append(
            "tiles left out of the composition: "
            + ", ".join(f"{n} on {reason}" if reason != "blur" else f"{n} out of focus (focus score below "
                        f"{options.min_focus:g})" for reason, n in excluded.items())
            + " (--keep-artefacts, --min-focus 0 keep them)"
        )

    with clock.stage("quantification"):
        assignment = assign_tiles(grid, regions)
        composition = quantify(
            grid, probabilities.argmax(axis=1), pack.classes, regions, assignment, slide_info.mpp_um_px
        )
    outside, outside_mm2 = composition.outside_regions
    if outside:
        warnings.append(
            f"{outside} of {len(grid)} tiles ({outside_mm2:.3f} mm^2) have their centre outside every "
            "region: they are reported as 'unassigned' and stay at the root of QuPath's hierarchy"
        )
    return AnalysisResult(
        slide=slide_info,
        options=options,
        model=pack.summary(),
        device=str(device),
        precision=precision,
        backend=backend,
        readers=readers,
        classes=pack.classes,
        tissue=tissue,
        grid=grid,
        probabilities=probabilities,
        embeddings=embeddings,
        regions=regions,
        assignment=assignment,
        composition=composition,
        clock=clock,
        warnings=warnings,
        segmenter=segmenter.summary() if segmentation is not None and segmenter is not None else None,
        segmentation=segmentation,
        focus=focus,
        excluded_tiles=excluded,
    )


def segments_alongside(options: AnalysisOptions, device: torch.device) -> bool:
    """Whether a segmenter runs alongside the classification: ``options.segment_alongside``, else on a GPU."""
    return options.segment_alongside if options.segment_alongside is not None else device.type == "cuda"


class _Stopped(Exception):
    """Ends the segmenter's run when the classification beside it failed or was cancelled."""


class _Alongside:
    """``run(progress)`` in a thread of its own while this one classifies. Its progress is reported once the
    classification is done (until then the tiles' is: one stage at a time for watchers and progress bars); it
    ends at its next batch when the classification fails or is cancelled, and a failure of its own ends the
    classification at the next batch rather than after every tile."""

    def __init__(self, run: Callable[[ProgressCallback], object], report_progress: ProgressCallback) -> None:
        self._report = report_progress
        self._classified = threading.Event()
        self._stopping = threading.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segmentation")
        self._future = self._thread.submit(run, self._progress)

    def _progress(self, stage: str, done: int, total: int) -> None:
        if self._stopping.is_set():
            raise _Stopped()
        if self._classified.is_set():
            self._report(stage, done, total)  # may raise (a cancelled job): ends this run, re-raised by result()

    def raise_if_failed(self) -> None:
        if self._future.done() and self._future.exception() is not None:
            raise self._future.exception()

    def result(self):
        self._classified.set()
        try:
            return self._future.result()
        finally:
            self._thread.shutdown(wait=True)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.shutdown(wait=True)  # its own error, if any, is not the one the caller is raising


def _classify(
    slide_path: str | Path,
    grid: TileGrid,
    pack: ModelPack,
    model,
    device: torch.device,
    precision: str,
    options: AnalysisOptions,
    readers: str,
    report_progress: ProgressCallback,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Every tile's class probabilities, embeddings (when kept) and focus score, read and classified in
    batches."""
    probabilities = np.empty((len(grid), len(pack.classes)), dtype=np.float32)
    embeddings = (
        np.empty((len(grid), encoder_config(pack.encoder_name).embedding_dim), dtype=np.float32) if options.keep_embeddings else None
    )
    batches = iter_tile_batches(
        slide_path, grid, out_size_px=pack.input_size_px, batch_size=options.batch_size,
        num_workers=options.num_workers, focus_px=options.tile.tile_size_px, readers=readers,
    )
    focus = np.empty(len(grid), dtype=np.float32)

    def noting_focus(tile_batches):
        for batch in tile_batches:
            focus[batch.start : batch.start + len(batch)] = batch.focus
            yield batch

    done = 0
    with contextlib.closing(batches):  # reader threads and slide handles end even when a batch fails
        for prediction in predict_batches(model, noting_focus(batches), device,
                                          keep_embeddings=options.keep_embeddings, precision=precision):
            stop = prediction.start + len(prediction.probabilities)
            probabilities[prediction.start : stop] = prediction.probabilities
            if embeddings is not None and prediction.embeddings is not None:
                embeddings[prediction.start : stop] = prediction.embeddings
            done += len(prediction.probabilities)
            report_progress("tiles", done, len(grid))
    return probabilities, embeddings, focus


def _merged(detected: dict, reviewed: dict) -> dict:
    """Artefacts by kind: what was detected and what the regions file marks, united."""
    kinds = dict.fromkeys([*detected, *reviewed])
    return {
        kind: polygonal_part(shapely.union_all([g for g in (detected.get(kind), reviewed.get(kind)) if g is not None]))
        for kind in kinds
    }

