"""SHA-256 of weight files, remembered while a file is unchanged.

A segmenter's backbone is checked against the digest its adapter was trained on at every load: reading the
whole file each time cost 2-4 s for a 1.2 GB UNI checkpoint on every `analyze`. The digest is kept in a small
JSON file in the user's cache folder (``$HEPATOQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/hepatoquant``), keyed by
the file's path and identity: device, inode, size, modification and change time. Any write to the file changes
its change time (which no tool can set back), so a changed file is hashed again. A cache that cannot be read or
written costs only the hashing, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hepatoquant_client.atomic_files import replace_atomically

from hepatoquant.model_pack import file_sha256

__all__ = ["default_cache_dir", "weights_sha256"]

log = logging.getLogger(__name__)
_CACHE_NAME = "weights-sha256.json"


def default_cache_dir() -> Path:
    if os.environ.get("HEPATOQUANT_CACHE_DIR"):
        return Path(os.environ["HEPATOQUANT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hepatoquant"


def _identity(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def weights_sha256(path: Path) -> str:
    """The file's SHA-256, from the cache when the file is the one last hashed, else computed and remembered."""
    path = Path(path).resolve()
    cache_path = default_cache_dir() / _CACHE_NAME
    entries = _read(cache_path)
    identity = _identity(path)
    known = entries.get(str(path))
    if isinstance(known, dict) and known.get("identity") == identity and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = file_sha256(path)
    if _identity(path) == identity:  # not changed while it was read
        entries[str(path)] = {"identity": identity, "sha256": digest}
        _write(cache_path, entries)
    return digest


def _read(cache_path: Path) -> dict:
    try:
        entries = json.loads(cache_path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("the weights digest cache %s cannot be read (%s): hashing again and replacing it", cache_path, error)
        return {}
    return entries if isinstance(entries, dict) else {}


def _write(cache_path: Path, entries: dict) -> None:
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(cache_path, lambda temporary: temporary.write_text(json.dumps(entries)))
    except OSError as error:
        log.warning("the weights digest cache %s cannot be written (%s): the next load hashes the file again; "
                    "set $HEPATOQUANT_CACHE_DIR to a writable folder", cache_path, error)
