"""What a spool row is: its states, its queue id, and the events of its history
(the state machine is drawn in `relay.spool.store`)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum


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
        # The random bits only keep two processes apart within a millisecond: a generator
        # seeded from os.urandom (reseeded in a forked child), not a system call per id.
        self._random = random.Random()
        os.register_at_fork(after_in_child=self._random.seed)

    def __call__(self) -> str:
        with self._lock:
            fresh = (time.time_ns() // 1_000_000) << 18 | self._random.getrandbits(16)
            self._last = value = max(fresh, self._last + 1)
        return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(55, -1, -5))


new_id = IdMaker()


def add_event(conn: sqlite3.Connection, queue_id: str, event: str, detail: str, at: float) -> None:
    conn.execute(
        "INSERT INTO events (queue_id, at, event, detail) VALUES (?, ?, ?, ?)",
        (queue_id, at, event, detail),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """A delivery status notification to queue beside an outcome, in the same transaction:
    from the null sender `<>` to `recipient`, about the row being recorded."""

    id: str
    recipient: str
    raw: bytes
    trace: bytes
    message_id: str
    summary: str  # for both histories, e.g. "failed: a@example.org"
    kind: str = "failed"  # or "delayed": a warning, queued once per mail at most


def add_notice(conn: sqlite3.Connection, about: str, notice: Notice, now: float) -> None:
    """Queue `notice` as a mail of its own (null sender) that reports on row `about`."""
    event = "dsn" if notice.kind == "failed" else f"dsn_{notice.kind}"
    if (
        notice.kind != "failed"
        and conn.execute(
            "SELECT 1 FROM events WHERE queue_id = ? AND event = ?", (about, event)
        ).fetchone()
    ):
        return  # warned already
    conn.execute(
        "INSERT INTO messages (id, state, sender, recipients, size, message_id, peer,"
        " received_at, due_at, updated_at, trace, reports_on)"
        " VALUES (?, 'queued', '', ?, ?, ?, 'relay', ?, ?, ?, ?, ?)",
        (
            notice.id,
            json.dumps([notice.recipient]),
            len(notice.raw),
            notice.message_id,
            now,
            now,
            now,
            notice.trace,
            about,
        ),
    )
    conn.execute("INSERT INTO bodies (id, body) VALUES (?, ?)", (notice.id, notice.raw))
    add_event(conn, notice.id, "received", f"delivery status notification about {about}", now)
    add_event(conn, about, event, f"{notice.id} to <{notice.recipient}> ({notice.summary})", now)


def split_off(
    conn: sqlite3.Connection,
    queue_id: str,
    child: str,
    recipients: list[str],
    reason: str,
    now: float,
) -> bool:
    """Move `recipients` of row `queue_id` to a new queued row `child` (same envelope
    sender, bytes and arrival), so each part has one route and one fate. False if the
    row is gone."""
    row = conn.execute("SELECT recipients FROM messages WHERE id = ?", (queue_id,)).fetchone()
    if row is None:
        return False
    rest = [r for r in json.loads(row[0]) if r not in recipients]
    conn.execute(
        "INSERT INTO messages (id, state, sender, recipients, size, message_id, peer,"
        " received_at, due_at, updated_at, trace)"
        " SELECT ?1, 'queued', sender, ?2, size, message_id, peer, received_at, ?3, ?3, trace"
        " FROM messages WHERE id = ?4",
        (child, json.dumps(recipients), now, queue_id),
    )
    conn.execute(
        "INSERT INTO bodies (id, body) SELECT ?, body FROM bodies WHERE id = ?", (child, queue_id)
    )
    conn.execute(
        "UPDATE messages SET recipients = ?, updated_at = ? WHERE id = ?",
        (json.dumps(rest), now, queue_id),
    )
    rcpts = ", ".join(recipients)
    add_event(conn, queue_id, "split", f"{rcpts} -> {child}: {reason}", now)
    add_event(conn, child, "received", f"split from {queue_id} for {rcpts}: {reason}", now)
    return True


def reclaim_inflight(conn: sqlite3.Connection) -> int:
    now = time.time()
    ids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE state = 'inflight'")]
    for qid in ids:
        conn.execute(
            "UPDATE messages SET state = 'queued', due_at = ?1, updated_at = ?1 WHERE id = ?2",
            (now, qid),
        )
        add_event(conn, qid, "reclaimed", "was inflight when the service stopped", now)
    return len(ids)


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys((s.value for s in State), 0)
    for state, count in conn.execute("SELECT state, count(*) FROM messages GROUP BY state"):
        counts[state] = count
    return counts
