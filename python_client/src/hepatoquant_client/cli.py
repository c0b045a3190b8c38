"""`hepatoquant-client`: the server's information and a slide's analysis, from the command line.

    hepatoquant-client info --server HOST:PORT [--token-file F]
    hepatoquant-client analyze SLIDE --server HOST:PORT --out DIR [--regions F] [--mpp X] [--model M]
                               [--seg-model S] [--token-file F]
    hepatoquant-client project QUPATH_PROJECT --server HOST:PORT --map FROM=TO [--map ...] [--image NAME ...]
                               [--region-class C ...] [--tumour-class C ...] [--mpp X] [--model M]
                               [--seg-model S] [--cohort FILE.csv] [--token-file F]
    hepatoquant-client import-geojson QUPATH_PROJECT IMAGE FILE.geojson
    hepatoquant-client export-annotations QUPATH_PROJECT OUT_DIR [--image NAME ...] [--class C ...]

``project`` analyses every image of a QuPath project (paquo, which needs a QuPath installation named by
PAQUO_QUPATH_DIR) and replaces HepatoQuant's objects in it, never a pathologist's; ``--map`` turns the images'
file URIs into paths on the server. An image that fails is left as it was and the others go on; the exit status
is then 1. ``import-geojson`` puts an ``analyze`` output into one image; ``export-annotations`` writes each
image's own annotations as QuPath GeoJSON (for ``analyze --regions``). These two need no server.

Progress goes to stderr, the composition table to stdout. A failure prints one line,
``hepatoquant-client: error: <message>``, and exits with status 2. ``--help`` works offline (nothing connects
before a command runs). Without ``--token-file`` the token is read from ``HEPATOQUANT_TOKEN`` if set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

__all__ = ["main"]

PROG = "hepatoquant-client"
TOKEN_ENV = "HEPATOQUANT_TOKEN"
# Progress lines within one stage are printed at most this often (a stage change or the end always prints).
PROGRESS_INTERVAL_S = 1.0


class _UsageError(Exception):
    """A problem with the command line or a local file, reported like a server error."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Client of a HepatoQuant server (research use only).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def connection(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--server", required=True, metavar="HOST:PORT", help="gRPC address of the server")
        sub.add_argument("--token-file", type=Path, metavar="F",
                         help=f"file holding the bearer token (default: ${TOKEN_ENV} if set)")
        sub.add_argument("--tls-ca", type=Path, metavar="PEM", help="use TLS, trusting this CA certificate file")
        sub.add_argument("--timeout", type=float, default=30.0, metavar="S",
                         help="seconds each request may take (default 30; watching a job is not limited)")

    info = commands.add_parser("info", help="versions, models with their status, slide roots")
    connection(info)

    analyze = commands.add_parser("analyze", help="analyse a slide and write GeoJSON, report, CSV and overlay")
    analyze.add_argument("slide", metavar="SLIDE",
                         help="slide path on the server: absolute, or relative to its first slide root")
    connection(analyze)
    analyze.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the four outputs")
    analyze.add_argument("--regions", type=Path, metavar="F", help="QuPath GeoJSON with tumour / non-tumour regions")
    analyze.add_argument("--mpp", type=float, metavar="X", help="pixel size in um/px for slides without it")
    analyze.add_argument("--model", default="", metavar="M", help="classifier pack (default: the server's)")
    analyze.add_argument("--seg-model", default="", metavar="S",
                         help="segmenter pack (default: the server's; 'none' = whole tissue as one region)")

    project = commands.add_parser("project", help="analyse every image of a QuPath project and write the results into it")
    project.add_argument("qupath_project", type=Path, metavar="QUPATH_PROJECT", help="QuPath project folder")
    connection(project)
    project.add_argument("--map", action="append", default=[], required=True, metavar="FROM=TO",
                         help="image path prefix as QuPath has it = the same folder on the server (repeatable)")
    project.add_argument("--image", action="append", metavar="NAME", help="only this image (repeatable)")
    project.add_argument("--region-class", action="append", metavar="C",
                         help="send the image's annotations of this class as regions (repeatable)")
    project.add_argument("--tumour-class", action="append", metavar="C",
                         help="region classes that are tumour (default: the server's)")
    project.add_argument("--mpp", type=float, metavar="X",
                         help="pixel size in um/px sent with every image (for slides without it; it overrides the "
                              "slides' own metadata, so limit it with --image in a mixed project)")
    project.add_argument("--model", default="", metavar="M", help="classifier pack (default: the server's)")
    project.add_argument("--seg-model", default="", metavar="S", help="segmenter pack (default: the server's)")
    project.add_argument("--cohort", type=Path, metavar="FILE.csv",
                         help="write the cohort table (one row per image) here, and Parquet next to it if possible")

    import_geojson = commands.add_parser("import-geojson",
                                         help="put HepatoQuant's GeoJSON objects into one image of a QuPath project")
    import_geojson.add_argument("qupath_project", type=Path, metavar="QUPATH_PROJECT", help="QuPath project folder")
    import_geojson.add_argument("image", metavar="IMAGE", help="the image's name in the project")
    import_geojson.add_argument("geojson", type=Path, metavar="FILE.geojson", help="an analyze output (.geojson)")

    export = commands.add_parser("export-annotations",
                                 help="write each image's own annotations of a QuPath project as GeoJSON files")
    export.add_argument("qupath_project", type=Path, metavar="QUPATH_PROJECT", help="QuPath project folder")
    export.add_argument("out", type=Path, metavar="OUT_DIR", help="folder for <image name>.geojson files")
    export.add_argument("--image", action="append", metavar="NAME", help="only this image (repeatable)")
    export.add_argument("--class", dest="class_names", action="append", metavar="C",
                        help="only annotations of this class (repeatable)")
    return parser


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = args.token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise _UsageError(f"cannot read the token file {args.token_file}: {exc.strerror or exc}") from None
    if not token:
        raise _UsageError(f"the token file {args.token_file} is empty; put the server's token in it")
    return token


def _tls(args: argparse.Namespace) -> bytes | None:
    if args.tls_ca is None:
        return None
    try:
        return args.tls_ca.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read the CA certificate {args.tls_ca}: {exc.strerror or exc}") from None


def _run_info(client, out: TextIO) -> int:
    info = client.info()
    print(f"HepatoQuant server {info.version} on {info.device or 'unknown device'}", file=out)
    if info.library_versions:
        print("libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(info.library_versions.items())), file=out)
    print("models:", file=out)
    if not info.models:
        print("  (none)", file=out)
    width = max((len(m.name) for m in info.models), default=0)
    for m in info.models:
        warning = "  (random labels: demo only)" if m.model_status == "untrained-demo" else ""
        print(f"  {m.name:<{width}}  {m.kind:<10}  encoder {m.encoder:<16}  {m.model_status}{warning}", file=out)
    print("slide roots:", file=out)
    for root in info.slide_roots or ("(none)",):
        print(f"  {root}", file=out)
    print(f"queue: up to {info.max_queued_jobs} job(s); messages up to {info.max_message_bytes // 2**20} MiB", file=out)
    if info.notice:
        print(info.notice, file=out)
    return 0


class _ProgressPrinter:
    """stderr lines ``stage done/total rate [state]``: on every stage or state change (with the stage's last
    count before it), and otherwise at most every PROGRESS_INTERVAL_S."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.job_id = ""
        self.last_key: tuple[str, str] | None = None
        self.last_time = 0.0
        self.unprinted = None  # the newest event not printed yet (throttled)

    def __call__(self, progress) -> None:
        if progress.job_id != self.job_id:
            self.job_id = progress.job_id
            reused = " (reusing an identical earlier result)" if progress.reused_result else ""
            print(f"job {progress.job_id}: {progress.state}{reused}", file=self.err, flush=True)
        key = (progress.state, progress.stage)
        now = time.monotonic()
        if key == self.last_key and not progress.finished and now - self.last_time < PROGRESS_INTERVAL_S:
            self.unprinted = progress
            return
        if key != self.last_key and self.unprinted is not None:
            self._print(self.unprinted)  # where the previous stage ended
        self.last_key, self.last_time, self.unprinted = key, now, None
        self._print(progress)

    def _print(self, progress) -> None:
        if progress.stage:
            rate = f" {progress.items_per_second:.1f}/s" if progress.items_per_second else ""
            eta = f" eta {progress.eta_seconds:.0f}s" if progress.eta_seconds and not progress.finished else ""
            line = f"{progress.stage} {progress.done}/{progress.total}{rate}{eta} [{progress.state}]"
        else:
            line = f"[{progress.state}]"
        print(line, file=self.err, flush=True)


def _composition_table(outcome) -> str:
    """Plain text: one row per region class and region, columns tiles, area and % of each tissue class."""
    entries = [("class", e) for e in outcome.region_classes] + [("region", e) for e in outcome.regions]
    codes: list[str] = []
    for _, entry in entries:
        codes += [c.code for c in entry.classes if c.code not in codes]
    header = ["region", "kind", "tiles", "tile mm2", *(f"{c} %" for c in codes)]
    rows = [header]
    for kind, entry in entries:
        label = entry.region_class if kind == "class" else (entry.name or entry.region_class)
        shares = {c.code: c.percent for c in entry.classes}
        rows.append([label, kind if kind == "region" else "all", str(entry.tile_count), f"{entry.tile_area_mm2:.3f}",
                     *(f"{shares[c]:.1f}" if shares.get(c) is not None else "-" for c in codes)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    status = "  (UNTRAINED DEMO MODEL: labels are meaningless)" if outcome.model_status == "untrained-demo" else ""
    title = f"{outcome.slide_stem}: % of each region's classified tiles{status}"
    return "\n".join([title, *lines])


def _request_options(args: argparse.Namespace) -> dict[str, object]:
    """The AnalysisRequest fields both commands take: only those given (the server's defaults otherwise)."""
    given = {"mpp_um_px": args.mpp, "model": args.model or None, "segmenter_model": args.seg_model or None}
    return {name: value for name, value in given.items() if value is not None}


def _run_analyze(client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    options = _request_options(args)
    if args.regions is not None:
        options["regions_geojson"] = args.regions  # a Path: read here, sent as text
    outcome = client.analyze(args.slide, on_progress=_ProgressPrinter(err), **options)
    for path in outcome.write(args.out):
        print(f"wrote {path}", file=err)
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=err)
    print(_composition_table(outcome), file=out)
    return 0


def _run_project(client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .cohort import cohort_rows, summary_table, write_cohort
    from .paquo_project import analyze_project
    from .project_plan import parse_mappings

    options = _request_options(args)
    if args.tumour_class:
        options["tumour_class_names"] = args.tumour_class
    results = analyze_project(args.qupath_project, client, mappings=parse_mappings(args.map), images=args.image,
                              region_class=args.region_class, **options)
    for result in results:
        if result.status == "written":
            print(f"image {result.image_name}: wrote {result.added} object(s), replaced {result.removed}", file=err)
        else:
            print(f"image {result.image_name}: failed, left as it was: {result.error}", file=err)
    rows = cohort_rows((r.image_name, r.outcome) for r in results if r.outcome is not None)
    if args.cohort is not None:
        files = write_cohort(rows, args.cohort)
        for path in files.written:
            print(f"wrote {path}", file=err)
        for path, reason in files.not_written:
            print(f"not written: {path}: {reason}", file=err)
    print(summary_table(rows), file=out, end="")
    failed = sum(r.status != "written" for r in results)
    if failed:
        print(f"{failed} of {len(results)} image(s) failed", file=err)
    return 1 if failed else 0


def _run_offline(args: argparse.Namespace, err: TextIO) -> int:
    """The project commands that need no server."""
    from .paquo_project import export_annotations, import_geojson

    if args.command == "import-geojson":
        result = import_geojson(args.qupath_project, args.image, args.geojson)
        print(f"image {result.image_name}: wrote {result.added} object(s), replaced {result.removed}", file=err)
        return 0
    written = export_annotations(args.qupath_project, args.out, images=args.image, class_names=args.class_names)
    for path in written:
        print(f"wrote {path}", file=err)
    if not written:
        print("no image has annotations to export", file=err)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 some project images failed, 2 error,
    130 interrupted)."""
    args = _parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    # Imported here so that `--help` and argument errors need no grpc.
    from .client import Client
    from .errors import HepatoQuantError

    try:
        if args.command in ("import-geojson", "export-annotations"):
            return _run_offline(args, err)
        with Client(args.server, token=_token(args), tls_root_certificates=_tls(args), timeout_s=args.timeout) as client:
            if args.command == "info":
                return _run_info(client, out)
            if args.command == "project":
                return _run_project(client, args, out, err)
            return _run_analyze(client, args, out, err)
    except (HepatoQuantError, _UsageError, ValueError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=err)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
