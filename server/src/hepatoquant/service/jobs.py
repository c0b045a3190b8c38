"""The durable record of analysis jobs: one SQLite file in the server's state directory.

Jobs outlive client connections and server restarts, so their state lives on disk rather than in memory: a
client that disconnects can watch or fetch its job again, and a restarted server re-queues what was waiting and
tells the owners of interrupted jobs to submit again. The store knows nothing of requests or analysis; the
request is opaque JSON and ``request_key`` an opaque identity that lets an identical request reuse a result.

One store object is shared by all threads of one server (one connection, one lock); one server owns a state
directory at a time, since ``recover_after_restart`` treats every RUNNING job as its own that died with it.
"""

from __future__ import annotations

import builtins
import enum
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hepatoquant.errors import (
    InvalidParameterError,
    JobNotFoundError,
    JobStoreDamagedError,
    JobStoreSchemaError,
    StorageFullError,
    StorageUnavailableError,
    shown,
)

__all__ = [
    "DATABASE_NAME",
    "JOB_FILE",
    "RESULTS_DIR",
    "FINAL_STATES",
    "INTERRUPTED_CODE",
    "JobNotFoundError",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobStoreSchemaError",
    "SCHEMA_VERSION",
    "checked_job_id",
    "read_job_file",
    "result_folders",
    "write_job_file",
]

log = logging.getLogger(__name__)

DATABASE_NAME = "jobs.sqlite3"
RESULTS_DIR = "results"  # one folder per succeeded job, named by its id, beside the database
JOB_FILE = "job.json"  # in each result folder: the job's id, request and key, to rebuild a lost database
SCHEMA_VERSION = 1  # PRAGMA user_version of the file; bump it with a migration in _migrate.
# The status name an interrupted job carries: the service was unavailable for it, and a retry will work.
INTERRUPTED_CODE = "UNAVAILABLE"
RESTART_MESSAGE = "the server stopped while this job was running; submit the same request again to rerun it"


class JobState(str, enum.Enum):
    """Where a job is in its life; the values are what the database and the API carry."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED})


@dataclass(frozen=True)
class JobRecord:
    """One job as stored: a snapshot, never updated in place (ask the store again for news).

    Times are unix seconds; ``updated_at`` grows with every change, so a watcher can tell a new snapshot from
    the one it already sent. ``reused_from`` names the job whose result answers this one.
    """

    job_id: str
    state: JobState
    request_json: str
    request_key: str
    created_at: float
    updated_at: float
    stage: str = ""
    done: int = 0
    total: int = 0
    items_per_second: float = 0.0
    error_code: str = ""
    error_message: str = ""
    result_dir: str | None = None
    reused_from: str | None = None

    @property
    def is_final(self) -> bool:
        """True once the job will never change state again."""
        return self.state in FINAL_STATES


_COLUMNS = (
    "job_id, state, request_json, request_key, created_at, updated_at, stage, done, total, items_per_second, "
    "error_code, error_message, result_dir, reused_from"
)

_SCHEMA_V1 = (
    """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order (created_at can tie)
    job_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    request_json TEXT NOT NULL,
    request_key TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    items_per_second REAL NOT NULL DEFAULT 0,
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    result_dir TEXT,
    reused_from TEXT
)""",
    "CREATE INDEX jobs_by_key ON jobs (request_key, state)",
    "CREATE INDEX jobs_by_state ON jobs (state)",
)

# Every update moves updated_at forward by at least a microsecond, so two changes within one clock tick still
# look like two changes to a watcher comparing timestamps.
_NEXT_UPDATED_AT = "updated_at = MAX(?, updated_at + 1e-6)"


class JobStore:
    """Jobs in ``state_dir/jobs.sqlite3``: create, look up, update state and progress, recover, prune results.

    Thread-safe: one connection guarded by one lock. Progress updates are single small transactions, cheap
    enough to make per batch.
    """

    # Annotations in this class say builtins.list: inside it, plain ``list`` is the method of that name.

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / DATABASE_NAME
        self._lock = threading.RLock()
        self._listeners: builtins.list[Callable[[JobRecord], None]] = []
        self._refuse_an_emptied_store()
        try:
            # Autocommit mode: single statements are atomic by themselves; multi-statement changes use
            # _transaction.
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.row_factory = sqlite3.Row
            self._check_integrity()
            self._conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and the reverse
            # In WAL mode NORMAL never corrupts the file; a power cut may lose the last progress updates, no more.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as error:
            raise self._damaged(f"it cannot be read as a job database ({error})") from None

    def _refuse_an_emptied_store(self) -> None:
        """A 0-byte database is a new, empty one to SQLite: with result folders beside it, the job history
        was lost (a truncated file, a bad restore), and starting would orphan every result silently."""
        if self.path.is_file() and self.path.stat().st_size == 0:
            folders = result_folders(self.state_dir)
            if folders:
                raise self._damaged(f"it is empty (0 bytes) while {len(folders)} job result folder(s) exist")

    def _check_integrity(self) -> None:
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise self._damaged(f"SQLite's quick_check found: {'; '.join(problems[:3])}")

    def _damaged(self, why: str) -> JobStoreDamagedError:
        return JobStoreDamagedError(
            f"the job database {self.path} is damaged: {why}. Start once with `hepatoquant serve --rebuild-job-store "
            f"...` to set it aside and rebuild the job list from the result folders in {self.state_dir / RESULTS_DIR} "
            "(finished jobs come back; queued and running ones are lost), or restore the file from a backup"
        )

    @classmethod
    def rebuild(cls, state_dir: Path) -> tuple[JobStore, int]:
        """Set the database aside (``jobs.sqlite3.damaged-<time>``) and make a new one holding a SUCCEEDED job
        for each result folder; returns the store and how many jobs it got back. A folder written with its
        ``job.json`` (this version on) gets its request back, so an identical request reuses it; an older one
        comes back without its request."""
        state_dir = Path(state_dir)
        database = state_dir / DATABASE_NAME
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = state_dir / f"{DATABASE_NAME}{suffix}"
            if old.exists():
                old.rename(state_dir / f"{DATABASE_NAME}{suffix}.damaged-{stamp}")
        store = cls(state_dir)
        folders = result_folders(state_dir)
        with store._db(), store._transaction():
            for folder in folders:
                job = read_job_file(folder)
                created = job.get("created_at", folder.stat().st_mtime)
                store._conn.execute(
                    "INSERT OR IGNORE INTO jobs (job_id, state, request_json, request_key, created_at, updated_at, "
                    "result_dir) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (folder.name, JobState.SUCCEEDED.value, job.get("request_json", "{}"),
                     job.get("request_key", f"rebuilt:{folder.name}"), created, time.time(), str(folder)),
                )
        log.warning("rebuilt the job database %s from %d result folder(s); the old file was kept as *.damaged-%s",
                    database, len(folders), stamp)
        return store, len(folders)

    def close(self) -> None:
        """Close the database connection; the store cannot be used afterwards."""
        with self._db():
            self._conn.close()

    def create(self, request_json: str, request_key: str, *, reused_from: JobRecord | None = None) -> JobRecord:
        """A new QUEUED job; or, given a finished job whose result answers this request, a job that is
        SUCCEEDED from the start and shares that result (in-flight matches: answer with that job instead)."""
        job_id = uuid.uuid4().hex
        now = time.time()
        state, result_dir, source_id = JobState.QUEUED, None, None
        if reused_from is not None:
            if reused_from.state is not JobState.SUCCEEDED or reused_from.result_dir is None:
                raise ValueError(f"job {reused_from.job_id} has no result to reuse (state {reused_from.state.value})")
            state, result_dir, source_id = JobState.SUCCEEDED, reused_from.result_dir, reused_from.job_id
        with self._db():
            self._conn.execute(
                "INSERT INTO jobs (job_id, state, request_json, request_key, created_at, updated_at, result_dir, "
                "reused_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, state.value, request_json, request_key, now, now, result_dir, source_id),
            )
            return self.get(job_id)

    def subscribe(self, listener: Callable[[JobRecord], None]) -> None:
        """Call ``listener(record)`` with every job's new record after each change of its state or progress (on
        the writing thread, outside the store's lock): the server's streams follow jobs without polling."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[JobRecord], None]) -> None:
        self._listeners.remove(listener)

    def _announce(self, job_id: str) -> JobRecord | None:
        if not self._listeners:
            return None
        record = self.get(job_id)
        for listener in list(self._listeners):
            listener(record)
        return record

    def ping(self) -> None:
        """Read the store once: raises StorageUnavailableError when it cannot be read (for health checks)."""
        with self._db():
            self._conn.execute("SELECT seq FROM jobs LIMIT 1").fetchall()

    def delete(self, job_id: str) -> None:
        """Forget a job that was never taken (the queue was full): a refusal is not a job."""
        with self._db():
            self._conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def get(self, job_id: str) -> JobRecord:
        """The job's current record; InvalidParameterError for what cannot be a job id, JobNotFoundError if
        this server has no such job."""
        job_id = checked_job_id(job_id)
        with self._db():
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise _not_found(job_id)
        return _record(row)

    def find_reusable(self, request_key: str) -> JobRecord | None:
        """The job that already answers (or will answer) this request: the newest SUCCEEDED one whose result
        folder still exists, else the newest QUEUED or RUNNING one, else None."""
        with self._db():
            succeeded = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE request_key = ? AND state = ? AND result_dir IS NOT NULL "
                "ORDER BY seq DESC",
                (request_key, JobState.SUCCEEDED.value),
            ).fetchall()
            in_flight = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE request_key = ? AND state IN (?, ?) ORDER BY seq DESC LIMIT 1",
                (request_key, JobState.QUEUED.value, JobState.RUNNING.value),
            ).fetchone()
        for row in succeeded:
            if Path(row["result_dir"]).is_dir():  # results deleted by hand or by retention answer nothing
                return _record(row)
        return None if in_flight is None else _record(in_flight)

    def set_state(
        self,
        job_id: str,
        state: JobState,
        *,
        error_code: str = "",
        error_message: str = "",
        result_dir: str | None = None,
    ) -> JobRecord:
        """Move the job to ``state`` with its error (cleared when not given) and, if given, its result folder.

        The store does not police transitions; the executor decides which are allowed."""
        with self._db():
            cursor = self._conn.execute(
                f"UPDATE jobs SET state = ?, error_code = ?, error_message = ?, "
                f"result_dir = COALESCE(?, result_dir), {_NEXT_UPDATED_AT} WHERE job_id = ?",
                (JobState(state).value, error_code, error_message, result_dir, time.time(), job_id),
            )
            if cursor.rowcount == 0:
                raise _not_found(job_id)
        return self._announce(job_id) or self.get(job_id)

    def set_progress(self, job_id: str, stage: str, done: int, total: int, items_per_second: float) -> None:
        """Record how far the job is (one UPDATE, made per batch)."""
        with self._db():
            cursor = self._conn.execute(
                f"UPDATE jobs SET stage = ?, done = ?, total = ?, items_per_second = ?, {_NEXT_UPDATED_AT} "
                "WHERE job_id = ?",
                (stage, done, total, items_per_second, time.time(), job_id),
            )
        if cursor.rowcount == 0:
            raise _not_found(job_id)
        self._announce(job_id)

    def list(self, limit: int = 100) -> builtins.list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        if limit < 0:
            raise InvalidParameterError(f"job list limit {limit} is negative; give 0 or more")
        with self._db():
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_record(row) for row in rows]

    def recover_after_restart(self) -> builtins.list[JobRecord]:
        """Settle what a previous server process left behind: its RUNNING jobs died with it and become
        INTERRUPTED (their owners are told to submit again); its QUEUED jobs are returned, oldest first, for the
        new executor to run."""
        with self._db(), self._transaction():
            self._conn.execute(
                f"UPDATE jobs SET state = ?, error_code = ?, error_message = ?, {_NEXT_UPDATED_AT} WHERE state = ?",
                (JobState.INTERRUPTED.value, INTERRUPTED_CODE, RESTART_MESSAGE, time.time(), JobState.RUNNING.value),
            )
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY seq", (JobState.QUEUED.value,)
            ).fetchall()
        return [_record(row) for row in rows]

    def apply_retention(self, max_results: int | None) -> builtins.list[str]:
        """Keep the newest ``max_results`` result folders of succeeded jobs and delete the older ones, so that
        the results disk does not fill up; returns the ids of jobs that lost their result (None: keep all).

        A folder shared by reuse counts once, as new as its newest job. Folders already gone count as none
        kept and their jobs are cleared too. The lock is held throughout so no job can reuse a folder while it
        is being deleted."""
        if max_results is None:
            return []
        if max_results < 0:
            raise InvalidParameterError(f"result retention {max_results} is negative; give 0 or more, or none")
        with self._db():
            expired = self._expired_result_dirs(max_results)
            removed: builtins.list[str] = []
            for result_dir in expired:
                if _remove_result_dir(Path(result_dir)):
                    removed.extend(self._forget_result_dir(result_dir))
        return removed

    def _expired_result_dirs(self, max_results: int) -> builtins.list[str]:
        """Result folders past the newest ``max_results`` that exist, plus those already gone."""
        rows = self._conn.execute(
            "SELECT result_dir FROM jobs WHERE state = ? AND result_dir IS NOT NULL ORDER BY seq DESC",
            (JobState.SUCCEEDED.value,),
        ).fetchall()
        newest_first = list(dict.fromkeys(row["result_dir"] for row in rows))
        present = [d for d in newest_first if Path(d).is_dir()]
        gone = [d for d in newest_first if not Path(d).exists()]
        return present[max_results:] + gone

    def _forget_result_dir(self, result_dir: str) -> builtins.list[str]:
        """Clear ``result_dir`` from every job that points at it; returns those jobs' ids."""
        with self._transaction():
            rows = self._conn.execute("SELECT job_id FROM jobs WHERE result_dir = ? ORDER BY seq", (result_dir,))
            ids = [row["job_id"] for row in rows]
            self._conn.execute(
                f"UPDATE jobs SET result_dir = NULL, {_NEXT_UPDATED_AT} WHERE result_dir = ?",
                (time.time(), result_dir),
            )
        return ids

    def _migrate(self) -> None:
        """Create the schema in a new file; refuse a file from a newer version rather than misread it."""
        with self._db(), self._transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobStoreSchemaError(
                    f"job database {self.path} has schema version {version}, newer than this HepatoQuant's "
                    f"{SCHEMA_VERSION}; run the newer HepatoQuant or give a different state directory"
                )
            if version == 0:
                for statement in _SCHEMA_V1:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock; a database failure becomes StorageFullError (the disk is full) or
        StorageUnavailableError, with a message that names no server path (the log has the details)."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as error:
                log.warning("job database %s failed: %s", self.path, error)
                if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(error):
                    raise StorageFullError(
                        "the server's disk is full: the job could not be recorded; ask the server's operator to "
                        "free space, then try again"
                    ) from None
                raise StorageUnavailableError(
                    f"the server's job store failed ({type(error).__name__}); try again later, the server log has "
                    "the details"
                ) from None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, taken up front (IMMEDIATE) so that it never fails half-way on a busy file."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


def result_folders(state_dir: Path) -> builtins.list[Path]:
    """The result folders of finished jobs (named by their 32-hex-digit id; work folders start with a dot)."""
    folder = Path(state_dir) / RESULTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and len(p.name) == 32 and not p.name.startswith("."))


def write_job_file(folder: Path, record: JobRecord) -> None:
    """What :meth:`JobStore.rebuild` needs to give the job back, written into its result folder."""
    (folder / JOB_FILE).write_text(json.dumps({
        "job_id": record.job_id, "request_json": record.request_json, "request_key": record.request_key,
        "created_at": record.created_at,
    }) + "\n")


def read_job_file(folder: Path) -> dict:
    """The job file of a result folder; {} when there is none (an older version's) or it cannot be read."""
    try:
        job = json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return job if isinstance(job, dict) and job.get("job_id") == folder.name else {}


def checked_job_id(job_id: str) -> str:
    """``job_id`` as this server writes ids (32 lowercase hex digits; a UUID with dashes or capitals is taken
    too); InvalidParameterError, repeating at most the start of it, for anything else."""
    try:
        if len(job_id) <= 36:
            return uuid.UUID(hex=job_id).hex
    except ValueError:
        pass
    raise InvalidParameterError(
        f"{shown(job_id, 40)} is not a job id: ids are 32 hex digits, as SubmitAnalysis and ListJobs return them"
        if job_id else "the request names no job: set job_id to an id SubmitAnalysis or ListJobs returned"
    )


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(zip(row.keys(), row))
    values["state"] = JobState(values["state"])
    return JobRecord(**values)


def _not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError(
        f"no job with id {shown(job_id)} on this server; list jobs to see the ids it knows. Behind a load balancer, "
        "each job lives on the replica that accepted it: send its calls there (the Python client does this "
        "itself when given all replicas as 'host1:port,host2:port')"
    )


def _remove_result_dir(path: Path) -> bool:
    """Delete one result folder; False (and a warning) if it cannot be, so that a later pass tries again."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return True
    except OSError as error:
        log.warning("could not delete expired result folder %s: %s", path, error)
        return False
    return True
