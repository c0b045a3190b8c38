"""Where a cohort's outputs go: a folder, or any fsspec URL (``s3://bucket/run``, ``gs://...``, ``file:///...``)
whose driver the user installed (s3fs, gcsfs, ...), so that workers on many machines write to one place.

A slide's outputs are complete when they are all there: in a folder they are written into a temporary sibling
and renamed into place (atomic); at a URL, where object stores cannot rename a folder, they are uploaded first
and a ``.complete`` marker last, and only the marker makes them count.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hepatoquant_client.atomic_files import replace_atomically
from hepatoquant_client.slide_report import SlideReport

from hepatoquant.atomic_write import staged_folder

__all__ = ["OutputStore"]

COMPLETE_MARKER = ".complete"


def _schema() -> str:
    from hepatoquant.outputs.report import REPORT_SCHEMA_VERSION  # late: storage stays light to import

    return REPORT_SCHEMA_VERSION


def _schema_line() -> str:
    return f"report_schema_version={_schema()}"


class OutputStore:
    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.is_url = "://" in self.location
        if self.is_url:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.location)
            self.root = self.root.rstrip("/")
        else:
            self.path = Path(self.location)

    def __repr__(self) -> str:
        return f"OutputStore({self.location!r})"

    def slide_location(self, slide_id: str) -> str:
        return f"{self.location.rstrip('/')}/slides/{slide_id}"

    def is_complete(self, slide_id: str) -> bool:
        """All outputs there, made under this report schema: a slide counted under another one (before 2.0
        tiles went to the region they overlapped most, not the one holding their centre) is analysed again, so
        one cohort table never mixes two counting rules."""
        if self.is_url:
            marker = f"{self.root}/slides/{slide_id}/{COMPLETE_MARKER}"
            return self.fs.exists(marker) and _schema_line() in self.fs.cat_file(marker).decode().splitlines()
        folder = self.path / "slides" / slide_id
        reports = sorted(folder.glob("*.report.json")) if folder.is_dir() else []
        try:
            return bool(reports) and json.loads(reports[0].read_text()).get("report_schema_version") == _schema()
        except (OSError, ValueError):
            return False

    @contextlib.contextmanager
    def slide_outputs(self, slide_id: str) -> Iterator[Path]:
        """A local folder to write a slide's outputs into. When the block ends without an error they are
        published (in a folder: renamed into place, replacing an incomplete earlier attempt; at a URL: uploaded,
        then the marker); an error publishes nothing and removes the folder."""
        if not self.is_url:
            with staged_folder(self.path / "slides" / slide_id, replace=True) as staging:
                yield staging
            return
        with tempfile.TemporaryDirectory(prefix=f"hepatoquant-{slide_id}-") as staging:
            yield Path(staging)
            self._upload(Path(staging), slide_id)

    def _upload(self, staging: Path, slide_id: str) -> None:
        target = f"{self.root}/slides/{slide_id}"
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.makedirs(target, exist_ok=True)  # a folder on file systems; nothing on object stores
        for file in sorted(staging.iterdir()):
            self.fs.put_file(str(file), f"{target}/{file.name}")
        self.fs.pipe_file(f"{target}/{COMPLETE_MARKER}", f"complete\n{_schema_line()}\n".encode())

    def report(self, slide_id: str) -> SlideReport:
        """A complete slide's report, read on its own (its GeoJSON and overlay can be large and are not needed
        for the cohort table)."""
        if self.is_url:
            [path] = self.fs.glob(f"{self.root}/slides/{slide_id}/*.report.json")
            return SlideReport.from_json(self.fs.cat_file(path), source=path)
        [path] = (self.path / "slides" / slide_id).glob("*.report.json")
        return SlideReport.from_json(path.read_text(), source=str(path))

    def put(self, local_file: Path, name: str) -> str:
        """Stores a finished top-level file (cohort.csv, failures.csv) and returns where it went."""
        if self.is_url:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.put_file(str(local_file), f"{self.root}/{name}")
            return f"{self.location.rstrip('/')}/{name}"
        self.path.mkdir(parents=True, exist_ok=True)  # copied, not renamed: the temporary file may be on another disk
        replace_atomically(self.path / name, lambda temporary: shutil.copyfile(local_file, temporary))
        return str(self.path / name)
