"""Conversions between the API's protobuf messages and the engine's domain types (one place for all)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from hepatoquant_client.classes import HepatoClass
from hepatoquant_client.proto import pb
from hepatoquant_client.slide_report import SlideReport

from hepatoquant.model_pack import ModelPack
from hepatoquant.service.jobs import JobRecord, JobState

__all__ = [
    "request_to_json",
    "request_from_json",
    "job_to_proto",
    "result_to_proto",
    "pack_to_proto",
    "class_to_proto",
]

_STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
    JobState.INTERRUPTED: pb.JOB_STATE_INTERRUPTED,
}


def request_to_json(request: pb.AnalysisRequest) -> str:
    """Canonical JSON (sorted keys, defaults omitted): equal requests give equal text, for reuse keys."""
    return json.dumps(json_format.MessageToDict(request), sort_keys=True, separators=(",", ":"))


def request_from_json(text: str) -> pb.AnalysisRequest:
    return json_format.ParseDict(json.loads(text), pb.AnalysisRequest())


@functools.lru_cache(maxsize=1024)
def _stored_request(text: str) -> pb.AnalysisRequest:
    """A job's request, parsed once: every progress event of a job repeats it, and parsing JSON into a message
    is pure Python on the server's event loop. Shared: only read (``pb.Job(request=...)`` copies it)."""
    return request_from_json(text)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_to_proto(record: JobRecord) -> pb.Job:
    eta = (record.total - record.done) / record.items_per_second if record.items_per_second > 0 else 0.0
    return pb.Job(
        job_id=record.job_id,
        state=_STATES[record.state],
        request=_stored_request(record.request_json),
        progress=pb.Progress(
            stage=record.stage, done=record.done, total=record.total,
            items_per_second=record.items_per_second, eta_seconds=max(0.0, eta),
        ),
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        error_code=record.error_code,
        error_message=record.error_message,
        reused_result=record.reused_from is not None,
    )


def result_to_proto(job_id: str, result_dir: Path) -> pb.AnalysisResult:
    """The stored outputs of a job (report, GeoJSON, CSV, overlay, rasters) as the API's result message; the
    rasters are absent from results stored before they were written (empty fields)."""
    report_path = next(result_dir.glob("*.report.json"))
    report_json = report_path.read_text()
    stem = report_path.name.removesuffix(".report.json")
    return SlideReport.from_json(report_json, source=f"the report of job {job_id}").to_proto(
        job_id=job_id,
        report_json=report_json,
        qupath_geojson=(result_dir / f"{stem}.geojson").read_bytes(),
        cohort_csv=(result_dir / f"{stem}.csv").read_bytes(),
        overlay_png=(result_dir / f"{stem}.overlay.png").read_bytes(),
        tissue_map_tiff=_read_if_present(result_dir / f"{stem}.tissue-map.tif"),
        region_mask_tiff=_read_if_present(result_dir / f"{stem}.region-mask.tif"),
        slide_stem=stem,
    )


def _read_if_present(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def pack_to_proto(pack: ModelPack) -> pb.ModelPackInfo:
    return pb.ModelPackInfo(
        name=pack.path.name, kind=pack.kind, encoder=pack.encoder_name, model_status=pack.model_status,
        classes=list(pack.classes), spacing_um_px=pack.spacing_um_px, input_size_px=pack.input_size_px,
        licence_note=pack.manifest["licence_note"],
    )


def class_to_proto(cls: HepatoClass) -> pb.TissueClassInfo:
    return pb.TissueClassInfo(
        code=cls.code, qupath_name=cls.qupath_name, display_name=cls.display_name, color_rgb=list(cls.color_rgb)
    )
