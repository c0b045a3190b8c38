"""Where a cohort's outputs go: a folder, or any fsspec URL (``s3://bucket/run``, ``gs://...``, ``file:///...``)
whose driver the user installed (s3fs, gcsfs, ...), so that workers on many machines write to one place.

A slide's outputs are complete when they are all there: in a folder they are written into a temporary sibling
and renamed into place (atomic); at a URL, where object stores cannot rename a folder, they are uploaded first
and a ``.complete`` marker last, and only the marker makes them count.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

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

    def staging_folder(self, slide_id: str) -> Path:
        """A new local folder to write a slide's outputs into (next to its final place for a folder store)."""
        if self.is_url:
            return Path(tempfile.mkdtemp(prefix=f"hepatoquant-{slide_id}-"))
        parent = self.path / "slides"
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{slide_id}.", dir=parent))

    def publish(self, staging: Path, slide_id: str) -> None:
        """Moves a complete staging folder into place; an incomplete earlier attempt is replaced."""
        if self.is_url:
            target = f"{self.root}/slides/{slide_id}"
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
            self.fs.makedirs(target, exist_ok=True)  # a folder on file systems; nothing on object stores
            for file in sorted(staging.iterdir()):
                self.fs.put_file(str(file), f"{target}/{file.name}")
            self.fs.pipe_file(f"{target}/{COMPLETE_MARKER}", f"complete\n{_schema_line()}\n".encode())
            shutil.rmtree(staging, ignore_errors=True)
            return
        target = self.path / "slides" / slide_id
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)

    def report(self, slide_id: str) -> dict:
        """A complete slide's report, read on its own (its GeoJSON and overlay can be large and are not needed
        for the cohort table)."""
        if self.is_url:
            [path] = self.fs.glob(f"{self.root}/slides/{slide_id}/*.report.json")
            return json.loads(self.fs.cat_file(path))
        [path] = (self.path / "slides" / slide_id).glob("*.report.json")
        return json.loads(path.read_text())

    def put(self, local_file: Path, name: str) -> str:
        """Stores a finished top-level file (cohort.csv, failures.csv) and returns where it went."""
        if self.is_url:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.put_file(str(local_file), f"{self.root}/{name}")
            return f"{self.location.rstrip('/')}/{name}"
        self.path.mkdir(parents=True, exist_ok=True)
        os.replace(local_file, self.path / name)
        return str(self.path / name)
