"""Rows set aside for SES's lane (relay.spool.rows.park): claims pass them by until a claim
asks for them, and a spool of version 4 gains the column and indexes they need."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay.spool import DB_NAME, Spool, State
from relay.spool.rows import SES_LANE
from relay.spool.schema import SCHEMA_VERSION
from tests.support.capture import CaptureServer
from tests.support.relays import Start
from tests.support.spools import add_one, await_rows, rows


def row(spool: Path, queue_id: str) -> tuple[str, int, str | None]:
    found = rows(spool)[queue_id]
    return found["state"], found["attempts"], found["lane"]


async def test_a_parked_row_is_passed_by_until_a_claim_asks_for_it(
    spool: Spool, tmp_path: Path
) -> None:
    """Parked: queued again with its attempt undone and its due time kept. Claims without
    `parked` take the mail behind it; one with `parked` takes it back, attempt 1."""
    first, second, third = [await add_one(spool) for _ in range(3)]
    due = rows(tmp_path / "spool")[first]["due_at"]
    assert [first] == [m.id for m in await spool.claim(1)]
    assert 1 == await spool.park([first], SES_LANE)
    assert (State.QUEUED, 0, SES_LANE) == row(tmp_path / "spool", first)
    assert due == rows(tmp_path / "spool")[first]["due_at"]
    assert [second, third] == [m.id for m in await spool.claim(10)]
    assert [] == await spool.claim(10)
    again = await spool.claim(10, parked=2)
    assert [(first, 1)] == [(m.id, m.attempts) for m in again]
    assert (State.INFLIGHT, 1, None) == row(tmp_path / "spool", first)


async def test_a_claim_takes_parked_rows_first_then_the_rest_up_to_its_limit(
    spool: Spool,
) -> None:
    ids = [await add_one(spool) for _ in range(5)]
    assert ids[:3] == [m.id for m in await spool.claim(3)]
    assert 3 == await spool.park(ids[:3], SES_LANE)
    claimed = await spool.claim(3, parked=2)
    assert [ids[0], ids[1], ids[3]] == [m.id for m in claimed]
    assert [ids[2], ids[4]] == [m.id for m in await spool.claim(5, parked=5)]
    assert [] == await spool.claim(5, parked=5)


async def test_park_leaves_rows_that_are_no_longer_in_flight(spool: Spool, tmp_path: Path) -> None:
    """Only a claimed row is parked: one sent meanwhile (or never claimed) is left as it is."""
    sent, waiting = await add_one(spool), await add_one(spool)
    await spool.claim(1)
    await spool.sent(sent, rule=None, route="ses", reply="SES accepted")
    assert 0 == await spool.park([sent, waiting], SES_LANE)
    assert (State.SENT, 1, None) == row(tmp_path / "spool", sent)
    assert (State.QUEUED, 0, None) == row(tmp_path / "spool", waiting)


async def test_a_version_4_spool_gains_the_lane_and_keeps_its_waiting_mail(
    tmp_path: Path,
) -> None:
    """A spool as relay of schema 4 left it (no lane column, messages_ready over every
    waiting row) is upgraded at open: its mail is claimed as before, and can be parked."""
    directory = tmp_path / "spool"
    made = await Spool.open(directory)
    ids = [await add_one(made) for _ in range(3)]
    await made.close()
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    try:  # back to version 4, as its relay wrote it
        conn.execute("DROP INDEX messages_parked")
        conn.execute("DROP INDEX messages_ready")
        conn.execute("ALTER TABLE messages DROP COLUMN lane")
        conn.execute(
            "CREATE INDEX messages_ready ON messages (due_at, id)"
            " WHERE state IN ('queued', 'deferred')"
        )
        conn.execute("PRAGMA user_version = 4")
    finally:
        conn.close()
    spool = await Spool.open(directory)
    try:
        assert ids[:2] == [m.id for m in await spool.claim(2)]
        assert 1 == await spool.park([ids[0]], SES_LANE)
        assert [ids[2]] == [m.id for m in await spool.claim(5)]
        assert [ids[0]] == [m.id for m in await spool.claim(5, parked=1)]
    finally:
        await spool.close()
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        assert (SCHEMA_VERSION, "ok") == (
            conn.execute("PRAGMA user_version").fetchone()[0],
            conn.execute("PRAGMA integrity_check").fetchone()[0],
        )
        indexes = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    finally:
        conn.close()
    assert "lane IS NULL" in indexes["messages_ready"]
    assert "lane IS NOT NULL" in indexes["messages_parked"]


async def test_rows_a_stopped_relay_left_set_aside_are_delivered_at_the_next_start(
    tmp_path: Path, start_relay: Start, capture: CaptureServer
) -> None:
    """Rows set aside when relay stopped are claimed by the next delivery process (its lane
    is empty), here classified for the original host: sent, one attempt each."""
    spool = await Spool.open(tmp_path / "spool")
    ids = [await add_one(spool) for _ in range(3)]
    await spool.claim(3)
    assert 3 == await spool.park(ids, SES_LANE)
    await spool.close()
    upstream = {"host": "127.0.0.1", "port": capture.port, "timeout": 5}
    await start_relay(deliver=True, upstream=upstream, ses={"enabled": False})
    found = await await_rows(tmp_path / "spool", ids, {"sent"}, within=10)
    assert [1, 1, 1] == [found[q]["attempts"] for q in ids]
