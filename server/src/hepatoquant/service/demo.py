"""`hepatoquant demo`: the main job through the server, as a lab would run it.

Starts a server on free loopback ports (slide root: the slide's folder), submits the slide over gRPC, streams
the job's progress, fetches the result and writes the GeoJSON, report, cohort row and overlay, then stops the
server. Everything a client of the API does, in one command.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc
from hepatoquant_client.proto import pb, pb_grpc
from hepatoquant_client.results import AnalysisOutcome
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hepatoquant.errors import HepatoQuantError
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

__all__ = ["run_demo"]


class DemoJobError(HepatoQuantError, RuntimeError):
    """The demo's job did not succeed."""


def run_demo(slide: Path, out_dir: Path, *, models_dir: Path | None, model: str, segmenter: str,
             console: Console) -> Path:
    slide = slide.resolve()
    with tempfile.TemporaryDirectory(prefix="hepatoquant-demo-") as state:
        config = ServerConfig(slide_roots=(slide.parent,), state_dir=Path(state), models_dir=models_dir,
                              default_model=model, default_segmenter=segmenter)
        running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
        console.print(f"server started: gRPC 127.0.0.1:{running.grpc_port}, HTTP/JSON 127.0.0.1:{running.http_port}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
                stub = pb_grpc.HepatoQuantStub(channel)
                job = stub.SubmitAnalysis(pb.AnalysisRequest(slide=slide.name))
                console.print(f"submitted {slide.name}: job {job.job_id}")
                final = _watch(stub, job.job_id, console)
                if final.state != pb.JOB_STATE_SUCCEEDED:
                    raise DemoJobError(f"job {job.job_id} ended {pb.JobState.Name(final.state)}: {final.error_message}")
                result = stub.GetResult(pb.GetResultRequest(job_id=job.job_id))
        finally:
            running.stop(grace_seconds=2)
            console.print("server stopped")
    AnalysisOutcome.from_proto(result).write(out_dir)  # as the Python client writes a result, rasters included
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(_table(result))
    return out_dir


def _watch(stub, job_id: str, console: Console) -> pb.Job:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console)
    tasks: dict[str, int] = {}
    final = None
    with progress:
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            final = event.job
            stage = final.progress.stage
            if stage:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=final.progress.total or 1, rate="")
                rate = f"{final.progress.items_per_second:.1f}/s" if final.progress.items_per_second else ""
                progress.update(tasks[stage], completed=final.progress.done, total=final.progress.total or 1, rate=rate)
    return final


def _table(result: pb.AnalysisResult) -> Table:
    status = " (UNTRAINED DEMO MODEL)" if result.model_status == "untrained-demo" else ""
    table = Table(title=f"{result.slide_stem}{status}: % of each region's tiles")
    codes = [c.code for c in result.region_classes[0].classes] if result.region_classes else []
    for column in ("region", "tiles", *codes):
        table.add_column(column, justify="left" if column == "region" else "right")
    for entry in result.region_classes:
        table.add_row(entry.region_class, str(entry.tile_count), *(f"{c.percent:.1f}" if c.HasField("percent") else "-" for c in entry.classes))
    return table
