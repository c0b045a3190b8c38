"""HepatoBench from the Hugging Face Hub, laid out as ``bench`` reads it (``hepatoquant bench fetch --to DIR``).

What the hub holds, as far as it could be confirmed here (the dataset card itself could not be read; the facts come
from public code that downloads it): the dataset repository ``xtxx/HepatoBench`` (CC BY 4.0, DOI 10.57967/hf/8231)
with seven per-class archives ``01_TUM.zip`` ... ``07_STE.zip`` of PNG patches (150 px at 20x) named like
``02_FIB_3355.png``, and no partition: the public files carry no slide or patient ids, so the paper's slide-level
split cannot be rebuilt from them. A partition a user has (from the authors) is given with ``--partition`` in
``bench``'s own format (``relpath,label,split,group``) and checked against the fetched patches.

Verification: each archive's SHA-256 against the hub's record of it (for files stored with Git LFS the hub's
cache names the blob by that hash), and every member's CRC (``ZipFile.testzip``). Patches that are empty or not
PNG at all (one published patch, ``02_FIB_3355.png``, is 0 bytes) are left out and listed, not fatal.
Everything is written into a staging folder renamed into place at the end: a failed fetch leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hepatoquant.atomic_write import staged_folder
from hepatoquant.bench.dataset import META_NAME, DatasetError, load_dataset
from hepatoquant.bench.split import PARTITION_NAME, read_partition, write_partition
from hepatoquant_client.classes import TISSUE_CLASS_CODES

__all__ = ["HEPATOBENCH_REPO", "ARCHIVES", "FetchOutcome", "fetch_hepatobench"]

HEPATOBENCH_REPO = "xtxx/HepatoBench"
ARCHIVES = {code: f"{number:02d}_{code}.zip" for number, code in enumerate(TISSUE_CLASS_CODES, start=1)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FetchOutcome:
    root: Path
    revision: str  # the hub commit the archives came from
    patches: dict[str, int]  # per class
    skipped: list[str]  # "archive/member: reason"
    partition: bool  # an official partition was written (split.csv)


def fetch_hepatobench(
    dest: Path,
    *,
    repository: str = HEPATOBENCH_REPO,
    revision: str | None = None,
    partition: Path | None = None,
    log: Callable[[str], None] = print,
) -> FetchOutcome:
    """Download (or take from the hub's cache) the seven archives, verify them, and write the dataset to ``dest``
    (which must not exist yet, or be empty): one folder per class, ``dataset_meta.json``, and ``split.csv`` when a
    ``partition`` is given."""
    from hepatoquant.hub import download_from_hub

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DatasetError(f"--to {str(dest)!r} exists and is not an empty folder; give a new folder")
    if partition is not None and not partition.is_file():
        raise DatasetError(f"--partition {str(partition)!r} does not exist; give the partition CSV "
                           "(relpath,label,split,group) or leave it out")
    archives: dict[str, Path] = {}
    for code, name in ARCHIVES.items():
        log(f"{name}: from the hub or its cache")
        archives[code] = download_from_hub(repository, name, revision=revision, repo_type="dataset", error=DatasetError)
    commits = {path.parent.name for path in archives.values()}  # the cache's snapshots/<commit>/<file>
    if len(commits) != 1:
        raise DatasetError(f"the archives of {repository} come from different commits ({', '.join(sorted(commits))}); "
                           "give one with --revision")
    digests = {ARCHIVES[code]: _verified(path, ARCHIVES[code]) for code, path in archives.items()}
    counts: dict[str, int] = {}
    skipped: list[str] = []
    with staged_folder(dest, replace=dest.exists()) as staging:
        for code, path in archives.items():
            counts[code] = _unpack(path, ARCHIVES[code], staging / code, skipped)
            log(f"{ARCHIVES[code]}: {counts[code]} patches")
        meta = {"name": "HepatoBench", "classes": list(TISSUE_CLASS_CODES),
                "source": {"repository": repository, "revision": commits.pop(), "archives_sha256": digests},
                "skipped": skipped}
        (staging / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if partition is not None:
            write_partition(read_partition(partition, load_dataset(staging)), staging / PARTITION_NAME)
    for line in skipped:
        log(f"left out: {line}")
    return FetchOutcome(dest, meta["source"]["revision"], counts, skipped, partition is not None)


def _verified(path: Path, name: str) -> str:
    """The archive's SHA-256, checked against the hub's (the blob's name in its cache, for LFS files) and its
    members' CRCs."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    recorded = path.resolve().name
    if _SHA256.match(recorded) and recorded != digest.hexdigest():
        raise DatasetError(f"{name}: SHA-256 {digest.hexdigest()} differs from the hub's {recorded} (a damaged "
                           f"download); delete {path.resolve()} from the hub cache and fetch again")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{name} is not a readable zip archive ({exc}); delete {path.resolve()} from the hub "
                           "cache and fetch again") from exc
    if broken is not None:
        raise DatasetError(f"{name}: member {broken!r} fails its CRC check; delete {path.resolve()} from the hub "
                           "cache and fetch again")
    return digest.hexdigest()


def _unpack(path: Path, name: str, folder: Path, skipped: list[str]) -> int:
    """The archive's PNG patches into ``folder`` (by file name only: no path from the archive is trusted)."""
    folder.mkdir()
    written = 0
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            member_name = PurePosixPath(member.filename).name
            if member.is_dir() or not member_name.lower().endswith(".png") or member_name.startswith("."):
                continue
            target = folder / member_name
            if target.exists():
                raise DatasetError(f"{name} holds two patches named {member_name!r}; the archive is not HepatoBench's")
            data = archive.read(member)
            if not data.startswith(_PNG_SIGNATURE):
                skipped.append(f"{name}/{member.filename}: {'empty' if not data else 'not a PNG'}")
                continue
            target.write_bytes(data)
            written += 1
    if not written:
        raise DatasetError(f"{name} holds no PNG patches; the archive is not HepatoBench's")
    return written
