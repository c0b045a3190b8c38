"""What an analysis can be asked, in one place: the proto's ``AnalysisRequest``, and :func:`resolve_options`,
which turns one into the engine's :class:`~hepatoquant.analysis.AnalysisOptions` against a model pack.

Every entry point maps onto the request and nothing else: ``hepatoquant analyze`` flags
(:data:`CLI_FLAGS`), a cohort CSV's columns and ``cohort run`` flags (:data:`COHORT_SOURCES`), gRPC, the
HTTP/JSON gateway (the proto's JSON mapping) and the QuPath scripts' settings. Defaults live here only: a
field that is absent takes the pack's value or the documented default; a field that is given, 0 included, is
validated by the options it lands in and never replaced. What is not part of a request is the process's
:class:`Runtime` (device, backend, batch size, reader threads, default precision): one machine's business, set when it
starts (``analyze`` and ``cohort run`` flags, ``serve`` flags), not per slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hepatoquant_client._generated.hepatoquant.v1 import hepatoquant_pb2 as pb

from hepatoquant.errors import InvalidParameterError
from hepatoquant.input_checks import validate_mpp

if TYPE_CHECKING:  # the engine's modules load torch: imported when options are resolved, not with the schema
    from hepatoquant.analysis import AnalysisOptions
    from hepatoquant.model_pack import ModelPack

__all__ = ["AnalysisRequest", "Runtime", "resolve_options", "CLI_FLAGS", "COHORT_SOURCES", "DEFAULT_MIN_TISSUE_FRACTION"]

AnalysisRequest = pb.AnalysisRequest
DEFAULT_MIN_TISSUE_FRACTION = 0.5

# Where each request field comes from on the command line (``hepatoquant analyze``) and in a cohort run (a CSV
# column, or a ``cohort run`` flag applied to every slide). tests/test_analysis_request.py checks that every
# field of the proto is listed here and really reaches the request from each entry point.
CLI_FLAGS: dict[str, str] = {
    "slide": "SLIDE",
    "mpp_um_px": "--mpp",
    "regions_geojson": "--regions",
    "model": "--model",
    "segmenter_model": "--seg-model",
    "tile_size_px": "--tile-size",
    "tile_spacing_um_px": "--tile-spacing",
    "min_tissue_fraction": "--min-tissue-fraction",
    "tumour_class_names": "--tumour-classes",
    "tile_object_type": "--tile-object",
    "omit_tiles": "--omit-tiles",
    "include_embeddings": "--save-embeddings",
    "tissue_threshold": "--tissue-threshold",
    "window_overlap": "--window-overlap",
    "min_focus": "--min-focus",
    "keep_artefacts": "--keep-artefacts",
    "precision": "--precision",
    "embeddings_format": "--embeddings-format",
}
COHORT_SOURCES: dict[str, str] = {
    "slide": "column slide",
    "mpp_um_px": "column mpp",
    "regions_geojson": "column regions",
    **{name: flag for name, flag in CLI_FLAGS.items() if name not in ("slide", "mpp_um_px", "regions_geojson")},
}


@dataclass(frozen=True)
class Runtime:
    """How this process runs analyses, as opposed to what a request asks: the same for every slide."""

    device: str = "auto"
    batch_size: int = 32
    num_workers: int = 2  # tile and window readers
    precision: str = "auto"  # used when a request leaves its precision empty
    backend: str = "auto"  # the models': torch, or openvino on CPUs (hepatoquant.inference_backend)
    readers: str = "auto"  # threads or processes (hepatoquant.tile_reader.resolve_readers)


def resolve_options(
    request: pb.AnalysisRequest, pack: ModelPack, runtime: Runtime, *, regions_path: Path | None = None
) -> AnalysisOptions:
    """The engine's options for ``request`` with classifier ``pack``. ``regions_path`` is the request's
    regions as a file (the command line and cohorts name one; the server writes ``regions_geojson`` to one).
    Raises :class:`InvalidParameterError` naming the field for a value out of range."""
    from hepatoquant.analysis import AnalysisOptions
    from hepatoquant.precision import PRECISIONS
    from hepatoquant.regions import DEFAULT_TUMOUR_CLASS_NAMES
    from hepatoquant.segmentation.inference import SlidingWindowParams
    from hepatoquant.tiling import TileSpec
    from hepatoquant.tissue import TissueDetectionParams

    def given(name: str):
        return getattr(request, name) if request.HasField(name) else None

    mpp = given("mpp_um_px")
    if mpp is not None:
        validate_mpp(mpp, what="mpp_um_px")
    embeddings_formats = _embeddings_formats(request)
    precision = request.precision or runtime.precision
    if precision not in PRECISIONS:
        raise InvalidParameterError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    tile_size, spacing = given("tile_size_px"), given("tile_spacing_um_px")
    min_fraction = given("min_tissue_fraction")
    overlap = given("window_overlap")
    min_focus = given("min_focus")
    return AnalysisOptions(
        tile=TileSpec(
            tile_size_px=pack.tile_size_px if tile_size is None else tile_size,
            spacing_um_px=pack.spacing_um_px if spacing is None else spacing,
            min_tissue_fraction=DEFAULT_MIN_TISSUE_FRACTION if min_fraction is None else min_fraction,
        ),
        tissue=TissueDetectionParams(saturation_threshold=given("tissue_threshold")),
        mpp_override_um_px=mpp,
        regions_path=regions_path,
        tumour_class_names=tuple(request.tumour_class_names) or DEFAULT_TUMOUR_CLASS_NAMES,
        batch_size=runtime.batch_size,
        num_workers=runtime.num_workers,
        device=runtime.device,
        backend=runtime.backend,
        readers=runtime.readers,
        keep_embeddings=request.include_embeddings,
        embeddings_formats=embeddings_formats,
        tile_object_type=request.tile_object_type or "detection",
        windows=SlidingWindowParams(
            overlap=SlidingWindowParams.overlap if overlap is None else overlap, num_workers=runtime.num_workers
        ),
        precision=precision,
        min_focus=AnalysisOptions.min_focus if min_focus is None else min_focus,
        keep_artefacts=request.keep_artefacts,
    )


EMBEDDINGS_FORMATS: dict[str, tuple[str, ...]] = {"h5": ("h5",), "npz": ("npz",), "both": ("h5", "npz")}


def _embeddings_formats(request: pb.AnalysisRequest) -> tuple[str, ...]:
    """The files the embeddings go to: CLAM / TRIDENT's ``.features.h5``, the ``.npz``, or both (empty)."""
    name = request.embeddings_format
    if not name:
        return EMBEDDINGS_FORMATS["both"]
    if name not in EMBEDDINGS_FORMATS:
        raise InvalidParameterError(
            f"embeddings_format {name!r} is not one of {', '.join(EMBEDDINGS_FORMATS)} (empty: both)"
        )
    if not request.include_embeddings:
        raise InvalidParameterError(
            f"embeddings_format {name!r} is given but no embeddings are kept: ask for them too "
            "(include_embeddings, --save-embeddings) or leave the format out"
        )
    return EMBEDDINGS_FORMATS[name]
