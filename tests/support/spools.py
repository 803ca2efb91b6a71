"""The spool seen from outside the service, as `relay queue` sees it: its rows, waiting
for them to settle, and a spool file of an older schema to upgrade.

- `rows(spool)`: every row by queue id, with its events;
- `wait_rows(spool, ids)` / `await_rows(...)`: those rows once all are sent or failed
  (or in the given states), blocking or from a test whose event loop runs the relay;
- `make_spool(directory, version, rows)`: a spool file as relay of schema 1 left it;
- the `spool` fixture: an open spool in tmp_path/spool, closed at teardown.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from relay.spool import DB_NAME, Spool, open_existing

DONE = frozenset({"sent", "failed"})
TRACE = b"Received: from test (127.0.0.1)\r\n\tby relay.test (relay) with ESMTP id X;\r\n\tnow\r\n"


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    """An open spool in tmp_path/spool, closed at teardown."""
    opened = await Spool.open(tmp_path / "spool")
    yield opened
    await opened.close()


async def add_one(spool: Spool, message_id: str = "<1@b.example>") -> str:
    """One small mail (a@b.example to c@d.example) added to `spool`; its queue id."""
    return await spool.add(
        sender="a@b.example",
        recipients=["c@d.example"],
        raw=b"x\r\n",
        peer="",
        trace=TRACE,
        message_id=message_id,
    )


def rows(spool: Path) -> dict[str, dict[str, Any]]:
    """Every spool row by queue id (body left out), with its events as (event, detail)."""
    with closing(open_existing(spool)) as conn:
        found = {r["id"]: {**r, "events": []} for r in conn.execute("SELECT * FROM messages")}
        for queue_id, event, detail in conn.execute(
            "SELECT queue_id, event, detail FROM events ORDER BY at, rowid"
        ):
            if queue_id in found:
                found[queue_id]["events"].append((event, detail))
    for row in found.values():
        row["recipients"] = tuple(json.loads(row["recipients"]))
        row["trace"] = bytes(row["trace"])
    return found


def _settled(
    spool: Path, ids: Iterable[str], states: Collection[str]
) -> dict[str, dict[str, Any]] | None:
    found = rows(spool)
    chosen = {queue_id: found.get(queue_id) for queue_id in ids}
    if all(row is not None and row["state"] in states for row in chosen.values()):
        return {k: v for k, v in chosen.items() if v is not None}
    return None


def _timeout(spool: Path, ids: Iterable[str], states: Collection[str]) -> AssertionError:
    found = rows(spool)
    late = {q: (found[q]["state"], found[q]["reply"]) if q in found else None for q in ids}
    return AssertionError(f"rows not {sorted(states)} in time: {late}")


def wait_rows(
    spool: Path, ids: Iterable[str], states: Collection[str] = DONE, *, timeout: float = 20.0
) -> dict[str, dict[str, Any]]:
    """The rows of `ids` once all are in one of `states`; AssertionError at the deadline."""
    ids = list(ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _settled(spool, ids, states)
        if done is not None:
            return done
        time.sleep(0.05)
    raise _timeout(spool, ids, states)


async def await_rows(
    spool: Path, ids: Iterable[str], states: Collection[str] = DONE, *, within: float = 20.0
) -> dict[str, dict[str, Any]]:
    """`wait_rows` for a test whose event loop runs the relay (`within` seconds)."""
    ids = list(ids)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done = _settled(spool, ids, states)
        if done is not None:
            return done
        await asyncio.sleep(0.05)
    raise _timeout(spool, ids, states)


# The schema of version 1 (bodies inline in messages), as relay wrote it: a fixture.
SCHEMA_V1 = """
CREATE TABLE messages (
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
CREATE INDEX messages_due ON messages (state, due_at);
CREATE TABLE events (
    queue_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_queue_id ON events (queue_id, at);
CREATE INDEX messages_ready ON messages (due_at, id) WHERE state IN ('queued', 'deferred');
"""


def make_spool(directory: Path, version: int, rows: dict[str, tuple[str, bytes | None]]) -> None:
    """A spool file as relay of schema 1 left it, with {id: (state, body)} rows, labelled
    `version`."""
    directory.mkdir(parents=True)
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.executescript(SCHEMA_V1)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("PRAGMA journal_mode = WAL")
        past = time.time() - 60
        for n, (qid, (state, body)) in enumerate(rows.items()):
            conn.execute(
                "INSERT INTO messages (id, state, sender, recipients, size, message_id,"
                " received_at, due_at, updated_at, trace, body)"
                " VALUES (?, ?, 'noreply@moodle.test', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    qid,
                    state,
                    f'["user{n}@example.org"]',
                    len(body or b""),
                    f"<{n}@moodle.test>",
                    past,
                    past,
                    past,
                    TRACE,
                    body,
                ),
            )
            conn.execute(
                "INSERT INTO events (queue_id, at, event) VALUES (?, ?, 'received')", (qid, past)
            )
    finally:
        conn.close()
