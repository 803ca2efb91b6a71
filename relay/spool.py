"""The durable queue: one SQLite database (WAL, synchronous=FULL) in `settings.spool`.

receive -> `Spool.add()` (committed and fsynced before the 250) -> deliver loop
`claim()` -> `sent()` / `defer()` / `fail()`. States, litequeue-style:

    queued --claim--> inflight --sent--> sent (body dropped, metadata kept until purge)
      ^                  |  \\--defer--> deferred (due_at) --claim--> inflight ...
      |                  |   \\-fail---> failed (dead letter, body kept; `relay queue retry`)
      +---- reclaim at open (a crash left it inflight) ----+

All SQLite work of the service runs on one writer thread. Concurrent calls are
batched into one transaction, so many SMTP sessions share one COMMIT and one
fsync (group commit). A failed commit is rolled back as a whole, each call of
the batch is retried alone, and the callers that still fail get `SpoolError`.

The `connect()` / `open_readonly()` helpers at the end are for `relay queue`,
which works on the same file from another process while the service runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from relay.errors import SpoolError
from relay.mail import Mail

log = logging.getLogger("relay.spool")

DB_NAME = "spool.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
MAX_BATCH = 512  # calls per group commit
# Errors after which the connection itself is suspect: reopen it for the next batch.
_REOPEN_CODES = {10, 11, 14, 26}  # SQLITE_IOERR, CORRUPT, CANTOPEN, NOTADB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
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
    trace BLOB NOT NULL,                -- our Received: line, CRLF-terminated
    body BLOB                           -- bytes as received; NULL once sent
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, due_at);
CREATE TABLE IF NOT EXISTS events (
    queue_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id, at);
"""

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

    def _alone(self, job: _Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.op(self._connection()))
        except Exception as exc:
            job.future.set_exception(SpoolError(f"spool {self.path}: {exc}"))

    def _run(self, batch: list[_Job[Any]]) -> None:
        if not batch:
            return
        try:
            results = self._transaction([job.op for job in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for job in batch:  # one bad call must not fail the others
                self._run([job])
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _transaction(self, ops: list[Op[Any]]) -> list[Any]:
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


class Spool:
    """The service's handle on the spool. Create with `await Spool.open(directory)`."""

    def __init__(self, writer: _Writer) -> None:
        self._writer = writer
        self.path = writer.path
        self.wakeup = asyncio.Event()  # set after each committed add: new mail to deliver
        self.new_id = new_id
        self._closed = False

    @classmethod
    async def open(cls, directory: Path) -> Spool:
        """Open (creating) the spool; messages a crash left inflight go back to queued."""
        try:
            await asyncio.to_thread(_prepare, directory)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open spool in {directory}: {exc}") from exc
        writer = _Writer(directory / DB_NAME)
        writer.start()
        spool = cls(writer)
        try:
            reclaimed = await spool._call(_reclaim)
        except BaseException:
            await spool.close()
            raise
        if reclaimed:
            log.warning("event=reclaimed count=%d (inflight at the last stop)", reclaimed)
            spool.wakeup.set()
        return spool

    @property
    def commits(self) -> int:
        """Transactions committed so far (group commit: far fewer than calls)."""
        return self._writer.commits

    async def close(self) -> None:
        """Finish queued calls, then close the database."""
        if self._closed:
            return
        self._closed = True
        self._writer.jobs.put(None)
        await asyncio.to_thread(self._writer.join, 30)

    async def _call(self, op: Op[T]) -> T:
        if self._closed or not self._writer.is_alive():
            raise SpoolError(f"spool {self.path} is closed")
        return await asyncio.wrap_future(self._writer.submit(op))

    async def add(
        self, *, sender: str, recipients: Sequence[str], raw: bytes, peer: str, trace: bytes,
        message_id: str, queue_id: str | None = None,
    ) -> str:  # fmt: skip
        """Store one message; returns its queue id once committed and fsynced.

        Raises SpoolError (disk full, read-only, I/O error, locked); then nothing is stored.
        """
        qid = queue_id or self.new_id()
        rcpts = json.dumps(list(recipients))

        def op(conn: sqlite3.Connection) -> str:
            now = time.time()
            conn.execute(
                "INSERT INTO messages (id, state, sender, recipients, size, message_id, peer,"
                " received_at, due_at, updated_at, trace, body)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (qid, sender, rcpts, len(raw), message_id, peer, now, now, now, trace, raw),
            )
            _event(conn, qid, "received", f"from {peer}, {len(raw)} bytes", now)
            return qid

        result = await self._call(op)
        self.wakeup.set()
        return result

    async def claim(self, limit: int) -> list[Mail]:
        """Due queued/deferred messages -> inflight (attempts + 1), oldest first."""

        def op(conn: sqlite3.Connection) -> list[Mail]:
            now = time.time()
            rows = conn.execute(
                "UPDATE messages SET state = 'inflight', claimed_at = ?1, updated_at = ?1,"
                " attempts = attempts + 1 WHERE id IN (SELECT id FROM messages"
                " WHERE state IN ('queued', 'deferred') AND due_at <= ?1"
                " ORDER BY due_at, id LIMIT ?2)"
                " RETURNING id, sender, recipients, body, received_at, attempts, peer, trace,"
                " message_id",
                (now, limit),
            ).fetchall()
            mails = [
                Mail(id=r[0], sender=r[1], recipients=tuple(json.loads(r[2])), raw=bytes(r[3]),
                     received_at=r[4], attempts=r[5], peer=r[6], trace=bytes(r[7]),
                     message_id=r[8] or "")
                for r in rows
            ]  # fmt: skip
            return sorted(mails, key=lambda m: m.id)

        return await self._call(op) if limit > 0 else []

    async def sent(
        self, queue_id: str, *, rule: str | None, route: str, reply: str,
        ses_message_id: str | None = None, fallback_reason: str | None = None,
    ) -> None:  # fmt: skip
        """Delivered: keep the metadata, drop the body."""
        detail = f"route={route} rule={rule} reply={reply}"
        if ses_message_id:
            detail += f" ses_message_id={ses_message_id}"
        await self._finish(queue_id, State.SENT, detail, rule=rule, route=route, reply=reply,
                           ses_message_id=ses_message_id, fallback_reason=fallback_reason,
                           body=None)  # fmt: skip

    async def defer(
        self, queue_id: str, *, due_at: float, rule: str | None, route: str, reply: str,
        fallback_reason: str | None = None, recipients: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        """Try again at `due_at`; `recipients`: those still to do when some succeeded."""
        fields: dict[str, Any] = {"due_at": due_at, "rule": rule, "route": route, "reply": reply,
                                  "fallback_reason": fallback_reason}  # fmt: skip
        if recipients is not None:
            fields["recipients"] = json.dumps(list(recipients))
        detail = f"route={route} due in {max(0.0, due_at - time.time()):.0f}s reply={reply}"
        await self._finish(queue_id, State.DEFERRED, detail, **fields)

    async def fail(
        self, queue_id: str, *, rule: str | None, route: str, reply: str,
        fallback_reason: str | None = None,
    ) -> None:  # fmt: skip
        """Dead letter: keep the body, visible to `relay queue`, retryable."""
        await self._finish(queue_id, State.FAILED, f"route={route} reply={reply}", rule=rule,
                           route=route, reply=reply, fallback_reason=fallback_reason)  # fmt: skip

    async def _finish(self, queue_id: str, state: State, detail: str, **fields: Any) -> None:
        columns = ", ".join(f"{name} = ?" for name in fields)

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            cursor = conn.execute(
                f"UPDATE messages SET state = ?, updated_at = ?, {columns} WHERE id = ?",
                (state.value, now, *fields.values(), queue_id),
            )
            if cursor.rowcount:
                _event(conn, queue_id, state.value, detail, now)
            else:
                log.warning("event=spool_missing id=%s state=%s (deleted meanwhile?)",
                            queue_id, state)  # fmt: skip

        await self._call(op)

    async def event(self, queue_id: str, event: str, detail: str) -> None:
        """Add a line to the message's history (`relay queue show`)."""
        await self._call(lambda conn: _event(conn, queue_id, event, detail, time.time()))

    async def purge(self, older_than: float) -> int:
        """Delete sent rows whose outcome is older than `older_than` seconds; return count."""

        def op(conn: sqlite3.Connection) -> int:
            cutoff = time.time() - older_than
            ids = "SELECT id FROM messages WHERE state = 'sent' AND updated_at < ?"
            conn.execute(f"DELETE FROM events WHERE queue_id IN ({ids})", (cutoff,))
            return conn.execute(
                "DELETE FROM messages WHERE state = 'sent' AND updated_at < ?", (cutoff,)
            ).rowcount

        def vacuum(conn: sqlite3.Connection) -> None:
            # Give free pages (dropped bodies, purged rows) back to the disk. executescript
            # steps the PRAGMA to the end; execute() would free one page only.
            conn.executescript("PRAGMA incremental_vacuum;")

        count = await self._call(op)
        await asyncio.wrap_future(self._writer.submit(vacuum, transaction=False))
        return count

    async def counts(self) -> dict[str, int]:
        """Messages by state (every state present, zero when none): for metrics."""
        return await self._call(lambda conn: state_counts(conn))

    async def oldest_age(self) -> float:
        """Seconds since the oldest queued, deferred or in-flight message arrived (0: none)."""

        def op(conn: sqlite3.Connection) -> float:
            row = conn.execute(
                "SELECT min(received_at) FROM messages"
                " WHERE state IN ('queued', 'deferred', 'inflight')"
            ).fetchone()
            return max(0.0, time.time() - row[0]) if row and row[0] is not None else 0.0

        return await self._call(op)

    async def writable(self) -> bool:
        """Can the spool commit right now? A real write, for /readyz."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("CREATE TABLE IF NOT EXISTS probe (k INTEGER PRIMARY KEY, at REAL)")
            conn.execute("INSERT OR REPLACE INTO probe VALUES (1, ?)", (time.time(),))

        try:
            await self._call(op)
        except SpoolError:
            return False
        return True

    async def set_limits(self, *, max_pages: int | None = None, read_only: bool = False) -> None:
        """Cap the database at `max_pages` pages (as a full disk would) or refuse writes.

        For operators (a size cap) and for tests, which emulate disk-full and
        read-only file systems with it; both hold across reconnects.
        """
        pragmas = {"query_only": int(read_only), "max_page_count": max_pages or 0xFFFFFFFE}

        def op(conn: sqlite3.Connection) -> None:
            self._writer.pragmas.update(pragmas)
            for name, value in pragmas.items():
                conn.execute(f"PRAGMA {name} = {value}")

        if self._closed:
            raise SpoolError(f"spool {self.path} is closed")
        await asyncio.wrap_future(self._writer.submit(op, transaction=False))


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
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            # Before the first table and before WAL, or it does not take effect.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    os.chmod(path, 0o600)


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the spool's settings: WAL, synchronous=FULL, busy timeout."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def open_existing(directory: Path) -> sqlite3.Connection:
    """For `relay queue`: the spool of a (possibly running) service; SpoolError if absent."""
    path = directory / DB_NAME
    if not path.is_file():
        raise SpoolError(f"no spool at {path} (has the service ever started?)")
    try:
        conn = connect(path)
        conn.row_factory = sqlite3.Row
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot open spool {path}: {exc}") from exc
    return conn


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys((s.value for s in State), 0)
    for state, count in conn.execute("SELECT state, count(*) FROM messages GROUP BY state"):
        counts[state] = count
    return counts
