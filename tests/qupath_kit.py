"""QuPath 0.6.0's own code for the tests: the kit in ``../shared/qupath-kit``, installed into ``.tools/qupath-kit``
by ``scripts/install.sh --test-tools``.

Every check goes through the kit's tools in a subprocess (QuPath's ``PathIO.readObjects``, ``ProjectIO``, paquo,
Groovy scripts run in ``qupath.lib.scripting.QP``), so that no JVM ever starts inside the pytest process (its
cohort and server tests fork). Each tool prints one JSON object as its last line of stdout.

Outside CI, a machine without the kit skips these tests with the reason; in CI (``CI=true``) a missing kit fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT_SOURCE = REPO.parent / "shared" / "qupath-kit"
KIT_HOME = REPO / ".tools" / "qupath-kit"
KIT_BIN = KIT_SOURCE / "bin"


@dataclass(frozen=True)
class KitRun:
    """One tool run: its exit code, output, and the JSON object on its last line of stdout."""

    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any]


@dataclass(frozen=True)
class QuPathKit:
    """The kit's environment (``env.sh``) and its three tools."""

    env: dict[str, str]

    def _run(self, command: list[str], timeout: float) -> KitRun:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=self.env)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            result = {}
        return KitRun(done.returncode, done.stdout, done.stderr, result)

    def read_geojson(self, path: str | os.PathLike[str], timeout: float = 180) -> KitRun:
        """``qupath_read_geojson.py``: QuPath's ``PathIO.readObjects``, then ``addObjects`` + ``resolveHierarchy``."""
        return self._run([sys.executable, str(KIT_BIN / "qupath_read_geojson.py"), str(path)], timeout)

    def read_project(self, folder: str | os.PathLike[str], *, open_images: bool = False, timeout: float = 180) -> KitRun:
        """``qupath_read_project.py``: the project through QuPath's ``ProjectIO.loadProject``, every hierarchy."""
        flags = ["--open-images"] if open_images else []
        return self._run([sys.executable, str(KIT_BIN / "qupath_read_project.py"), *flags, str(folder)], timeout)

    def run_script(
        self, project: str | os.PathLike[str], image: str, script: str | os.PathLike[str], *, save: bool = False,
        timeout: float = 240,
    ) -> KitRun:
        """``qupath_run_script.sh``: a Groovy script inside QuPath's classes with the project image current."""
        flags = ["--save"] if save else []
        command = ["bash", str(KIT_BIN / "qupath_run_script.sh"), str(project), image, str(script), *flags]
        return self._run(command, timeout)

    def python(self, code: str, timeout: float = 180) -> KitRun:
        """Run Python code with paquo on QuPath's classes (in a subprocess with the kit's environment)."""
        return self._run([sys.executable, "-c", code], timeout)


def load_kit() -> QuPathKit:
    """The installed kit, or a skip (a failure in CI) naming the install command."""
    env_sh = KIT_HOME / "env.sh"
    if not env_sh.is_file() or not KIT_BIN.is_dir():
        message = (f"QuPath's own code is not installed ({env_sh} or {KIT_BIN} missing): run "
                   "`bash scripts/install.sh --test-tools` with ../shared beside the repository")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    dumped = subprocess.run(
        ["bash", "-c", f'. "{env_sh}" && env -0'], capture_output=True, check=True, env=dict(os.environ)
    ).stdout.decode()
    env = dict(item.split("=", 1) for item in dumped.split("\0") if "=" in item)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return QuPathKit(env)
