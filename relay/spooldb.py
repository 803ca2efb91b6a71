"""The spool's SQLite layer: schema, states, queue ids, and the one writer thread.

`relay.spool.Spool` is the async API the service uses; everything here is the
machinery under it, plus `connect()` / `open_existing()` / `state_counts()` for
`relay queue`, which works on the same file from another process while the
service runs (WAL lets readers and a second writer in; busy_timeout covers the rest).

All SQLite work of the service runs on one writer thread. Concurrent calls are
batched into one transaction, so many SMTP sessions share one COMMIT and one
fsync (group commit). A failed commit is rolled back as a whole, each call of
the batch is retried alone, and the callers that still fail get `SpoolError`.

Two processes write the spool: `relay serve` adds, its delivery process
(relay.worker) claims and records outcomes. SQLite's busy handler would make
the one that finds the database locked sleep 1, 2, 5, 10 ms and more before it
looks again, a stall no 250 reply can afford. So each writer thread takes its
turn on an flock of `write.lock` around every transaction, looking for it every
50 µs, and gives up (SpoolBusy: a 451 for the client) after TURN_TIMEOUT.
`relay queue` does not take the lock; busy_timeout covers it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from relay.errors import SpoolError

log = logging.getLogger("relay.spool")

DB_NAME = "spool.sqlite3"
WRITE_LOCK = "write.lock"  # in the spool directory: whose turn it is to write (see above)
SCHEMA_VERSION = 2  # 2: bodies in their own table
BUSY_TIMEOUT_MS = 5000
TURN_TIMEOUT = BUSY_TIMEOUT_MS / 1000  # seconds to wait for write.lock, then SpoolBusy
MAX_BATCH = 512  # calls per group commit
# Errors after which the connection itself is suspect: reopen it for the next batch.
_REOPEN_CODES = {10, 11, 14, 26}  # SQLITE_IOERR, CORRUPT, CANTOPEN, NOTADB

# The body is written once, by add(), in a table of its own: a state change (claim,
# sent, defer, fail) rewrites the whole messages row, and with a 20 KB body inline
# that meant 20 KB more in the WAL each time. sent() deletes it; failed keep theirs.
_BODIES = """CREATE TABLE IF NOT EXISTS bodies (
    id TEXT PRIMARY KEY NOT NULL,       -- messages.id
    body BLOB NOT NULL                  -- bytes as received
)"""
_MESSAGES = """CREATE TABLE IF NOT EXISTS {table} (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,           -- JSON list: the recipients still to deliver to
    size INTEGER NOT NULL,              -- len(body) as received
    message_id TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    due_at REAL NOT NULL,
    claimed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    rule TEXT,
    route TEXT,
    ses_message_id TEXT,
    reply TEXT,
    fallback_reason TEXT,
    updated_at REAL NOT NULL,
    trace BLOB NOT NULL                 -- our Received: line, CRLF-terminated
)"""
_MESSAGES_DUE = "CREATE INDEX IF NOT EXISTS messages_due ON messages (state, due_at)"
# What claim() scans: only waiting rows, already in due order, so claiming stays
# cheap with 100,000 deferred messages (no sort of the whole queue per claim).
# Also made at every open: spools of version 1 were created without it.
_MESSAGES_READY = """CREATE INDEX IF NOT EXISTS messages_ready ON messages (due_at, id)
    WHERE state IN ('queued', 'deferred')"""
_SCHEMA = (
    _MESSAGES.format(table="messages"),
    _MESSAGES_DUE,
    _MESSAGES_READY,
    _BODIES,
    """CREATE TABLE IF NOT EXISTS events (
    queue_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
)""",
    "CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id, at)",
)
_V2_COLUMNS = (
    "id, state, sender, recipients, size, message_id, peer, received_at, due_at, claimed_at,"
    " attempts, rule, route, ses_message_id, reply, fallback_reason, updated_at, trace"
)
# From each older version straight to SCHEMA_VERSION (0: a new file).
_UPGRADES = {
    0: _SCHEMA,
    1: (  # bodies were messages.body, NULL once sent
        _BODIES,
        "INSERT INTO bodies (id, body) SELECT id, body FROM messages WHERE body IS NOT NULL",
        # A new table rather than DROP COLUMN, which fails on version 1's CREATE TABLE text
        # (the comment after its last column's comma swallows the closing parenthesis).
        _MESSAGES.format(table="messages_v2"),
        f"INSERT INTO messages_v2 ({_V2_COLUMNS}) SELECT {_V2_COLUMNS} FROM messages",
        "DROP TABLE messages",  # and its indexes
        "ALTER TABLE messages_v2 RENAME TO messages",
        _MESSAGES_DUE,
        _MESSAGES_READY,
    ),
}

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
        self._turn_fd: int | None = None  # write.lock, opened on first use

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
        self._close()
        if self._turn_fd is not None:
            os.close(self._turn_fd)

    def _alone(self, job: _Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with self._turn():
                job.future.set_result(job.op(self._connection()))
        except Exception as exc:
            job.future.set_exception(SpoolError(f"spool {self.path}: {exc}"))

    def _run(self, batch: list[_Job[Any]]) -> None:
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
                self._run([job])
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _transaction(self, ops: list[Op[Any]]) -> list[Any]:
        with self._turn():
            return self._transaction_now(ops)

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold write.lock (shared with the other relay process) for one transaction.

        Without the lock file (a read-only spool directory, say) SQLite's own
        locking and busy_timeout still keep the database consistent, only slower.
        """
        if self._turn_fd is None:
            with contextlib.suppress(OSError):
                self._turn_fd = os.open(
                    self.path.parent / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o600
                )
        if self._turn_fd is None:
            yield
            return
        _wait_turn(self._turn_fd, self.path)
        try:
            yield
        finally:
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

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


class SpoolBusy(SpoolError):
    """The other relay process held the write lock for TURN_TIMEOUT (stopped, or stuck)."""


def _wait_turn(fd: int, path: Path) -> None:
    """Take write.lock, looking every 50 µs for 10 ms (the other process's
    transactions take a fraction of a millisecond), then every 1 ms; SpoolBusy
    after TURN_TIMEOUT.

    Not a blocking flock: a process stopped while it holds the lock would hold up
    every add for good, where a client must get its 451 in bounded time.
    """
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited >= TURN_TIMEOUT:
                raise SpoolBusy(
                    f"spool {path}: the other relay process held {WRITE_LOCK} for "
                    f"{TURN_TIMEOUT:g} s"
                ) from None
            time.sleep(0.00005 if waited < 0.01 else 0.001)


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


def _prepare(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / DB_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if _schema_version(conn, path) == 0:
            # Before the first table and before WAL, or it does not take effect.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if _schema_version(conn, path) < SCHEMA_VERSION:
            _upgrade(conn, path)
        conn.execute(_MESSAGES_READY)
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    os.chmod(path, 0o600)


def _schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The spool's schema version; SpoolError if a newer relay wrote it."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool {path} has schema version {version}; this relay knows versions up to"
            f" {SCHEMA_VERSION}: run the newer relay that wrote it"
        )
    return version


def _upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction: all of it or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: the other relay process may have just done it.
        for statement in _UPGRADES.get(_schema_version(conn, path), ()):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


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
        version = _schema_version(conn, path)
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
