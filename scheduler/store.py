"""The durable job store: every job in one SQLite file (WAL mode) under the state folder, written
through on each phase change and read back when the scheduler starts.

Contract:
- `JobStore.open(path)` opens the file, creating it at first use (built under a temporary name
  and renamed, so an empty or half-made file is never ours), and upgrades an older schema
  (`PRAGMA user_version`, MIGRATIONS). It raises StoreError, naming the file and what to do, for
  a file that is not a SQLite database, is damaged (`PRAGMA quick_check`, rows that do not
  parse), was written by a newer diffserve, or is held by another running scheduler (a lock file
  beside it).
- `save(job)` marks a job for writing; everything marked during one turn of the event loop is
  written in one transaction (`flush`, scheduled with call_soon; at once when no loop runs).
  `flush()` writes now: JobTable.add calls it, so a submitted job is on disk before SubmitJob
  answers. Nothing is written per denoising step: callers save on phase changes only
  (Job.advance's listener), and the event log is rewritten then (steps since the last phase
  change are lost in a crash; a running job restarts from step 0 anyway).
- `delete(job_id, then)` removes a job in the next flush; `then()` runs after that commit (the
  artifact goes only after its row: a crash in between leaves an orphan file, never a job whose
  artifact is gone).
- `load()` returns every stored job, in submission order.

Durability: WAL with synchronous=NORMAL. A commit is in the WAL file (the OS page cache) before
`flush` returns, so it survives a SIGKILL of the scheduler; a power loss can lose the last
commits before a checkpoint (sqlite.org/wal.html). Checkpoints (the fsyncs) are not left to the
committing call on the event loop: `checkpoint_soon()` runs a passive one on a thread with its
own connection (the engine calls it every few seconds; close() does a last one). Measured cost
of one flush: notes d13-store.

Parameters (which may hold input images) live in their own table, written once at submit; the
phase writes rewrite only the small row in `jobs`.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.jobs import Job, StoreError
from diffserve.scheduler.lifecycle import Phase

log = logging.getLogger(__name__)

FILE_NAME = "jobs.sqlite3"

# MIGRATIONS[i] upgrades a file of schema version i to i + 1; SCHEMA_VERSION = len(MIGRATIONS).
# A new version appends a step (never edits one that has shipped).
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order
            id TEXT NOT NULL UNIQUE,
            principal TEXT NOT NULL,
            client_request_id TEXT NOT NULL,
            priority INTEGER NOT NULL,
            phase TEXT NOT NULL,                     -- lifecycle.Phase value
            step INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            created_ns INTEGER NOT NULL,             -- wall clock, ns since the epoch
            started_ns INTEGER,
            ended_ns INTEGER,
            deadline REAL,                           -- wall clock (time.time()) after which it is cancelled
            artifact BLOB,                           -- diffserve.v1.Artifact
            error BLOB,                              -- google.rpc.Status
            cancel BLOB,                             -- google.rpc.Status of a cancel waiting for a step boundary
            events BLOB NOT NULL                     -- diffserve.v1.JobEvent, each prefixed by its 4-byte length
        )""",
        "CREATE TABLE job_params (id TEXT PRIMARY KEY, params BLOB NOT NULL)  -- diffserve.v1.GenerationParams, resolved",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = ("id", "principal", "client_request_id", "priority", "phase", "step", "attempt", "created_ns", "started_ns", "ended_ns",
            "deadline", "artifact", "error", "cancel", "events")
_MUTABLE = _COLUMNS[3:]  # everything after the identity of the job
_INSERT = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_UPDATE = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _MUTABLE)} WHERE id = ?"
_SELECT = f"SELECT {', '.join('jobs.' + c for c in _COLUMNS)}, job_params.params FROM jobs JOIN job_params USING (id) ORDER BY jobs.seq"
_LENGTH = struct.Struct(">I")


def encode_events(events: list[pb.JobEvent]) -> bytes:
    return b"".join(_LENGTH.pack(len(data)) + data for data in (e.SerializeToString() for e in events))


def decode_events(blob: bytes) -> list[pb.JobEvent]:
    events, at = [], 0
    while at < len(blob):
        if at + _LENGTH.size > len(blob):
            raise DecodeError("the event log is cut short")
        (size,) = _LENGTH.unpack_from(blob, at)
        at += _LENGTH.size
        if at + size > len(blob):
            raise DecodeError("the event log is cut short")
        events.append(pb.JobEvent.FromString(blob[at:at + size]))
        at += size
    return events


def _ns(ts: timestamp_pb2.Timestamp | None) -> int | None:
    return None if ts is None else ts.seconds * 1_000_000_000 + ts.nanos


def _timestamp(ns: int | None) -> timestamp_pb2.Timestamp | None:
    if ns is None:
        return None
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _blob(message) -> bytes | None:
    return None if message is None else message.SerializeToString()


def wall_deadline(job: Job) -> float | None:
    """The job's deadline (time.monotonic()) as a wall-clock time (time.time()), which survives a restart."""
    return None if job.deadline is None else time.time() + (job.deadline - time.monotonic())


def monotonic_deadline(wall: float | None) -> float | None:
    return None if wall is None else time.monotonic() + (wall - time.time())


class JobStore:
    """Owns the SQLite connection of one store file, the jobs waiting to be written, and the lock
    that keeps a second scheduler off the file."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int):
        self.path = path
        self._db = db
        self._lock_fd = lock_fd
        self._dirty: dict[str, Job] = {}
        self._deleted: dict[str, Callable[[], None] | None] = {}
        self._on_disk: set[str] = set()  # ids with a row (their params are written)
        self._logs: dict[str, tuple[int, bytearray]] = {}  # encoded event logs of unfinished jobs
        self._scheduled = False
        self.writes = 0  # flushes that wrote something (tests, and the cost measurement)
        self._checkpointing = False
        self._last_checkpoint = time.monotonic()
        self._last_error = float("-inf")

    # ---- opening ----

    @classmethod
    def open(cls, path: str | os.PathLike, migrations: list[tuple[str, ...]] = MIGRATIONS) -> JobStore:
        path = Path(path).absolute()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = _lock(path)
        except OSError as exc:
            raise StoreError(_unusable(path, exc)) from None
        try:
            if not path.exists():
                _create(path, migrations)
            elif path.stat().st_size == 0:  # ours are never empty (_create)
                raise StoreError(_damaged(path, "the file is empty (truncated?)"))
            db = _connect(path, migrations)
        except (OSError, sqlite3.OperationalError) as exc:  # permissions, disk full, I/O: not damage
            os.close(lock_fd)
            raise StoreError(_unusable(path, exc)) from None
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, db, lock_fd)

    def close(self) -> None:
        if self._db is None:
            return
        self.flush()
        self._db.close()
        self._db = None
        os.close(self._lock_fd)

    def checkpoint_soon(self, every_s: float = 5.0) -> None:
        """Copies the WAL into the database file on a thread, at most every `every_s` (a passive
        checkpoint: it never blocks the writer). Call it from the event loop."""
        if self._checkpointing or self._db is None or time.monotonic() - self._last_checkpoint < every_s:
            return
        self._checkpointing = True
        self._last_checkpoint = time.monotonic()
        asyncio.get_running_loop().run_in_executor(None, self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            db = sqlite3.connect(self.path)
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()
        except sqlite3.Error as exc:
            log.warning("checkpointing the job store %s failed: %s", self.path, exc)
        finally:
            self._checkpointing = False

    # ---- reading ----

    def load(self) -> list[Job]:
        """Every stored job, oldest submission first. StoreError for a row that does not parse."""
        jobs = []
        try:
            rows = self._db.execute(_SELECT).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(_damaged(self.path, str(exc))) from None
        for row in rows:
            try:
                jobs.append(self._job(row))
            except (DecodeError, ValueError, TypeError) as exc:
                raise StoreError(_damaged(self.path, f"job {row[0]!r} does not parse ({exc})")) from None
        self._on_disk.update(job.id for job in jobs)
        return jobs

    @staticmethod
    def _job(row) -> Job:
        (job_id, principal, client_request_id, priority, phase, step, attempt, created_ns, started_ns, ended_ns,
         deadline, artifact, error, cancel, events, params) = row
        return Job(
            params=pb.GenerationParams.FromString(params),
            client_request_id=client_request_id,
            principal=principal,
            id=job_id,
            phase=Phase(phase),
            step=step,
            deadline=monotonic_deadline(deadline),
            cancel_status=None if cancel is None else status_pb2.Status.FromString(cancel),
            artifact=None if artifact is None else pb.Artifact.FromString(artifact),
            error=None if error is None else status_pb2.Status.FromString(error),
            created=_timestamp(created_ns),
            started=_timestamp(started_ns),
            ended=_timestamp(ended_ns),
            priority=priority,
            attempt=attempt,
            events=decode_events(events),
        )

    # ---- writing ----

    def save(self, job: Job) -> None:
        """Writes the job's current state with the next flush (this turn of the event loop)."""
        self._dirty[job.id] = job
        self._deleted.pop(job.id, None)
        self._schedule()

    def delete(self, job_id: str, then: Callable[[], None] | None = None) -> None:
        """Removes the job with the next flush; then() runs once that is committed."""
        self._dirty.pop(job_id, None)
        self._deleted[job_id] = then
        self._schedule()

    def discard(self, job_id: str) -> None:
        """Forgets a save not yet flushed (a submit whose write failed)."""
        self._dirty.pop(job_id, None)

    def _schedule(self) -> None:
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, tests): write at once
            self._flush_soon()
            return
        self._scheduled = True
        loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        try:
            self.flush()
        except StoreError as exc:  # kept marked: the next flush tries again (a job's advance never fails for it)
            if time.monotonic() - self._last_error >= 60:  # one line a minute while it lasts
                self._last_error = time.monotonic()
                log.error("%s (retrying with the next change)", exc)

    def flush(self) -> None:
        """Writes every saved job and deletion in one transaction. StoreError when it cannot (the
        jobs stay marked, for the next flush)."""
        self._scheduled = False
        if self._db is None:  # closed at exit: what changes after that is not kept
            return
        if not self._dirty and not self._deleted:
            return
        dirty, deleted = self._dirty, self._deleted
        inserts, params, updates = [], [], []
        for job in dirty.values():
            row = self._row(job)
            if job.id in self._on_disk:
                updates.append((*row[3:], job.id))
            else:
                inserts.append(row)
                params.append((job.id, job.params.SerializeToString()))
        gone = [(job_id,) for job_id in deleted]
        try:
            with self._db:  # one transaction: committed on leaving, rolled back on an error
                self._db.executemany(_INSERT, inserts)
                self._db.executemany("INSERT OR REPLACE INTO job_params (id, params) VALUES (?, ?)", params)
                self._db.executemany(_UPDATE, updates)
                self._db.executemany("DELETE FROM jobs WHERE id = ?", gone)
                self._db.executemany("DELETE FROM job_params WHERE id = ?", gone)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the job store {self.path}: {exc}") from None
        self._dirty, self._deleted = {}, {}
        self.writes += 1
        for job in dirty.values():
            self._on_disk.add(job.id)
            if job.done:
                self._logs.pop(job.id, None)
        for job_id, then in deleted.items():
            self._on_disk.discard(job_id)
            self._logs.pop(job_id, None)
            if then is not None:
                then()

    def _row(self, job: Job) -> tuple:
        return (job.id, job.principal, job.client_request_id, job.priority, job.phase.value, job.step, job.attempt,
                _ns(job.created), _ns(job.started), _ns(job.ended), wall_deadline(job),
                _blob(job.artifact), _blob(job.error), _blob(job.cancel_status), self._events(job))

    def _events(self, job: Job) -> bytes:
        """The job's encoded event log; only events added since the last write are encoded (the
        log only grows)."""
        count, blob = self._logs.get(job.id, (0, bytearray()))
        if count > len(job.events):  # not a log we have seen grow: start over
            count, blob = 0, bytearray()
        blob += encode_events(job.events[count:])
        if not job.done:
            self._logs[job.id] = (len(job.events), blob)
        return bytes(blob)


def _lock(path: Path) -> int:
    """An exclusive lock on PATH.lock, held while the store is open (the kernel drops it when the
    process dies, however it dies)."""
    lock_path = Path(f"{path}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"the job store {path} is in use by another diffserve scheduler (it holds {lock_path}); "
                         f"give each scheduler its own --state-dir") from None
    return fd


def _create(path: Path, migrations: list[tuple[str, ...]]) -> None:
    """A new store, built under a temporary name and renamed into place once complete."""
    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # prompts are private; -wal and -shm take this mode
    db = sqlite3.connect(tmp)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        _migrate(db, tmp, 0, migrations)
    finally:
        db.close()  # the last connection: checkpoints and removes tmp-wal
    os.replace(tmp, path)


def _connect(path: Path, migrations: list[tuple[str, ...]]) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise StoreError(f"the job store {path} was written by a newer diffserve (schema version {version}; this one reads up to "
                             f"{len(migrations)}): run that version, or move the file aside (mv {path} {path}.newer) to start with "
                             f"an empty store")
        if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{path} is a SQLite database but not a diffserve job store: move it aside, or pick another --state-dir")
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreError(_damaged(path, "; ".join(problems)))
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StoreError(f"the job store {path} cannot be put in WAL mode (is its folder on a network file system?)")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoint_soon(), on a thread
        if version < len(migrations):
            _migrate(db, path, version, migrations)
    except sqlite3.OperationalError:  # cannot open, read-only, I/O error: JobStore.open says so
        db.close()
        raise
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        db.close()
        raise StoreError(_damaged(path, str(exc))) from None
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path, version: int, migrations: list[tuple[str, ...]]) -> None:
    """Upgrades from `version` to the newest, one transaction per step."""
    for target in range(version + 1, len(migrations) + 1):
        db.execute("BEGIN")  # explicit: sqlite3 would run DDL outside a transaction
        try:
            for statement in migrations[target - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
            db.commit()
        except BaseException:
            db.rollback()
            raise
        if version:
            log.info("upgraded the job store %s to schema version %d", path, target)


def _unusable(path: Path, exc: Exception) -> str:
    return f"cannot open the job store {path}: {exc} (check the state folder's owner, permissions and free space)"


def _damaged(path: Path, why: str) -> str:
    return (f"the job store {path} is damaged ({why}). Nothing was started. Restore a backup of it, or move it aside "
            f"(mv {path} {path}.broken, with its -wal file if any) to start with an empty store: jobs in it are lost")
