"""The spool's SQLite layer: states, queue ids, and the one writer thread
(the schema and its upgrades are `relay.spoolschema`).

`relay.spool.Spool` is the async API the service uses; everything here is the
machinery under it, plus `connect()` / `open_existing()` / `state_counts()` for
`relay queue`, which works on the same file from another process while the
service runs (WAL lets readers and a second writer in; busy_timeout covers the rest).

The SQLite work of a process runs on one writer thread. Concurrent calls are
batched into one transaction, so many SMTP sessions share one COMMIT and one
fsync (group commit). A failed commit is rolled back as a whole, each call of
the batch is retried alone, and the callers that still fail get `SpoolError`.
A call that can start at once with nothing queued may run on its caller's
thread instead (`try_now`: a lone SMTP session, the delivery process).

Two processes write the spool (`relay serve` adds, its delivery process
claims and records outcomes); they take turns around every transaction on
`relay.spoollock`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from relay.errors import SpoolError
from relay.spoollock import SpoolBusy, Turn
from relay.spoolschema import BUSY_TIMEOUT_MS, DB_NAME, SCHEMA_VERSION, schema_version

log = logging.getLogger("relay.spool")

TRY_NOW_WAIT = 0.002  # seconds try_now() waits for the write turn on the event loop
MAX_BATCH = 512  # calls per group commit
# Errors after which the connection itself is suspect: reopen it for the next batch.
_REOPEN_CODES = {10, 11, 14, 26}  # SQLITE_IOERR, CORRUPT, CANTOPEN, NOTADB

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]


class State(StrEnum):
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
    SENT = "sent"
    FAILED = "failed"


_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sorts like the number


class IdMaker:
    """12-char ids: 42 bits of milliseconds + 18 bits sequence, monotonic within a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def __call__(self) -> str:
        with self._lock:
            fresh = (time.time_ns() // 1_000_000) << 18 | secrets.randbits(16)
            self._last = value = max(fresh, self._last + 1)
        return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(55, -1, -5))


new_id = IdMaker()


@dataclass(slots=True)
class _Job(Generic[T]):
    op: Op[T]
    future: concurrent.futures.Future[T]
    transaction: bool = True  # False: run alone, outside BEGIN (PRAGMAs)


class _Writer(threading.Thread):
    """The one thread that touches the service's SQLite connection."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="relay-spool", daemon=True)
        self.path = path
        self.jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self.commits = 0
        self.pragmas: dict[str, int] = {}  # re-applied on reopen (max_page_count, query_only)
        self._conn: sqlite3.Connection | None = None
        self._turn = Turn(path.parent)
        self._using = threading.RLock()  # the connection: this thread, or a caller of try_now()

    def submit(self, op: Op[T], *, transaction: bool = True) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.jobs.put(_Job(op, future, transaction))
        return future

    def run(self) -> None:
        carry: list[_Job[Any] | None] = []  # a job read ahead that cannot join the batch
        while True:
            first = carry.pop() if carry else self.jobs.get()
            if first is None:
                break
            if not first.transaction:
                self._alone(first)
                continue
            batch = [first]
            while len(batch) < MAX_BATCH and not carry:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None or not job.transaction:
                    carry.append(job)
                else:
                    batch.append(job)
            # A caller that gave up (client gone) before we started is skipped.
            self._run([job for job in batch if job.future.set_running_or_notify_cancel()])
        with self._using:
            self._close()
            self._turn.close()

    def try_now(self, op: Op[T]) -> tuple[bool, T | None]:
        """Run `op` as a transaction on the calling thread if nothing has to be waited for
        (no queued job, the connection free, the other process not writing):
        (True, result), or (False, None) and the caller submits it instead.

        For a lone SMTP session this saves two thread hand-offs per 250 (about 0.2 ms);
        the event loop is held for the commit (and up to TRY_NOW_WAIT for the other
        process's turn), so it is not for concurrent sessions, which share commits
        through the queue. SpoolError as from a queued call.
        """
        if not self.jobs.empty() or not self._using.acquire(blocking=False):
            return False, None
        try:
            try:
                with self._turn.held(TRY_NOW_WAIT):
                    return True, self._transaction_now([op])[0]
            except SpoolBusy:  # from held(): the other process is writing
                return False, None
        finally:
            self._using.release()

    def _alone(self, job: _Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with self._using, self._turn.held():
                job.future.set_result(job.op(self._connection()))
        except Exception as exc:
            job.future.set_exception(SpoolError(f"spool {self.path}: {exc}"))

    def _run(self, batch: list[_Job[Any]]) -> None:
        with self._using:
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Job[Any]]) -> None:
        if not batch:
            return
        try:
            results = self._transaction([job.op for job in batch])
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, SpoolBusy):  # no turn: none would get one
                for job in batch:
                    job.future.set_exception(exc)
                return
            for job in batch:  # one bad call must not fail the others
                self._run_batch([job])
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _transaction(self, ops: list[Op[Any]]) -> list[Any]:
        with self._turn.held():
            return self._transaction_now(ops)

    def _transaction_now(self, ops: list[Op[Any]]) -> list[Any]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = [op(conn) for op in ops]
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _REOPEN_CODES:
                self._close()
            raise SpoolError(f"spool {self.path}: {exc}") from exc
        self.commits += 1
        return results

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.path)
            for name, value in self.pragmas.items():
                self._conn.execute(f"PRAGMA {name} = {int(value)}")
        return self._conn

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._close()  # a connection that cannot roll back is not used again

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def _event(conn: sqlite3.Connection, queue_id: str, event: str, detail: str, at: float) -> None:
    conn.execute(
        "INSERT INTO events (queue_id, at, event, detail) VALUES (?, ?, ?, ?)",
        (queue_id, at, event, detail),
    )


def _reclaim(conn: sqlite3.Connection) -> int:
    now = time.time()
    ids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE state = 'inflight'")]
    for qid in ids:
        conn.execute(
            "UPDATE messages SET state = 'queued', due_at = ?1, updated_at = ?1 WHERE id = ?2",
            (now, qid),
        )
        _event(conn, qid, "reclaimed", "was inflight when the service stopped", now)
    return len(ids)


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the spool's settings: WAL, synchronous=FULL, busy timeout."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def open_existing(directory: Path) -> sqlite3.Connection:
    """For `relay queue`: the spool of a (possibly running) service.

    SpoolError if it is absent or its schema is not this relay's version.
    """
    path = directory / DB_NAME
    if not path.is_file():
        raise SpoolError(f"no spool at {path} (has the service ever started?)")
    try:
        conn = connect(path)
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot open spool {path}: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        version = schema_version(conn, path)
        if version < SCHEMA_VERSION:
            # Upgrading here could pull the tables from under an older service still running.
            raise SpoolError(
                f"spool {path} has schema version {version}, older than this relay's"
                f" {SCHEMA_VERSION}: start the service (relay serve) once to upgrade it"
            )
    except sqlite3.Error as exc:
        conn.close()
        raise SpoolError(f"cannot open spool {path}: {exc}") from exc
    except SpoolError:
        conn.close()
        raise
    return conn


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys((s.value for s in State), 0)
    for state, count in conn.execute("SELECT state, count(*) FROM messages GROUP BY state"):
        counts[state] = count
    return counts
