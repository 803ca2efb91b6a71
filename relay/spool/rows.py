"""What a spool row is: its states, its queue id, the events of its history, and the SQL
of each step (the state machine is drawn in `relay.spool.store`, which runs these in
transactions: every function here takes the connection inside one).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from relay.mail import Mail

log = logging.getLogger("relay.spool")


class State(StrEnum):
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
    SENT = "sent"
    BOUNCED = "bounced"  # sent, then SES reported every recipient bounced for good
    FAILED = "failed"


# A waiting row's `lane` (rows.park): classified for SES while SES's lane was full.
SES_LANE = "ses"

# Done with: kept for `retention` (purge_sent), left out of `relay queue list` by default.
FINISHED = (State.SENT, State.BOUNCED)


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


def insert_mail(
    conn: sqlite3.Connection,
    *,
    queue_id: str,
    sender: str,
    recipients: str,
    raw: bytes,
    peer: str,
    trace: bytes,
    message_id: str,
    detail: str,
    now: float,
) -> None:
    """A received mail, queued and due now: its row, its body, its "received" event.
    `recipients`: the JSON list."""
    conn.execute(
        "INSERT INTO messages (id, state, sender, recipients, size, message_id, peer,"
        " received_at, due_at, updated_at, trace)"
        " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (queue_id, sender, recipients, len(raw), message_id, peer, now, now, now, trace),
    )
    conn.execute("INSERT INTO bodies (id, body) VALUES (?, ?)", (queue_id, raw))
    add_event(conn, queue_id, "received", detail, now)


# The due rows of one index (the planner would sort the whole queue instead), oldest first.
_DUE = {
    "messages_ready": "lane IS NULL",
    "messages_parked": "lane IS NOT NULL",
}


def claim_due(conn: sqlite3.Connection, limit: int, now: float, *, parked: int = 0) -> list[Mail]:
    """Up to `limit` due queued or deferred rows -> inflight (attempts + 1), as Mails in
    queue id order: first up to `parked` of those set aside for SES's lane (`park`), then
    those not set aside."""
    rows = _claim(conn, "messages_parked", min(parked, limit), now) if parked > 0 else []
    rows += _claim(conn, "messages_ready", limit - len(rows), now)
    bodies = _bodies(conn, [r[0] for r in rows])
    mails, unreadable = [], {}
    for r in rows:
        if r[0] not in bodies:
            unreadable[r[0]] = "no body in the spool: nothing to send"
            continue
        try:
            mails.append(_mail(r, bodies[r[0]]))
        except (ValueError, TypeError) as exc:  # json's errors are ValueErrors
            unreadable[r[0]] = f"unreadable row in the spool ({exc})"
    if unreadable:
        _fail_unreadable(conn, unreadable, now)
    return sorted(mails, key=lambda m: m.id)


def _claim(conn: sqlite3.Connection, index: str, limit: int, now: float) -> list[Any]:
    if limit <= 0:
        return []
    rows: list[Any] = conn.execute(
        "UPDATE messages SET state = 'inflight', claimed_at = ?1, updated_at = ?1,"
        f" attempts = attempts + 1, lane = NULL WHERE id IN (SELECT id FROM messages"
        f" INDEXED BY {index} WHERE state IN ('queued', 'deferred') AND {_DUE[index]}"
        " AND due_at <= ?1 ORDER BY due_at, id LIMIT ?2)"
        # Text as bytes, decoded per row in _mail: a hand edit that is no UTF-8 raised
        # out of fetchall() for the whole claim, every claim.
        " RETURNING id, CAST(sender AS BLOB), CAST(recipients AS BLOB), received_at,"
        " attempts, CAST(peer AS BLOB), trace, CAST(message_id AS BLOB),"
        " CAST(reports_on AS BLOB), retried_at, CAST(fallback_reason AS BLOB)",
        (now, limit),
    ).fetchall()
    return rows


def park(conn: sqlite3.Connection, ids: Sequence[str], lane: str, now: float) -> int:
    """Claimed rows back to `queued`, set aside for `lane` and their claim undone
    (attempts - 1, due_at kept): claims pass them by until the lane has room
    (`claim_due(parked=...)`). Returns how many were parked."""
    marks = ", ".join("?" * len(ids))
    done = conn.execute(
        "UPDATE messages SET state = 'queued', lane = ?, attempts = max(attempts - 1, 0),"
        f" updated_at = ? WHERE state = 'inflight' AND id IN ({marks})",
        (lane, now, *ids),
    )
    return done.rowcount


def _mail(r: Sequence[Any], body: object) -> Mail:
    """A claimed row as a Mail; ValueError or TypeError when a column is not what relay
    writes (a hand edit: recipients not a JSON list of addresses, a trace stored as text)."""
    listed = _text(r[2], "recipients")
    recipients = json.loads(listed)
    if not isinstance(recipients, list) or not all(isinstance(a, str) for a in recipients):
        raise ValueError(f"recipients {listed[:200]!r} is not a JSON list of addresses")
    return Mail(
        id=r[0],
        sender=_text(r[1], "sender"),
        recipients=tuple(recipients),
        raw=_blob(body, "body"),
        received_at=r[3],
        attempts=r[4],
        peer=_text(r[5], "peer"),
        trace=_blob(r[6], "trace"),
        message_id=_text(r[7], "message_id"),
        reports_on=_text(r[8], "reports_on"),
        retried_at=r[9],
        fallback_reason=_text(r[10], "fallback_reason"),
    )


def _text(value: object, column: str) -> str:
    """A text column read as bytes (NULL: ""); ValueError when it is no UTF-8."""
    if value is None:
        return ""
    try:
        return _blob(value, column).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{column} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _blob(value: object, column: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{column} is {type(value).__name__}, not a blob")
    return bytes(value)


def _fail_unreadable(conn: sqlite3.Connection, problems: dict[str, str], now: float) -> None:
    """Rows relay cannot read (relay never writes one so: a hand-edited or damaged spool)
    fail, each saying why, with no DSN: one such row must not stop every delivery, which
    it did at every claim (the delivery process died, was restarted and claimed it first
    again). `relay queue show ID` says why; mended, `relay queue retry ID` sends it."""
    for queue_id, reply in problems.items():
        log.error(
            "event=spool_row_unreadable id=%s reply=%r (failed: the spool was altered)",
            queue_id,
            reply,
        )
        finish(
            conn,
            queue_id,
            State.FAILED,
            reply,
            {"reply": reply},
            drop_body=False,
            notice=None,
            now=now,
        )


def _bodies(conn: sqlite3.Connection, ids: list[str]) -> dict[str, object]:
    """The bodies of `ids`, by id, as stored (`_blob` checks them)."""
    marks = ", ".join("?" * len(ids))
    sql = f"SELECT id, body FROM bodies WHERE id IN ({marks})"
    return dict(conn.execute(sql, ids).fetchall())


def finish(
    conn: sqlite3.Connection,
    queue_id: str,
    state: State,
    detail: str,
    fields: dict[str, Any],
    *,
    drop_body: bool,
    notice: Notice | None,
    now: float,
) -> bool:
    """An outcome: the row to `state` with `fields` set, an event, the body dropped (sent),
    `notice` queued beside it. False, and nothing written, when the row is gone."""
    columns = ", ".join(f"{name} = ?" for name in fields)
    cursor = conn.execute(
        f"UPDATE messages SET state = ?, updated_at = ?, {columns} WHERE id = ?",
        (state.value, now, *fields.values(), queue_id),
    )
    if not cursor.rowcount:
        return False
    if state is not State.DEFERRED or not _deferred_again(conn, queue_id, detail, now):
        add_event(conn, queue_id, state.value, detail, now)
    if drop_body:
        conn.execute("DELETE FROM bodies WHERE id = ?", (queue_id,))
    if notice is not None:
        add_notice(conn, queue_id, notice, now)
    return True


_AGAIN = re.compile(r" \(tries with this reply: (\d+)\)$")


def _deferred_again(conn: sqlite3.Connection, queue_id: str, detail: str, now: float) -> bool:
    """A deferral with the reply of the row's last two events, both deferrals too, updates
    the last (its time, its detail, a count) instead of adding one: a week's outage added
    one history line per try, 124 for each mail over retry.max_age (23 KB a 4 KB mail, the
    spool six times its mail), which Postfix's defer log keeps as one line per recipient.
    The history keeps the first try with that reply, and the last with how many."""
    last = conn.execute(
        "SELECT rowid, event, detail FROM events WHERE queue_id = ? ORDER BY at DESC, rowid DESC"
        " LIMIT 2",
        (queue_id,),
    ).fetchall()
    if len(last) < 2 or any(event != State.DEFERRED for _, event, _ in last):
        return False
    (rowid, _, newest), (_, _, before) = last
    count = _AGAIN.search(newest)
    if not _same_try(before, detail) or not _same_try(_AGAIN.sub("", newest), detail):
        return False
    tries = int(count.group(1)) + 1 if count else 3
    conn.execute(
        "UPDATE events SET at = ?, detail = ? WHERE rowid = ?",
        (now, f"{detail} (tries with this reply: {tries})", rowid),
    )
    return True


def _same_try(one: str, other: str) -> bool:
    """Two deferral details alike but for their "due in": the same route and reply."""
    route, _, rest = one.partition(" due in ")
    route_, _, rest_ = other.partition(" due in ")
    return route == route_ and rest.partition(" reply=")[2] == rest_.partition(" reply=")[2]


def purge_sent(conn: sqlite3.Connection, cutoff: float, limit: int) -> tuple[int, int]:
    """Delete up to `limit` sent and bounced rows (and their events) whose outcome came
    before `cutoff`, and up to `limit` SES feedback keys as old; return (rows, keys). A
    bounded transaction: relay serve's adds wait for the spool's write lock meanwhile."""
    done = f"state IN ({', '.join('?' * len(FINISHED))}) AND updated_at < ?"
    found = conn.execute(
        f"SELECT id FROM messages WHERE {done} LIMIT ?", (*FINISHED, cutoff, limit)
    )
    ids = [queue_id for (queue_id,) in found]
    _drop(conn, ids)  # no bodies: sent() dropped them
    keys = "SELECT rowid FROM feedback WHERE at < ? LIMIT ?"
    dropped: int = conn.execute(
        f"DELETE FROM feedback WHERE rowid IN ({keys})", (cutoff, limit)
    ).rowcount
    return len(ids), dropped


def purge_failed(conn: sqlite3.Connection, cutoff: float, limit: int) -> int:
    """Delete up to `limit` failed rows (dead letters: body, history) that failed before
    `cutoff`; return how many. Their DSNs are rows of their own, and stay."""
    found = conn.execute(
        "SELECT id FROM messages WHERE state = 'failed' AND updated_at < ? LIMIT ?",
        (cutoff, limit),
    )
    ids = [queue_id for (queue_id,) in found]
    _drop(conn, ids)
    return len(ids)


def _drop(conn: sqlite3.Connection, ids: list[str]) -> None:
    """Rows `ids` gone for good: their history, body and row."""
    marks = ", ".join("?" * len(ids))
    conn.execute(f"DELETE FROM events WHERE queue_id IN ({marks})", ids)
    conn.execute(f"DELETE FROM bodies WHERE id IN ({marks})", ids)
    conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)


def oldest_waiting(conn: sqlite3.Connection) -> float | None:
    """When the oldest queued, deferred or in-flight row arrived (None: there is none)."""
    row = conn.execute(
        "SELECT min(received_at) FROM messages WHERE state IN ('queued', 'deferred', 'inflight')"
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


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
        " received_at, due_at, updated_at, trace, retried_at)"
        " SELECT ?1, 'queued', sender, ?2, size, message_id, peer, received_at, ?3, ?3, trace,"
        " retried_at"
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
    if moved := queued_now(conn, now):  # the clock went back while relay was stopped
        log.warning("event=clock_stepped_back count=%d (waiting mail made due as meant)", moved)
    return len(ids)


def queued_now(conn: sqlite3.Connection, now: float) -> int:
    """Rows written at a time later than `now` (the wall clock went back since: a VM
    resumed, a clock stepped at boot) made due as they were meant to be; returns how many.
    A queued row is due when it is written: due now. A deferred row waits what its step
    said from now, not the step plus the clock's jump (a day ahead, set right at boot,
    made a 60 s retry a day's), and a mail dated in the future is dated now (its age read
    0 until the clock caught up, so the oldest-mail alert could not fire)."""
    queued = conn.execute(
        "UPDATE messages SET due_at = ?1, received_at = min(received_at, ?1)"
        " WHERE state = 'queued' AND due_at > ?1",
        (now,),
    ).rowcount
    deferred = conn.execute(
        "UPDATE messages SET due_at = max(?1, due_at - (updated_at - ?1)), updated_at = ?1,"
        " received_at = min(received_at, ?1) WHERE state = 'deferred' AND updated_at > ?1",
        (now,),
    ).rowcount
    return queued + deferred


def state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys((s.value for s in State), 0)
    for state, count in conn.execute("SELECT state, count(*) FROM messages GROUP BY state"):
        counts[state] = count
    return counts
