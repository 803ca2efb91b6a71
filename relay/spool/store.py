"""The durable queue: one SQLite database (WAL) in `settings.spool`.

receive -> `Spool.add()` (committed and fsynced before the 250) -> deliver loop
`claim()` -> `sent()` / `defer()` / `fail()`. States, litequeue-style:

    queued --claim--> inflight --sent--> sent (body deleted, metadata kept until purge)
      ^                  |  \\--defer--> deferred (due_at) --claim--> inflight ...
      |                  |   \\-fail---> failed (dead letter, body kept; `relay queue retry`;
      |                  |                purge_failed() after `failed_retention`)
      +-- reclaim() when delivery starts (a crash left it inflight) --+
      +-- park(): classified for SES while SES's lane was full; claims pass it by until
          the lane has room (claim(parked=N), oldest first)
    sent --feedback(): SES bounced every recipient for good--> bounced (kept until purge)

Two processes share the file in `relay serve`: the receiving one adds with
synchronous=FULL (a 250 means fsynced); the delivery process opens
it with `full_sync=False` (synchronous=NORMAL): a claim or an outcome lost to a
power cut means one delivery again (at least once), never a lost mail. WAL lets
both write; they take turns on an flock (`relay.spool.lock`). Threads of both
checkpoint the WAL, outside any commit (`relay.spool.checkpoint`).

Bodies live in a table of their own (`bodies`), written once by `add()` and
deleted by `sent()`, so a state change rewrites a small row, not the mail.
The SQLite machinery is beside this module: the file and its schema (`schema`),
the writer thread with group commit (`writer`), rows and their events (`rows`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from relay.errors import SpoolError
from relay.mail import Mail
from relay.spool.checkpoint import EVERY, SAFETY_PAGES, SERVE_EVERY, Checkpointer
from relay.spool.feedback import Applied, NoticeFor, Reputation, apply, reputation
from relay.spool.lock import DELIVERY_POLL, POLL
from relay.spool.rows import (
    Notice,
    State,
    add_event,
    claim_due,
    finish,
    insert_mail,
    new_id,
    oldest_waiting,
    park,
    purge_failed,
    purge_sent,
    queued_now,
    reclaim_inflight,
    split_off,
    state_counts,
)
from relay.spool.schema import BUSY_TIMEOUT_MS, DB_NAME, disk_state, prepare, reader
from relay.spool.writer import Op, T, TurnBatch, Writer

log = logging.getLogger("relay.spool")

# purge() in steps, each one transaction under the write lock. Here, purging 200,000 rows:
# 24 ms per step of rows, 23 ms per step of pages at the median, 0.1 s at most, against
# lock.TURN_TIMEOUT's 5 s (one step for all of them held it 10 s).
CLOCK_STEP = 1.0  # seconds the wall clock may go back between two claims unremarked
PURGE_ROWS = 500  # rows (and feedback keys) per step, under SQLite's 999 parameters
PURGE_PAGES = 1000  # free pages given back to the disk per step


class Spool:
    """The service's handle on the spool. Create with `await Spool.open(directory)`."""

    def __init__(
        self, writer: Writer, checkpointer: Checkpointer, *, writes_now: bool = False
    ) -> None:
        self._writer = writer
        self._checkpointer = checkpointer
        self.path = writer.path
        self.wakeup = asyncio.Event()  # set after each committed add: new mail to deliver
        self.new_id = new_id
        self._closed = False
        # The delivery side: the calls of one turn of its event loop commit together.
        self._turn_batch = TurnBatch(writer) if writes_now else None
        self._last_claim = -math.inf  # wall clock at the last claim: a step back shows there

    @classmethod
    async def open(cls, directory: Path, *, full_sync: bool = True) -> Spool:
        """Open (creating) the spool.

        `full_sync=False` commits with synchronous=NORMAL: durable at the next
        checkpoint or FULL commit rather than at once. Only for the delivery side,
        whose writes may be lost to a power cut (then a mail goes out twice);
        `add()` must stay FULL. That side also commits on its own event loop, the
        calls of one turn of the loop together (`TurnBatch`), when it can do so at
        once (`Writer.try_now`): one BEGIN, COMMIT and write turn for the outcomes
        that came in together, and no thread hand-offs. Each side checkpoints the WAL on
        a thread of its own (`checkpoint.Checkpointer`, the delivery side more often):
        no commit waits for one.
        """
        try:
            await asyncio.to_thread(prepare, directory)
        except SpoolError:
            raise  # says which file and why already (a schema newer than this code)
        except (OSError, sqlite3.Error) as exc:
            why = disk_state(directory)
            name = getattr(exc, "sqlite_errorname", None)
            detail = f"{exc} ({name})" if name else str(exc)
            raise SpoolError(
                f"cannot open spool {directory / DB_NAME}: {detail}{f'; {why}' if why else ''}"
            ) from exc
        writer = Writer(
            directory / DB_NAME,
            poll=POLL if full_sync else DELIVERY_POLL,
            claims_next=not full_sync,  # the delivery side: see relay.spool.lock, Next
        )
        writer.pragmas["wal_autocheckpoint"] = SAFETY_PAGES  # the Checkpointers' job
        checkpointer = Checkpointer(writer.path, every=SERVE_EVERY if full_sync else EVERY)
        checkpointer.start()
        if not full_sync:
            writer.pragmas["synchronous"] = 1  # NORMAL; kept across reconnects
        writer.start()
        return cls(writer, checkpointer, writes_now=not full_sync)

    async def reclaim(self) -> int:
        """Messages left inflight by a delivery that died go back to queued; returns how many.

        Only the spool's one delivery loop calls this, before its first claim: in
        `relay serve` the delivery process once it holds the spool's delivery lock,
        so a restarted service never takes back mail an old delivery process is
        still sending.
        """
        reclaimed = await self._call(reclaim_inflight)
        if reclaimed:
            log.warning("event=reclaimed count=%d (inflight at the last stop)", reclaimed)
            self.wakeup.set()
        return reclaimed

    @property
    def commits(self) -> int:
        """Transactions committed so far (group commit: far fewer than calls)."""
        return self._writer.commits

    async def close(self) -> None:
        """Finish queued calls, then close the database."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._checkpointer.stop)
        self._writer.jobs.put(None)
        await asyncio.to_thread(self._writer.join, 30)

    async def _call(self, op: Op[T], *, now: bool = False) -> T:
        """Run `op` in a transaction: on this thread if `now` and that needs no waiting;
        on the delivery side together with the other calls of this turn of the event
        loop (`TurnBatch`); else on the writer thread."""
        if self._closed or not self._writer.is_alive():
            raise SpoolError(f"spool {self.path} is closed")
        if self._turn_batch is not None:
            done, result = await self._turn_batch.run(op)
            if done:
                return cast(T, result)
        elif now:
            done, results = self._writer.try_now([op])
            if done:
                return cast(T, results[0])  # op's own result (None for some ops)
        return await asyncio.wrap_future(self._writer.submit(op))

    @property
    def damaged(self) -> bool:
        """SQLite has found the file damaged (see Writer._failed)."""
        return self._writer.damaged

    async def add(
        self,
        *,
        sender: str,
        recipients: Sequence[str],
        raw: bytes,
        peer: str,
        trace: bytes,
        message_id: str,
        queue_id: str | None = None,
        alone: bool = False,
        note: str = "",
    ) -> str:
        """Store one message; returns its queue id once committed and fsynced.

        `alone`: the caller is the only SMTP session, so nothing waits on the event
        loop: commit right here when that needs no waiting (`Writer.try_now`), not
        through the writer thread. `note` is added to the "received" history line (what
        receive did to the mail, e.g. bare newlines normalized). Raises SpoolError (disk
        full, read-only, I/O error, locked); then nothing is stored.
        """
        qid = queue_id or self.new_id()
        rcpts = json.dumps(list(recipients))
        detail = f"from {peer}, {len(raw)} bytes" + (f"; {note}" if note else "")

        def op(conn: sqlite3.Connection) -> str:
            insert_mail(
                conn,
                queue_id=qid,
                sender=sender,
                recipients=rcpts,
                raw=raw,
                peer=peer,
                trace=trace,
                message_id=message_id,
                detail=detail,
                now=time.time(),
            )
            return qid

        result = await self._call(op, now=alone)
        self.wakeup.set()
        return result

    async def claim(self, limit: int, *, parked: int = 0) -> list[Mail]:
        """Due queued/deferred messages -> inflight (attempts + 1), oldest first; up to
        `parked` of them from those set aside for SES's lane (`park`) before the rest."""
        if limit <= 0:
            return []
        now = time.time()
        back = now < self._last_claim - CLOCK_STEP
        self._last_claim = now

        def op(conn: sqlite3.Connection) -> list[Mail]:
            if back and (moved := queued_now(conn, now)):
                log.warning(
                    "event=clock_stepped_back count=%d (waiting mail made due as meant)", moved
                )
            return claim_due(conn, limit, now, parked=parked)

        return await self._call(op)

    async def park(self, queue_ids: Sequence[str], lane: str) -> int:
        """Claimed messages back to queued, their claim undone, set aside for `lane` until
        a claim with `parked` takes them (relay.spool.rows.park)."""
        if not queue_ids:
            return 0
        now = time.time()
        return await self._call(lambda conn: park(conn, queue_ids, lane, now))

    async def sent(
        self,
        queue_id: str,
        *,
        rule: str | None,
        route: str,
        reply: str,
        ses_message_id: str | None = None,
        fallback_reason: str | None = None,
        notice: Notice | None = None,
    ) -> None:
        """Delivered: keep the metadata, delete the body; `notice`: a DSN for recipients
        refused for good meanwhile, queued in the same transaction."""
        detail = f"route={route} rule={rule} reply={reply}"
        if ses_message_id:
            detail += f" ses_message_id={ses_message_id}"
        await self._finish(
            queue_id,
            State.SENT,
            detail,
            rule=rule,
            route=route,
            reply=reply,
            ses_message_id=ses_message_id,
            fallback_reason=fallback_reason,
            drop_body=True,
            notice=notice,
        )

    async def defer(
        self,
        queue_id: str,
        *,
        due_at: float,
        rule: str | None,
        route: str,
        reply: str,
        fallback_reason: str | None = None,
        recipients: Sequence[str] | None = None,
        notice: Notice | None = None,
    ) -> None:
        """Try again at `due_at`; `recipients`: those still to do when some succeeded;
        `notice`: a DSN for those refused for good meanwhile, in the same transaction."""
        fields: dict[str, Any] = {
            "due_at": due_at,
            "rule": rule,
            "route": route,
            "reply": reply,
            "fallback_reason": fallback_reason,
        }
        if recipients is not None:
            fields["recipients"] = json.dumps(list(recipients))
        detail = f"route={route} due in {max(0.0, due_at - time.time()):.0f}s reply={reply}"
        await self._finish(queue_id, State.DEFERRED, detail, notice=notice, **fields)

    async def fail(
        self,
        queue_id: str,
        *,
        rule: str | None,
        route: str,
        reply: str,
        fallback_reason: str | None = None,
        recipients: Sequence[str] | None = None,
        notice: Notice | None = None,
    ) -> None:
        """Dead letter: keep the body (until `purge_failed`), visible to `relay queue`,
        retryable; `recipients`: those it failed for, when others were delivered (a retry
        must not send to them again); `notice`: its DSN to the sender, queued in the same
        transaction (never one without the other)."""
        fields: dict[str, Any] = {"rule": rule, "route": route, "reply": reply}
        if recipients is not None:
            fields["recipients"] = json.dumps(list(recipients))
        await self._finish(
            queue_id,
            State.FAILED,
            f"route={route} reply={reply}",
            fallback_reason=fallback_reason,
            notice=notice,
            **fields,
        )

    async def _finish(
        self,
        queue_id: str,
        state: State,
        detail: str,
        *,
        drop_body: bool = False,
        notice: Notice | None = None,
        **fields: Any,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            done = finish(
                conn,
                queue_id,
                state,
                detail,
                fields,
                drop_body=drop_body,
                notice=notice,
                now=time.time(),
            )
            if not done:
                log.warning(
                    "event=spool_missing id=%s state=%s (deleted meanwhile?)", queue_id, state
                )

        await self._call(op)
        if notice is not None:
            self.wakeup.set()  # the DSN is due now

    async def sync(self) -> None:
        """Make every commit so far durable: an fsync of the WAL. The delivery side commits
        with synchronous=NORMAL, on disk only at the next checkpoint; what must not be
        lost to a power cut once told to someone else (an SES event about to be deleted
        from its queue) waits for this."""

        def fsync_wal() -> None:
            try:
                fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            except FileNotFoundError:
                return  # no WAL: every commit is in the database, synced by its checkpoint
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        try:
            await asyncio.to_thread(fsync_wal)
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot sync the WAL: {exc}") from exc

    async def split(
        self, queue_id: str, *, child: str, recipients: Sequence[str], reason: str
    ) -> None:
        """Move `recipients` to a new queued message `child` (queued, due now), in one
        transaction: each part then takes its own route and ends in its own state."""
        moved = list(recipients)
        await self._call(lambda conn: split_off(conn, queue_id, child, moved, reason, time.time()))
        self.wakeup.set()

    async def event(self, queue_id: str, event: str, detail: str) -> None:
        """Add a line to the message's history (`relay queue show`)."""
        await self._call(lambda conn: add_event(conn, queue_id, event, detail, time.time()))

    async def feedback(
        self,
        *,
        key: str,
        ses_message_id: str,
        event: str,
        detail: str,
        kind: str,
        failed: Sequence[str] = (),
        delivered: Sequence[str] = (),
        notice_for: NoticeFor | None = None,
    ) -> Applied:
        """Apply one SES event to the mail SES knows as `ses_message_id`, at most once per
        `key`; `notice_for` may queue a DSN in the same transaction; `failed`: the
        recipients it failed for good (all of them, over its events: the row is `bounced`);
        `delivered`: those it says got the mail."""

        def op(conn: sqlite3.Connection) -> Applied:
            return apply(
                conn,
                key=key,
                ses_message_id=ses_message_id,
                event=event,
                detail=detail,
                kind=kind,
                failed=failed,
                delivered=delivered,
                notice_for=notice_for,
                now=time.time(),
            )

        applied = await self._call(op)
        self.wakeup.set()  # a DSN may be due
        return applied

    async def reputation(self, since: float) -> Reputation:
        """Relay's SES sends since `since` and the bounces and complaints about them (it
        scans every row; each minute in each process)."""
        return await self._read(lambda conn: reputation(conn, since))

    async def _read(self, query: Op[T]) -> T:
        """`query` on a read-only connection of its own, on a thread, outside the write
        turn: read in the turn, the scans of the metrics and the SES rates held up every
        add meanwhile, and with them Moodle's 250s."""

        def read() -> T:
            with contextlib.closing(reader(self.path, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
                return query(conn)

        try:
            return await asyncio.to_thread(read)
        except sqlite3.Error as exc:
            self._writer.failed(exc)  # a damaged file says so here too (/readyz, a metric)
            raise SpoolError(f"cannot read spool {self.path}: {exc}") from exc

    async def purge(self, older_than: float) -> int:
        """Delete sent rows whose outcome is older than `older_than` seconds; return count.

        In steps of PURGE_ROWS rows, then of PURGE_PAGES free pages given back to the disk:
        each step holds the spool's write lock, which relay serve's adds wait for (and
        answer 451 after lock.TURN_TIMEOUT)."""

        def vacuum(conn: sqlite3.Connection) -> int:
            # executescript steps the PRAGMA to the end; execute() would free one page only.
            conn.executescript(f"PRAGMA incremental_vacuum({PURGE_PAGES});")
            left: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
            return left

        cutoff = time.time() - older_than
        count = 0
        while True:
            rows, keys = await self._call(lambda conn: purge_sent(conn, cutoff, PURGE_ROWS))
            count += rows
            if max(rows, keys) < PURGE_ROWS:
                break
        free = math.inf  # pages; a spool made without auto_vacuum keeps them
        while True:
            left = await asyncio.wrap_future(self._writer.submit(vacuum, transaction=False))
            if not 0 < left < free:
                return count
            free = left

    async def purge_failed(self, older_than: float) -> int:
        """Delete dead letters (failed rows) that failed more than `older_than` seconds
        ago, in steps of PURGE_ROWS; return the count. Their pages go back to the disk at
        the next `purge`."""
        cutoff = time.time() - older_than
        count = 0
        while True:
            rows = await self._call(lambda conn: purge_failed(conn, cutoff, PURGE_ROWS))
            count += rows
            if rows < PURGE_ROWS:
                return count

    async def counts(self) -> dict[str, int]:
        """Messages by state (every state present, zero when none): for metrics, every
        5 s, outside the write turn (`_read`)."""
        return await self._read(state_counts)

    async def oldest_age(self) -> float:
        """Seconds since the oldest queued, deferred or in-flight message arrived (0: none).
        For metrics, every 5 s, outside the write turn (`_read`): it scans every waiting row."""
        oldest = await self._read(oldest_waiting)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

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
