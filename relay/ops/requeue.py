"""`relay queue retry/delete`: acting on spool rows from another process, as the service runs.

Each step of STEP ids is one transaction under the spool's write turn (relay.spool.lock),
as the service writes: relay serve's adds take their turn between steps. A row the
delivery process holds (`inflight`) is left alone and named (CLAIMED). With no delivery
process running, the command holds the delivery lock (shared) while it acts, so none can
start, and an `inflight` row (left by a crash) is acted on as a queued one: "stop relay,
delete the mail that crashes it, start again" works (relay serve sent it again).
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

import click

from relay.errors import SpoolError
from relay.ops.queueadmin import open_spool, queue_id_of
from relay.spool import DB_NAME, State, all_or_nothing
from relay.spool.lock import DELIVERY_POLL, Turn, delivery_free

CLAIMED = "being delivered right now; try again in a moment"
STEP = 100  # ids per transaction of retry and delete (a few milliseconds each) ...
PAUSE = 0.002  # ... and seconds between them, in which relay serve's adds take the turn
# Ctrl-Z and a background read or write stop a process: not while it holds the turn
STOPS = {signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def _act(spool_dir: Path, ids: Iterable[str], action: str) -> int:
    """`action` on each id, STEP ids per transaction, each under the spool's write turn
    (relay.spool.lock): relay serve's adds take their turn between steps, so a retry of
    50,000 dead letters holds up a 250 for one step, not for seconds."""
    conn = open_spool(spool_dir)
    if conn is None:
        return 1
    chosen = list(dict.fromkeys(queue_id_of(i) for i in ids))  # each once
    ok = True
    with (
        closing(conn),
        closing(Turn(spool_dir, poll=DELIVERY_POLL, claims_next=True)) as turn,
        delivery_free(spool_dir) as free,
    ):
        for start in range(0, len(chosen), STEP):
            try:
                with _unstoppable(), turn.held(), all_or_nothing(conn):
                    done = [
                        (i, _act_one(conn, i, action, free is True))
                        for i in chosen[start : start + STEP]
                    ]
            except (sqlite3.Error, SpoolError) as exc:
                left = " ".join(chosen[start:])
                click.echo(
                    f"relay queue: spool {spool_dir / DB_NAME}: {exc}; not done: {left}", err=True
                )
                return 1
            for queue_id, (acted, message) in done:
                ok = ok and acted
                click.echo(f"{queue_id}: {message}", err=not acted)
            time.sleep(PAUSE)
    return 0 if ok else 1


@contextmanager
def _unstoppable() -> Iterator[None]:
    """Ctrl-Z waits until the step has committed and let go of the write turn: a command
    stopped while holding it made relay serve answer 451 to every mail, which Moodle never
    sends again, for as long as it stayed stopped (a suspended postsuper stops no smtpd)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _act_one(
    conn: sqlite3.Connection, queue_id: str, action: str, stopped: bool
) -> tuple[bool, str]:
    """One id, inside the caller's transaction: whether it was acted on, and what became of
    it for the operator (`stopped`: no delivery process holds an inflight one)."""
    row = conn.execute("SELECT state FROM messages WHERE id = ?", (queue_id,)).fetchone()
    state = None if row is None else row["state"]
    if state is None:
        return False, "no such message"
    if state == State.INFLIGHT and not stopped:
        return False, CLAIMED
    if action == "delete":
        conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,))
        conn.execute("DELETE FROM bodies WHERE id = ?", (queue_id,))
        conn.execute("DELETE FROM events WHERE queue_id = ?", (queue_id,))
        return True, "deleted"
    if state not in (State.FAILED, State.DEFERRED, State.QUEUED, State.INFLIGHT):
        return False, f"is {state}; nothing to retry"
    now = time.time()
    conn.execute(
        "UPDATE messages SET state = 'queued', due_at = ?1, updated_at = ?1 WHERE id = ?2",
        (now, queue_id),
    )
    if state == State.FAILED:  # a fresh retry.max_age: see Mail.since
        conn.execute("UPDATE messages SET retried_at = ? WHERE id = ?", (now, queue_id))
    conn.execute(
        "INSERT INTO events (queue_id, at, event, detail) VALUES (?, ?, 'retry', ?)",
        (queue_id, now, f"relay queue retry (was {state})"),
    )
    return True, "queued for delivery"


def retry(spool_dir: Path, ids: Sequence[str], *, all_failed: bool) -> int:
    """Deferred or failed messages -> queued, due now; an event records it."""
    if not ids and not all_failed:
        click.echo("relay queue retry: give queue ids or --all-failed", err=True)
        return 2
    chosen = list(ids)
    if all_failed:
        conn = open_spool(spool_dir)
        if conn is None:
            return 1
        try:
            with closing(conn):
                failed = conn.execute("SELECT id FROM messages WHERE state = 'failed'")
                chosen += [r[0] for r in failed]
        except sqlite3.Error as exc:  # a damaged file, an I/O error: no traceback
            click.echo(f"relay queue: spool {spool_dir / DB_NAME}: {exc}", err=True)
            return 1
        if not chosen:
            click.echo("no failed messages")
            return 0
    return _act(spool_dir, chosen, "retry")


def delete(spool_dir: Path, ids: Sequence[str]) -> int:
    """Remove messages and their history; they will not be delivered."""
    return _act(spool_dir, ids, "delete")
