"""`relay queue list/show/stats`: the spool seen from another process (retry and delete:
relay.ops.requeue).

Works while the service runs: the same SQLite file in WAL mode, short transactions;
retry and delete write under the spool's write turn (relay.spool.lock), as the service
does. Human tables by default (like `mailq`); `--json` gives one JSON object per
message per line (list) or one object (show, stats).
`list` leaves out finished rows (`sent`, `bounced`) unless `--state` asks for them.

Exit codes: 0 ok; 1 a message was not found or could not be acted on, or there
is no spool, or it cannot be read; 2 a bad argument.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import click

from relay.errors import SpoolError
from relay.spool import (
    DB_NAME,
    FINISHED,
    State,
    existing,
    open_existing,
    open_read_only,
    state_counts,
)

_COLUMNS = (
    "id",
    "state",
    "sender",
    "recipients",
    "size",
    "message_id",
    "peer",
    "received_at",
    "due_at",
    "claimed_at",
    "attempts",
    "rule",
    "route",
    "ses_message_id",
    "reply",
    "fallback_reason",
    "updated_at",
    "reports_on",  # a DSN: the mail it reports on
    "lane",  # 'ses': set aside, waiting for room in SES's lane (relay.deliver.lane)
)
_FIELDS = ", ".join(_COLUMNS)
T = TypeVar("T")
_SELECT = f"SELECT {_FIELDS} FROM messages"
# What a terminal acts on rather than shows: C0 controls but TAB (ESC starts a sequence
# that clears the screen, retitles the window, moves the cursor over the line above),
# DEL, C1 controls, and Unicode's format characters (bidi overrides reorder what follows).
_UNSHOWABLE = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000e0001\U000e0020-\U000e007f]"
)


def _safe(text: object) -> str:
    """`text` as a terminal shows it: every character it would act on written as an
    escape (\\x1b, \\u202e). Mail content (subjects, names, Message-IDs, replies) is any
    client's; `--json` escapes it already."""
    return _UNSHOWABLE.sub(lambda m: ascii(m.group())[1:-1], str(text))


def _record(row: sqlite3.Row) -> dict[str, Any]:
    record = {name: row[name] for name in _COLUMNS}
    record["recipients"] = _recipients(record["recipients"])
    return record


def _recipients(column: object) -> list[Any]:
    """The recipients column as a list; as it is stored when that is no JSON list (a
    hand edit, which the delivery process fails alone): listing it must not fail."""
    try:
        listed = json.loads(column)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return [column]
    return listed if isinstance(listed, list) else [column]


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def open_spool(spool_dir: Path) -> sqlite3.Connection | None:
    try:
        return open_existing(spool_dir)
    except SpoolError as exc:
        _cannot(spool_dir, exc)
        return None


def _cannot(spool_dir: Path, exc: SpoolError) -> None:
    """Why the spool cannot be used, on stderr."""
    hint = ""
    try:
        absent = existing(spool_dir) is None
    except SpoolError:
        absent = False  # there, but not ours to read: exc says so
    if absent and not os.environ.get("STATE_DIRECTORY"):
        hint = (  # relay.settings.load.default_spool: the unit's, not this shell's
            "; if relay.yaml has no `spool:`, relay serve under systemd or in the"
            " container spools in $STATE_DIRECTORY (/var/lib/relay): set `spool:`"
        )
    click.echo(f"relay queue: {exc}{hint}", err=True)


def _open_to_read(spool_dir: Path) -> sqlite3.Connection | None:
    """`open_spool`, or, when SQLite cannot open the spool to write (a full disk: WAL's
    files cannot be made; a file system remounted read-only), the spool read-only, which is
    when an admin most needs to see the queue; stderr says so."""
    try:
        return open_existing(spool_dir)
    except SpoolError as exc:
        if exc.__cause__ is None:  # absent, or another schema: nothing to read
            _cannot(spool_dir, exc)
            return None
        try:
            conn = open_read_only(spool_dir)
        except SpoolError as again:
            click.echo(f"relay queue: {exc}; {again}", err=True)
            return None
        click.echo(f"relay queue: {exc}; read-only, as it is", err=True)
        return conn


def _read(spool_dir: Path, query: Callable[[sqlite3.Connection], T]) -> T | None:
    """`query` on the spool; None, and why on stderr, when the spool cannot be read."""
    conn = _open_to_read(spool_dir)
    if conn is None:
        return None
    # A hand edit that is no UTF-8 (which the delivery process fails alone) is shown with
    # U+FFFD for what cannot be read: reading it stopped the listing for every row.
    conn.text_factory = lambda data: data.decode("utf-8", "replace")
    try:
        with closing(conn):
            return query(conn)
    except sqlite3.Error as exc:  # a damaged file, an I/O error: no traceback
        click.echo(f"relay queue: spool {spool_dir / DB_NAME}: {exc}", err=True)
        return None


def list_messages(spool_dir: Path, *, state: str | None, as_json: bool) -> int:
    """List messages (not `sent` or `bounced` ones unless asked), oldest first."""
    if state is not None and state not in {s.value for s in State}:
        click.echo(
            f"relay queue list: unknown state {state!r}; one of "
            f"{', '.join(s.value for s in State)}",
            err=True,
        )
        return 2
    finished = f"state NOT IN ({', '.join('?' * len(FINISHED))})"
    where, args = ("state = ?", (state,)) if state else (finished, FINISHED)

    def echo_each(conn: sqlite3.Connection) -> int:
        """The rows ECHO_EVERY at a time, each batch read whole before it is written: a
        backlog of a million rows is no list in memory, and a pager left open holds no
        read snapshot (which kept the WAL from being checkpointed: it grew without end)."""
        count, after = 0, ""
        if not as_json:
            click.echo(_HEADING)
        while batch := conn.execute(
            f"{_SELECT} WHERE ({where}) AND id > ? ORDER BY id LIMIT {ECHO_EVERY}",
            (*args, after),
        ).fetchall():
            lines = [line for row in batch for line in _listed(_record(row), as_json=as_json)]
            click.echo("\n".join(lines))
            count, after = count + len(batch), batch[-1]["id"]
        return count

    count = _read(spool_dir, echo_each)
    if count is None:
        return 1
    if not as_json:
        click.echo(f"-- {count} message{'s' if count != 1 else ''}")
    return 0


_HEADING = (
    f"{'ID':<12}  {'STATE':<8}  {'SIZE':>8}  {'ARRIVED':<19}  {'TRIES':>5}  SENDER -> RECIPIENTS"
)
ECHO_EVERY = 1000  # rows of `relay queue list` read, then written, at a time


def _listed(r: dict[str, Any], *, as_json: bool) -> list[str]:
    """One row's lines in `relay queue list`: its JSON, or its line of the table (and its
    last reply, when deferred or failed)."""
    if as_json:
        return [json.dumps(r)]
    sender, recipients = _safe(r["sender"] or "<>"), _safe(", ".join(r["recipients"]))
    lines = [
        f"{r['id']:<12}  {r['state']:<8}  {r['size']:>8}  {_when(r['received_at'])}  "
        f"{r['attempts']:>5}  {sender} -> {recipients}"
    ]
    if r["state"] in (State.DEFERRED, State.FAILED) and r["reply"]:
        lines.append(f"{'':14}({_safe(r['reply'])})")
    return lines


def queue_id_of(text: str) -> str:
    """An id as an operator may paste it: relay's ids are upper case (relay.spool.rows)."""
    return text.strip().upper()


def show(spool_dir: Path, queue_id: str, *, as_json: bool) -> int:
    """One message: every stored field, its headers and its full history."""
    queue_id = queue_id_of(queue_id)

    def query(conn: sqlite3.Connection) -> tuple[sqlite3.Row | None, list[Any], list[Any]]:
        row = conn.execute(
            f"SELECT {_FIELDS}, trace, body FROM messages LEFT JOIN bodies USING (id) WHERE id = ?",
            (queue_id,),
        ).fetchone()
        events = conn.execute(
            "SELECT at, event, detail FROM events WHERE queue_id = ? ORDER BY at, rowid",
            (queue_id,),
        ).fetchall()
        notices = conn.execute(
            "SELECT id FROM messages WHERE reports_on = ? ORDER BY id", (queue_id,)
        ).fetchall()
        return row, events, notices

    found = _read(spool_dir, query)
    if found is None:
        return 1
    row, events, notices = found
    if row is None:
        click.echo(f"relay queue show: no message {queue_id}", err=True)
        return 1
    record = _record(row)
    record["trace"] = bytes(row["trace"]).decode("ascii", "replace")
    body = row["body"]
    record["headers"] = None if body is None else _headers(bytes(body))
    record["events"] = [{"at": e["at"], "event": e["event"], "detail": e["detail"]} for e in events]
    record["dsns"] = [n["id"] for n in notices]  # DSNs sent about this mail
    if as_json:
        click.echo(json.dumps(record))
        return 0
    for name in _COLUMNS:
        value = record[name]
        if name.endswith("_at") and value is not None:
            value = f"{_when(value)} ({value:.3f})"
        elif name == "recipients":
            value = ", ".join(value)
        elif name == "sender":
            value = value or "<>"  # the null sender (a DSN)
        click.echo(f"{name + ':':<17}{'-' if value is None else _safe(value)}")
    click.echo(f"{'dsns:':<17}{', '.join(record['dsns']) or '-'}")
    click.echo("trace:\n  " + _lines(record["trace"]))
    if record["headers"] is None:
        click.echo("headers: (body dropped after delivery)")
    else:
        click.echo("headers:\n  " + _lines(record["headers"]))
    click.echo("history:")
    for e in record["events"]:
        click.echo(f"  {_when(e['at'])}  {e['event']:<10} {_safe(e['detail'])}")
    return 0


def _lines(block: str) -> str:
    """A header block, one line of it to a line (indented), each line `_safe`."""
    return "\n  ".join(_safe(line) for line in block.rstrip().split("\r\n"))


def _headers(body: bytes) -> str:
    end = body.find(b"\r\n\r\n")
    return body[: end + 2 if end >= 0 else len(body)].decode("utf-8", "replace")


def stats(spool_dir: Path, *, as_json: bool) -> int:
    """Counts by state, bytes of bodies held, age of the oldest message waiting."""

    def query(conn: sqlite3.Connection) -> tuple[dict[str, int], int, float | None]:
        held, oldest = conn.execute(
            "SELECT coalesce(sum(size), 0), min(CASE WHEN state IN ('queued', 'deferred',"
            " 'inflight') THEN received_at END) FROM messages JOIN bodies USING (id)"
        ).fetchone()
        return state_counts(conn), held, oldest

    found = _read(spool_dir, query)
    if found is None:
        return 1
    counts, held, oldest = found
    age = None if oldest is None else max(0.0, time.time() - oldest)
    result = {
        "counts": counts,
        "total": sum(counts.values()),
        "bytes": held,
        "oldest_queued_age": age,
    }
    if as_json:
        click.echo(json.dumps(result))
        return 0
    for state, count in counts.items():
        click.echo(f"{state:<9}{count:>9}")
    click.echo(f"{'total':<9}{result['total']:>9}")
    click.echo(f"bytes held: {held}")
    click.echo(f"oldest waiting: {'-' if age is None else _age(age)}")
    return 0
