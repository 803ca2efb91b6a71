"""The spool's one writer thread: every SQLite write of a process, with group commit.

Concurrent calls are batched into one transaction, so many SMTP sessions share
one COMMIT and one fsync (group commit). A failed commit is rolled back as a
whole, each call of the batch is retried alone, and the callers that still fail
get `SpoolError`. A call that can start at once with nothing queued may run on
its caller's thread instead (`try_now`: a lone SMTP session), and the delivery process
commits the calls of one turn of its event loop together on its own thread (`TurnBatch`).

Two processes write the spool (`relay serve` adds, its delivery process claims
and records outcomes); they take turns around every transaction on the write
lock (`relay.spool.lock`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from relay import metrics
from relay.errors import SpoolError
from relay.spool.lock import POLL, SpoolBusy, Turn
from relay.spool.schema import connect

log = logging.getLogger("relay.spool")

TRY_NOW_WAIT = 0.002  # seconds try_now() waits for the write turn on the event loop
MAX_BATCH = 512  # calls per group commit
# Errors after which the connection itself is suspect: reopen it for the next batch.
_REOPEN_CODES = {10, 11, 14, 26}  # SQLITE_IOERR, CORRUPT, CANTOPEN, NOTADB
_DAMAGED_CODES = {11, 26}  # SQLITE_CORRUPT, NOTADB: the file is damaged, for good

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]


@dataclass(slots=True)
class Job(Generic[T]):
    op: Op[T]
    future: concurrent.futures.Future[T]
    transaction: bool = True  # False: run alone, outside BEGIN (PRAGMAs)


class Writer(threading.Thread):
    """The one thread that touches the service's SQLite connection."""

    def __init__(self, path: Path, *, poll: float = POLL, claims_next: bool = False) -> None:
        super().__init__(name="relay-spool", daemon=True)
        self.path = path
        self.jobs: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self.commits = 0
        self.pragmas: dict[str, int] = {}  # re-applied on reopen (max_page_count, query_only)
        self._conn: sqlite3.Connection | None = None
        self._turn = Turn(path.parent, poll=poll, claims_next=claims_next)
        self._using = threading.RLock()  # the connection: this thread, or a caller of try_now()
        self.damaged = False  # SQLite found the file damaged: it does not heal (see failed)

    def submit(self, op: Op[T], *, transaction: bool = True) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.jobs.put(Job(op, future, transaction))
        return future

    def run(self) -> None:
        carry: list[Job[Any] | None] = []  # a job read ahead that cannot join the batch
        while True:
            first = carry.pop() if carry else self.jobs.get()
            if first is None:
                break
            self._take(first, carry)
            # Held while the thread waits for the next job, an add's op kept the mail's
            # bytes: after a burst of large mails, the last batch's stayed in memory past
            # the heap trim that follows them (relay.receive.budget), until the next mail.
            del first
        with self._using:
            self._close()
            self._turn.close()

    def _take(self, first: Job[Any], carry: list[Job[Any] | None]) -> None:
        """Run `first` alone, or with the jobs queued behind it as one batch."""
        if not first.transaction:
            self._alone(first)
            return
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

    def try_now(self, ops: list[Op[Any]]) -> tuple[bool, list[Any]]:
        """Run `ops` as one transaction on the calling thread if nothing has to be waited
        for (no queued job, the connection free, the other process not writing):
        (True, their results), or (False, []) and the caller submits them instead.

        For a lone SMTP session this saves two thread hand-offs per 250;
        the event loop is held for the commit (and up to TRY_NOW_WAIT for the other
        process's turn), so it is not for concurrent sessions, which share commits
        through the queue. SpoolError as from a queued call; any other exception of an
        op rolls the whole transaction back and is raised as it is.
        """
        if not self.jobs.empty() or not self._using.acquire(blocking=False):
            return False, []
        try:
            try:
                with self._turn.held(TRY_NOW_WAIT):
                    return True, self._transaction_now(ops)
            except SpoolBusy:  # from held(): the other process is writing
                return False, []
        finally:
            self._using.release()

    def _alone(self, job: Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with self._using, self._turn.held():
                job.future.set_result(job.op(self._connection()))
        except Exception as exc:
            self.failed(exc)
            job.future.set_exception(SpoolError(f"spool {self.path}: {exc}"))

    def _run(self, batch: list[Job[Any]]) -> None:
        with self._using:
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job[Any]]) -> None:
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
            self.failed(exc)
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _REOPEN_CODES:
                self._close()
            raise SpoolError(f"spool {self.path}: {exc}") from exc
        self.commits += 1
        return results

    def failed(self, exc: Exception) -> None:
        """A damaged file (a disk fault, a hand edit: never a crash, which WAL survives)
        said so once at ERROR and in `damaged` (/readyz, relay_spool_damaged): mail may
        still be accepted into it that cannot be delivered, and nothing else shows it."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code not in _DAMAGED_CODES or self.damaged:
            return
        self.damaged = True
        metrics.SPOOL_DAMAGED.set(1)
        metrics.DELIVERY_SPOOL_DAMAGED.set(1)
        log.error(
            "event=spool_damaged path=%s error=%r (stop relay, keep the file, and recover it:"
            " README.md, 'A damaged spool')",
            self.path,
            str(exc),
        )

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


class TurnBatch:
    """Group commit on an event loop (the delivery process): every call made in one turn
    of the loop (the outcomes of the deliveries whose replies came in together, the next
    claim) commits in one transaction at the start of the next turn, on the loop's thread
    when that needs no waiting (`Writer.try_now`)."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._calls: list[tuple[Op[Any], asyncio.Future[tuple[bool, Any]]]] = []

    async def run(self, op: Op[T]) -> tuple[bool, T | None]:
        """(True, op's result), or (False, None): not run, the caller submits it to the
        writer thread."""
        waiter: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._calls.append((op, waiter))
        if len(self._calls) == 1:
            asyncio.get_running_loop().call_soon(self._commit)
        return await waiter

    def _commit(self) -> None:
        calls = [(op, waiter) for op, waiter in self._calls if not waiter.cancelled()]
        self._calls = []
        if not calls:
            return  # every caller gave up meanwhile
        try:
            done, results = self._writer.try_now([op for op, _ in calls])
        except Exception:
            # Rolled back. Each call goes alone through the writer thread, so one bad call
            # fails only itself, as in the writer thread's own batches.
            done = False
        if not done:
            results = [None] * len(calls)
        for (_, waiter), result in zip(calls, results, strict=True):
            if not waiter.cancelled():
                waiter.set_result((done, result))
