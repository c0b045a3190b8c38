"""A local stand-in for the Hugging Face Hub's file endpoint, as huggingface_hub calls it (no network in tests):
``/{repo}/resolve/{revision}/{file}`` for models and ``/datasets/{repo}/resolve/{revision}/{file}`` for datasets,
with the hub's headers (the commit, an ETag that is the file's SHA-256 as for LFS files) and its error codes for
gated and missing repositories and files."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's `/{repo}/resolve/{revision}/{file}` as huggingface_hub calls it: headers, gated and missing
    repositories and files answered with the hub's error codes."""

    files: dict[str, dict[str, bytes]] = {}
    gated: set[str] = set()
    requests: list[str] = []

    def _answer(self, body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "datasets":  # a dataset repository: the same routes under /datasets
            parts = parts[1:]
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if repo in self.gated:
            return self._error(403, "GatedRepo", f"Access to model {repo} is restricted. You must have access to it.")
        if repo not in self.files:
            return self._error(404, "RepoNotFound", "Repository not found")
        if filename not in self.files[repo]:
            return self._error(404, "EntryNotFound", "Entry not found")
        data = self.files[repo][filename]
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args) -> None:
        pass



@contextlib.contextmanager
def serving() -> Iterator[str]:
    """The stand-in on a free loopback port, serving ``FakeHub.files``; yields its address (``HF_ENDPOINT``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def hub_environment(tmp_path: Path, endpoint: str, *, offline: bool = False) -> dict[str, str]:
    """This process's environment with the hub at ``endpoint`` and its cache under ``tmp_path`` (no HF_ variable of
    the user's leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "hub-cache"), HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env
