"""SES events on spool rows: the transaction that applies one, and the rates they add up to.

    relay.deliver.feedback -> Spool.feedback(key, ses_message_id, ...) -> apply():
      row by ses_message_id (none: UNKNOWN) -> key already in `feedback` (DUPLICATE)
      -> history line + `feedback` row (+ the DSN a bounce or a Reject asks for)
      -> every recipient bounced for good, over all its events: sent -> bounced -> APPLIED

All in one transaction, committed before the SQS message is deleted: an event
delivered again after a crash finds its key and changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from relay.mail import Mail
from relay.spool.rows import Notice, add_event, add_notice

# The DSN about an event, given its mail, the recipients (lowercase) that earlier events
# said failed (a DSN went for those already) and those they said were delivered (no
# "still trying" for those: SQS does not keep the events in order).
NoticeFor = Callable[[Mail, frozenset[str], frozenset[str]], Notice | None]


FAILED = "failed"  # a mark: an event said this recipient will never get the mail
DELIVERED = "delivered"  # a mark: an event said this recipient got it


class Applied(StrEnum):
    APPLIED = "applied"
    UNKNOWN = "unknown_message_id"  # not a mail of this spool (another sender, or purged)
    DUPLICATE = "duplicate"  # applied before (SQS delivers at least once)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reputation:
    """Relay's own SES sends since a time, and the bounces and complaints about them."""

    sends: int
    bounces: int  # permanent
    complaints: int

    @property
    def bounce_rate(self) -> float:
        return self.bounces / self.sends if self.sends else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.sends if self.sends else 0.0


def apply(
    conn: sqlite3.Connection,
    *,
    key: str,
    ses_message_id: str,
    event: str,
    detail: str,
    kind: str,
    failed: Sequence[str] = (),
    delivered: Sequence[str] = (),
    notice_for: NoticeFor | None,
    now: float,
) -> Applied:
    """Record one SES event on its mail's row, once; `notice_for` may add a DSN.
    `failed`: the recipients it says will never get the mail (a bounce, a Reject);
    once that covers all of the row's recipients, the row is `bounced`. `delivered`: those
    it says got the mail (a Delivery). An address the row does not have counts for nothing
    (the event's `detail` keeps it in the history)."""
    row = conn.execute(
        "SELECT id, sender, recipients, received_at, message_id, reports_on, trace"
        " FROM messages WHERE ses_message_id = ? ORDER BY received_at LIMIT 1",
        (ses_message_id,),
    ).fetchone()
    if row is None:
        return Applied.UNKNOWN
    queue_id = row[0]
    inserted = conn.execute(
        "INSERT OR IGNORE INTO feedback (key, queue_id, at, kind) VALUES (?, ?, ?, ?)",
        (key, queue_id, now, kind),
    ).rowcount
    if not inserted:
        return Applied.DUPLICATE
    add_event(conn, queue_id, event, detail, now)
    recipients = json.loads(row[2])
    already = _marked(conn, FAILED, queue_id, recipients)  # before this event's marks
    got = _marked(conn, DELIVERED, queue_id, recipients)
    ours = {recipient.lower() for recipient in recipients}
    failed = [address for address in failed if address.lower() in ours]  # others: history
    if failed:
        _bounce_if_all(conn, queue_id, failed, recipients, already, now)
    _mark(conn, DELIVERED, queue_id, [a for a in delivered if a.lower() in ours], now)
    if notice_for is not None:
        body = conn.execute("SELECT body FROM bodies WHERE id = ?", (queue_id,)).fetchone()
        mail = Mail(
            id=queue_id,
            sender=row[1],
            recipients=tuple(recipients),
            raw=bytes(body[0]) if body else b"",
            received_at=row[3],
            message_id=row[4] or "",
            reports_on=row[5] or "",
            trace=bytes(row[6]),
        )
        notice = notice_for(mail, already, got)
        if notice is not None:
            add_notice(conn, queue_id, notice, now)
    return Applied.APPLIED


def _bounce_if_all(
    conn: sqlite3.Connection,
    queue_id: str,
    failed: Sequence[str],
    recipients: list[str],
    already: frozenset[str],
    now: float,
) -> None:
    """Mark `failed` on the row, and move it `sent` -> `bounced` once the marks of all its
    events (`already`, those of earlier ones) cover every recipient.

    A mark is a `feedback` row of kind "failed" keyed by the address (without case: SES
    may report one as the receiving host spells it), so no column was added for it (the
    marks came before schema 4's `retried_at`, which they do not need).
    """
    _mark(conn, FAILED, queue_id, failed, now)
    marked = already | {address.lower() for address in failed}
    if not {recipient.lower() for recipient in recipients} <= marked:
        return  # some were delivered, or have not been heard of yet: still `sent`
    moved = conn.execute(
        "UPDATE messages SET state = 'bounced', updated_at = ? WHERE id = ? AND state = 'sent'",
        (now, queue_id),
    ).rowcount
    if moved:
        add_event(conn, queue_id, "bounced", f"every recipient: {', '.join(recipients)}", now)


def _mark(
    conn: sqlite3.Connection, kind: str, queue_id: str, addresses: Sequence[str], now: float
) -> None:
    """Mark `addresses` of the row as `kind` (FAILED or DELIVERED), once each."""
    conn.executemany(
        "INSERT OR IGNORE INTO feedback (key, queue_id, at, kind) VALUES (?, ?, ?, ?)",
        [(_mark_key(kind, queue_id, address), queue_id, now, kind) for address in addresses],
    )


def _marked(
    conn: sqlite3.Connection, kind: str, queue_id: str, recipients: list[str]
) -> frozenset[str]:
    """The recipients (lowercase) earlier events of the row marked `kind`."""
    if not recipients:
        return frozenset()
    prefix = _mark_key(kind, queue_id, "")
    wanted = [_mark_key(kind, queue_id, r) for r in recipients]
    marks = ", ".join("?" * len(wanted))
    found = conn.execute(f"SELECT key FROM feedback WHERE key IN ({marks})", wanted)
    return frozenset(key[len(prefix) :] for (key,) in found)


def _mark_key(kind: str, queue_id: str, address: str) -> str:
    return f"{kind}/{queue_id}/{address.lower()}"


def reputation(conn: sqlite3.Connection, since: float) -> Reputation:
    """SES sends recorded since `since`, and the permanent bounces and complaints about them."""
    sends = conn.execute(
        "SELECT count(*) FROM messages WHERE route = 'ses' AND ses_message_id IS NOT NULL"
        " AND updated_at >= ?",
        (since,),
    ).fetchone()[0]
    kinds = dict(
        conn.execute(
            "SELECT kind, count(*) FROM feedback WHERE at >= ? GROUP BY kind", (since,)
        ).fetchall()
    )
    return Reputation(
        sends=sends, bounces=kinds.get("bounce", 0), complaints=kinds.get("complaint", 0)
    )
