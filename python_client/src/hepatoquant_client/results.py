"""Typed results of the HepatoQuant API as the client hands them out: an analysis's outcome (composition per
region and region class, report, QuPath GeoJSON, cohort row, overlay), a job's progress, tile predictions and the
server's description. Built from the proto messages; no grpc call here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic_files import replace_atomically
from .classes import HepatoClass
from .errors import HepatoQuantClientError
from .proto import pb
from .slide_report import ClassShare, RegionShare, SlideReport

if TYPE_CHECKING:  # shapely (and so numpy) is imported only when objects are parsed
    from .qupath_geojson import QuPathObject

__all__ = ["AnalysisOutcome", "ClassShare", "FINAL_STATES", "JobProgress", "ModelInfo", "RegionShare", "ServerInfo",
           "TilePrediction"]

def _state_name(state: int) -> str:
    """``queued``, ``running``, ... from the proto's ``JOB_STATE_QUEUED``, ...; ``unspecified`` for an unknown value
    (a newer server's state)."""
    try:
        return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()
    except ValueError:
        return "unspecified"


FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
# Codes of a job that did not succeed but carries no error code (older servers): the closest status name.
_FALLBACK_JOB_CODES = {"failed": "UNKNOWN", "cancelled": "CANCELLED", "interrupted": "UNAVAILABLE"}


# Output files of an analysis, in the order written: suffix after the slide stem, and the outcome's attribute.
_OUTPUT_FILES: tuple[tuple[str, str], ...] = (
    (".geojson", "qupath_geojson"),
    (".report.json", "report_json"),
    (".csv", "cohort_csv"),
    (".overlay.png", "overlay_png"),
    (".tissue-map.tif", "tissue_map_tiff"),  # these two are empty from servers that did not send them
    (".region-mask.tif", "region_mask_tiff"),
)


@dataclass(frozen=True)
class AnalysisOutcome:
    """The result of a succeeded analysis job.

    ``regions`` has one entry per region (and unassigned tiles), ``region_classes`` one per region class;
    ``headline_indicators`` maps ``"<region_class>/<code>"`` to a percent. ``model_status`` ``untrained-demo``
    means the class labels are meaningless. ``qupath_geojson`` is a FeatureCollection in level-0 pixel
    coordinates for QuPath's "Import objects"; ``report`` is the full versioned report.
    """

    job_id: str
    model_status: str
    regions: tuple[RegionShare, ...]
    region_classes: tuple[RegionShare, ...]
    headline_indicators: dict[str, float]
    report: dict[str, Any] = field(repr=False)
    qupath_geojson: bytes = field(repr=False)
    cohort_csv: bytes = field(repr=False)
    overlay_png: bytes = field(repr=False)
    slide_stem: str
    warnings: tuple[str, ...]
    report_json: str = field(default="", repr=False, compare=False)  # the report as the server wrote it
    tissue_map_tiff: bytes = field(default=b"", repr=False)  # one pixel per tile position: its class (0 = none)
    region_mask_tiff: bytes = field(default=b"", repr=False)  # the regions as a label raster

    @classmethod
    def from_proto(cls, message: pb.AnalysisResult) -> AnalysisOutcome:
        report_text = message.report_json
        try:
            report = json.loads(report_text) if report_text else {}
        except json.JSONDecodeError as exc:
            raise HepatoQuantClientError.for_code(
                "DATA_LOSS", f"the report of job {message.job_id} is not JSON ({exc}); ask the server's operator"
            ) from None
        return cls(
            job_id=message.job_id,
            model_status=message.model_status,
            regions=tuple(RegionShare.from_proto(r) for r in message.regions),
            region_classes=tuple(RegionShare.from_proto(r) for r in message.region_classes),
            headline_indicators=dict(message.headline_indicators_percent),
            report=report,
            qupath_geojson=bytes(message.qupath_geojson),
            cohort_csv=bytes(message.cohort_csv),
            overlay_png=bytes(message.overlay_png),
            slide_stem=message.slide_stem,
            warnings=tuple(message.warnings),
            report_json=report_text or json.dumps(report, indent=2),
            tissue_map_tiff=bytes(message.tissue_map_tiff),
            region_mask_tiff=bytes(message.region_mask_tiff),
        )

    @property
    def stem(self) -> str:
        """A safe file-name stem: the server's slide stem without any folder part (the job id if empty)."""
        stem = Path(self.slide_stem.replace("\\", "/")).name
        return stem if stem not in ("", ".", "..") else self.job_id

    def output_names(self) -> list[str]:
        """The file names :meth:`write` writes: ``<stem>.geojson``, ``.report.json``, ``.csv``, ``.overlay.png``
        and, where the server sent them, ``.tissue-map.tif`` and ``.region-mask.tif``."""
        return [f"{self.stem}{suffix}" for suffix, attribute in self._outputs()]

    def _outputs(self) -> list[tuple[str, str]]:
        return [(suffix, attribute) for suffix, attribute in _OUTPUT_FILES
                if getattr(self, attribute) or not attribute.endswith("_tiff")]

    def write(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write the outputs (:meth:`output_names`) into ``out_dir`` (created if needed), each atomically (temporary file in the
        same folder, then ``os.replace``): a reader never sees half a file. Returns the paths written."""
        folder = Path(out_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HepatoQuantClientError.for_code(
                "FAILED_PRECONDITION", f"cannot create the output folder {folder}: {exc.strerror or exc}; "
                "choose a folder you can write to"
            ) from None
        written = []
        for suffix, attribute in self._outputs():
            value = getattr(self, attribute)
            data = value.encode() if isinstance(value, str) else value
            target = folder / f"{self.stem}{suffix}"
            write_atomically(target, data)
            written.append(target)
        return written

    def slide_report(self) -> SlideReport:
        """The report as the typed :class:`SlideReport`; :class:`ReportFormatError` when it is not a report."""
        return SlideReport.from_report(self.report, source=f"the report of job {self.job_id}")

    def to_row(self, *, slide: str | None = None) -> dict[str, Any]:
        """This slide's cohort row (:meth:`SlideReport.to_row`), named ``slide`` (default: the slide's stem)."""
        return self.slide_report().to_row(slide=slide or self.stem, job_id=self.job_id)

    def qupath_objects(self) -> list[QuPathObject]:
        """The result's QuPath objects (regions as annotations, tiles as detections or tiles) as Python values."""
        from .qupath_geojson import parse_qupath_geojson

        return parse_qupath_geojson(self.qupath_geojson, source=f"job {self.job_id} GeoJSON")

    def records(self, *, by: str = "region_classes") -> list[dict[str, Any]]:
        """Long-form composition, one dict per (region, class): ``by="region_classes"`` or ``by="regions"``."""
        if by not in ("region_classes", "regions"):
            raise ValueError(f"by={by!r}: expected 'region_classes' or 'regions'")
        return [row for entry in getattr(self, by) for row in entry.records()]


def write_atomically(target: Path, data: bytes) -> None:
    """``data`` into ``target`` atomically; a failure is a FAILED_PRECONDITION client error naming the file."""
    try:
        replace_atomically(target, lambda temporary: temporary.write_bytes(data))
    except OSError as exc:
        raise HepatoQuantClientError.for_code(
            "FAILED_PRECONDITION", f"cannot write {target}: {exc.strerror or exc}; check the folder and free space"
        ) from None


@dataclass(frozen=True)
class JobProgress:
    """A job's state and progress as last seen.

    ``state`` is queued, running, succeeded, failed, cancelled or interrupted; ``stage`` is tissue, windows,
    tiles or outputs; ``done`` / ``total`` count the stage's items. ``error_code`` (a gRPC status name) and
    ``error_message`` say why a job did not succeed; ``reused_result`` is true when an identical earlier
    request's result answers this job.
    """

    job_id: str
    state: str
    stage: str
    done: int
    total: int
    items_per_second: float
    eta_seconds: float
    error_code: str = ""
    error_message: str = ""
    reused_result: bool = False

    @classmethod
    def from_proto(cls, job: pb.Job) -> JobProgress:
        return cls(
            job_id=job.job_id,
            state=_state_name(job.state),
            stage=job.progress.stage,
            done=int(job.progress.done),
            total=int(job.progress.total),
            items_per_second=job.progress.items_per_second,
            eta_seconds=job.progress.eta_seconds,
            error_code=job.error_code,
            error_message=job.error_message,
            reused_result=job.reused_result,
        )

    @property
    def finished(self) -> bool:
        """True once the job is in a final state (succeeded, failed, cancelled, interrupted)."""
        return self.state in FINAL_STATES

    def raise_for_state(self) -> None:
        """Raise :class:`HepatoQuantClientError` with the job's code and message unless it succeeded."""
        if self.state == "succeeded":
            return
        if not self.finished:
            raise HepatoQuantClientError.for_code(
                "FAILED_PRECONDITION", f"job {self.job_id} is {self.state}, not finished; watch it and ask again"
            )
        code = self.error_code or _FALLBACK_JOB_CODES.get(self.state, "UNKNOWN")
        message = self.error_message or f"job {self.job_id} ended {self.state}"
        raise HepatoQuantClientError.for_code(code, message)


@dataclass(frozen=True)
class TilePrediction:
    """One tile's most probable class, the probability of each class (summing to 1), and its embedding
    (empty unless asked for)."""

    code: str
    probabilities: dict[str, float]
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """A model pack the server holds (``name`` is what ``model`` / ``segmenter_model`` take)."""

    name: str
    kind: str
    encoder: str
    model_status: str
    classes: tuple[str, ...]
    spacing_um_px: float
    input_size_px: int
    licence_note: str


@dataclass(frozen=True)
class ServerInfo:
    """Versions, model packs, classes, limits and slide roots of a server."""

    version: str
    library_versions: dict[str, str]
    models: tuple[ModelInfo, ...]
    tissue_classes: tuple[HepatoClass, ...]
    region_classes: tuple[HepatoClass, ...]
    slide_roots: tuple[str, ...]
    max_queued_jobs: int
    max_message_bytes: int
    device: str
    notice: str

    @classmethod
    def from_proto(cls, message: pb.ServerInfo) -> ServerInfo:
        def hepato_class(c: pb.TissueClassInfo) -> HepatoClass:
            rgb = tuple(c.color_rgb) if len(c.color_rgb) == 3 else (0, 0, 0)
            return HepatoClass(c.code, c.qupath_name, c.display_name, rgb)  # type: ignore[arg-type]

        return cls(
            version=message.version,
            library_versions=dict(message.library_versions),
            models=tuple(
                ModelInfo(m.name, m.kind, m.encoder, m.model_status, tuple(m.classes), m.spacing_um_px,
                          m.input_size_px, m.licence_note)
                for m in message.models
            ),
            tissue_classes=tuple(hepato_class(c) for c in message.tissue_classes),
            region_classes=tuple(hepato_class(c) for c in message.region_classes),
            slide_roots=tuple(message.slide_roots),
            max_queued_jobs=message.max_queued_jobs,
            max_message_bytes=message.max_message_bytes,
            device=message.device,
            notice=message.notice,
        )
