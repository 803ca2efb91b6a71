"""The spool: states, group commit, reclaim after a crash, failed commits that store nothing,
schema upgrades."""

# STYLE.md asserts read `expected == actual`; ruff's SIM300 calls that Yoda.

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path

import pytest

from relay.errors import SpoolError
from relay.spool import DB_NAME, Spool, State, checkpoint, new_id, schema, store
from relay.spool import lock as spoollock
from relay.spool.lock import WRITE_LOCK
from relay.spool.rows import Notice
from relay.spool.schema import PAGE_SIZE, SCHEMA_VERSION
from tests.support.spools import TRACE, add_one, make_spool


def mail_bytes(n: int, size: int = 200) -> bytes:
    head = f"Message-ID: <{n}@moodle.test>\r\nSubject: mail {n}\r\n\r\n".encode()
    return head + (b"x" * max(0, size - len(head) - 2)) + b"\r\n"


async def add(spool: Spool, n: int, size: int = 200) -> str:
    return await spool.add(
        sender="noreply@moodle.test",
        recipients=[f"user{n}@example.org"],
        raw=mail_bytes(n, size),
        peer="127.0.0.1",
        trace=TRACE,
        message_id=f"<{n}@moodle.test>",
    )


def rows(directory: Path) -> dict[str, dict[str, object]]:
    """The messages table read directly, as another process would."""
    conn = sqlite3.connect(directory / DB_NAME)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM messages")}
    finally:
        conn.close()


def bodies(directory: Path) -> dict[str, bytes]:
    """The bodies table read directly: {queue id: body}."""
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        return {r[0]: bytes(r[1]) for r in conn.execute("SELECT id, body FROM bodies")}
    finally:
        conn.close()


def feedback_keys(directory: Path) -> list[str]:
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        return [r[0] for r in conn.execute("SELECT key FROM feedback")]
    finally:
        conn.close()


def events(directory: Path, queue_id: str) -> list[str]:
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        sql = "SELECT event FROM events WHERE queue_id = ? ORDER BY at, rowid"
        return [r[0] for r in conn.execute(sql, (queue_id,))]
    finally:
        conn.close()


async def test_add_then_claim_returns_the_message_as_stored(spool: Spool, tmp_path: Path) -> None:
    """A claimed message carries the exact bytes, the trace line and attempt 1."""
    qid = await add(spool, 1)
    claimed = await spool.claim(10)
    assert [qid] == [m.id for m in claimed]
    mail = claimed[0]
    assert (mail_bytes(1), TRACE, 1) == (mail.raw, mail.trace, mail.attempts)
    assert ("noreply@moodle.test", ("user1@example.org",)) == (mail.sender, mail.recipients)
    assert TRACE + mail_bytes(1) == mail.wire_bytes()
    assert State.INFLIGHT == rows(tmp_path / "spool")[qid]["state"]
    assert [] == await spool.claim(10)


async def test_a_row_without_its_body_fails_alone(spool: Spool, tmp_path: Path) -> None:
    """A queued row whose body is gone (relay never writes one so; a hand-edited or damaged
    spool) is failed with a reply saying so when claimed, and the mail beside it is
    claimed as usual: one such row must not stop delivery in a loop of crashes."""
    broken, fine = await add(spool, 1), await add(spool, 2)
    conn = sqlite3.connect(tmp_path / "spool" / DB_NAME)
    with conn:
        conn.execute("DELETE FROM bodies WHERE id = ?", (broken,))
    conn.close()
    claimed = await spool.claim(10)
    row = rows(tmp_path / "spool")[broken]
    assert [fine] == [m.id for m in claimed]
    assert (State.FAILED, "no body in the spool: nothing to send") == (row["state"], row["reply"])


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ("UPDATE messages SET recipients = 'ada@example.net' WHERE id = ?", "Expecting value"),
        ("UPDATE messages SET recipients = '\"ada@example.net\"' WHERE id = ?", "JSON list"),
        ("UPDATE messages SET recipients = '[1]' WHERE id = ?", "JSON list"),
        ("UPDATE messages SET trace = 'Received: x' WHERE id = ?", "trace is str"),
        ("UPDATE bodies SET body = 'Subject: x' WHERE id = ?", "body is str"),
        ("UPDATE messages SET peer = CAST(X'FF41' AS TEXT) WHERE id = ?", "peer is not UTF-8"),
        ("UPDATE messages SET sender = CAST(X'C3' AS TEXT) WHERE id = ?", "sender is not UTF-8"),
    ],
)
async def test_a_row_relay_cannot_read_fails_alone(
    spool: Spool, tmp_path: Path, edit: str, why: str
) -> None:
    """A row edited by hand into something relay never writes (the recipients without their
    JSON brackets, text where relay stores bytes, text that is no UTF-8: that one raised
    out of the claim's fetch before any row could be looked at) fails alone, saying why.
    It raised out of the claim: the delivery process died, was restarted, claimed the same
    row first and died again, and no mail went out at all."""
    broken, fine = await add(spool, 1), await add(spool, 2)
    conn = sqlite3.connect(tmp_path / "spool" / DB_NAME)
    with conn:
        conn.execute(edit, (broken,))
    conn.close()
    claimed = await spool.claim(10)
    with contextlib.closing(sqlite3.connect(tmp_path / "spool" / DB_NAME)) as conn:
        sql = "SELECT state, reply FROM messages WHERE id = ?"
        state, reply = conn.execute(sql, (broken,)).fetchone()
    assert [fine] == [m.id for m in claimed]
    assert State.FAILED == state
    assert reply.startswith("unreadable row in the spool (") and why in reply, reply


async def test_a_long_outage_adds_two_history_lines_per_reply_not_one_per_try(
    spool: Spool, tmp_path: Path
) -> None:
    """Ten tries refused with the same reply keep the first and the last (with the count);
    another reply starts its own two. Each try added a line: 124 for each mail over a
    week's outage, the spool six times the size of its mail."""
    qid = await add(spool, 1)
    replies = ["Connection refused"] * 10 + ["451 4.3.0 try later"] * 3
    for reply in replies:
        await spool.claim(10)
        await spool.defer(qid, due_at=time.time(), rule=None, route="upstream", reply=reply)
    with contextlib.closing(sqlite3.connect(tmp_path / "spool" / DB_NAME)) as conn:
        sql = "SELECT event, detail FROM events WHERE queue_id = ? ORDER BY at, rowid"
        found = conn.execute(sql, (qid,)).fetchall()
    assert ["received", "deferred", "deferred", "deferred", "deferred"] == [e for e, _ in found]
    assert found[2][1].endswith("reply=Connection refused (tries with this reply: 10)")
    assert found[4][1].endswith("reply=451 4.3.0 try later (tries with this reply: 3)")
    assert found[1][1].endswith("reply=Connection refused")


async def test_directory_and_database_are_private(tmp_path: Path) -> None:
    """The spool directory is created 0700 and the database file is 0600."""
    opened = await Spool.open(tmp_path / "new" / "spool")
    await opened.close()
    assert (0o700, 0o600) == (
        (tmp_path / "new" / "spool").stat().st_mode & 0o777,
        (tmp_path / "new" / "spool" / DB_NAME).stat().st_mode & 0o777,
    )


@pytest.mark.parametrize(
    ("outcome", "state", "body_kept"),
    [("sent", State.SENT, False), ("defer", State.DEFERRED, True), ("fail", State.FAILED, True)],
    ids=["sent-drops-body", "defer-keeps-body", "fail-keeps-body"],
)
async def test_outcomes_are_recorded_on_the_row(
    spool: Spool, tmp_path: Path, outcome: str, state: State, body_kept: bool
) -> None:
    """sent/defer/fail set the state, rule, route, reply; only `sent` drops the body."""
    qid = await add(spool, 1)
    await spool.claim(1)
    common = {"rule": "reengagement-cc", "route": "ses", "reply": "the reply"}
    if outcome == "sent":
        await spool.sent(qid, ses_message_id="ses-1", **common)
    elif outcome == "defer":
        await spool.defer(qid, due_at=time.time() + 60, recipients=["a@b.example"], **common)
    else:
        await spool.fail(qid, fallback_reason="rejected", **common)
    row = rows(tmp_path / "spool")[qid]
    assert (state, "reengagement-cc", "ses", "the reply") == (
        row["state"],
        row["rule"],
        row["route"],
        row["reply"],
    )
    assert body_kept == (qid in bodies(tmp_path / "spool"))
    assert ["received", state.value] == events(tmp_path / "spool", qid)


async def test_deferred_message_is_claimed_only_when_due(spool: Spool) -> None:
    """defer(due_at) hides the message until due_at; its remaining recipients are kept."""
    qid = await add(spool, 1)
    await spool.claim(1)
    await spool.defer(
        qid,
        due_at=time.time() + 0.3,
        rule=None,
        route="upstream",
        reply="451",
        recipients=["left@example.org"],
    )
    assert [] == await spool.claim(1)
    await asyncio.sleep(0.35)
    claimed = await spool.claim(1)
    assert [(qid, ("left@example.org",), 2)] == [(m.id, m.recipients, m.attempts) for m in claimed]


async def test_concurrent_adds_share_commits(spool: Spool) -> None:
    """50 concurrent adds (as from 50 SMTP sessions) take far fewer than 50 commits."""
    before = spool.commits
    ids = await asyncio.gather(*(add(spool, n) for n in range(50)))
    commits = spool.commits - before
    assert 50 == len(set(ids))
    assert commits <= 10, f"{commits} commits for 50 adds"


async def test_delivery_outcomes_of_one_loop_turn_share_a_commit(tmp_path: Path) -> None:
    """On the delivery side, the outcomes recorded in one turn of the event loop (replies
    that came in together) and a claim beside them commit as one transaction."""
    receive = await Spool.open(tmp_path / "spool")
    delivery = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        ids = [await add(receive, n) for n in range(12)]
        assert 10 == len(await delivery.claim(10))
        before = delivery.commits
        common = {"rule": None, "route": "upstream", "reply": "250 ok"}
        claimed, *_ = await asyncio.gather(
            delivery.claim(5), *(delivery.sent(qid, **common) for qid in ids[:10])
        )
        commits = delivery.commits - before
    finally:
        await delivery.close()
        await receive.close()
    assert (1, set(ids[10:])) == (commits, {m.id for m in claimed})
    states = {qid: row["state"] for qid, row in rows(tmp_path / "spool").items()}
    assert [State.SENT] * 10 + [State.INFLIGHT] * 2 == [states[qid] for qid in ids]


async def test_a_failing_delivery_call_fails_alone(tmp_path: Path) -> None:
    """One call of a delivery-side group commit that fails (here: a split to an id that
    exists) rolls back that transaction; the others are committed one by one."""
    receive = await Spool.open(tmp_path / "spool")
    delivery = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        first, second = await add(receive, 1), await add(receive, 2)
        await delivery.claim(2)
        common = {"rule": None, "route": "upstream", "reply": "250 ok"}
        results = await asyncio.gather(
            delivery.sent(first, **common),
            delivery.split(second, child=first, recipients=["x@example.org"], reason="test"),
            delivery.sent(second, **common),
            return_exceptions=True,
        )
    finally:
        await delivery.close()
        await receive.close()
    assert [None, SpoolError, None] == [r if r is None else type(r) for r in results]
    states = rows(tmp_path / "spool")
    assert (State.SENT, State.SENT) == (states[first]["state"], states[second]["state"])


async def test_add_sets_wakeup(spool: Spool) -> None:
    """The delivery loop learns of new mail from `wakeup`, without polling."""
    spool.wakeup.clear()
    await add(spool, 1)
    assert spool.wakeup.is_set()


async def test_inflight_messages_are_reclaimed_by_the_next_delivery_not_by_open(
    tmp_path: Path,
) -> None:
    """A message claimed when delivery died stays inflight across a plain open (an old
    delivery process may still be sending it) and is queued again by `reclaim()`."""
    first = await Spool.open(tmp_path / "spool")
    qid = await add(first, 1)
    await first.claim(1)
    await first.close()
    second = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        assert ([], State.INFLIGHT) == (
            await second.claim(1),
            rows(tmp_path / "spool")[qid]["state"],
        )
        assert 1 == await second.reclaim()
        assert [qid] == [m.id for m in await second.claim(1)]
    finally:
        await second.close()
    assert ["received", "reclaimed"] == events(tmp_path / "spool", qid)


async def test_mail_queued_before_the_clock_went_back_is_due_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mail accepted while the wall clock was 2 h ahead (its due time then), with delivery
    running, is claimed at once after the clock is set back; so is mail accepted then and
    found by the next delivery process. Before, it waited two hours without a try."""
    real = time.time
    ahead = [7200.0]
    monkeypatch.setattr(time, "time", lambda: real() + ahead[0])
    spool = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        assert [] == await spool.claim(10)  # delivery is running: nothing yet
        live = {await add(spool, n) for n in range(3)}
        ahead[0] = 0.0
        assert live == {m.id for m in await spool.claim(10)}
        ahead[0] = 7200.0
        found = {await add(spool, n) for n in range(3, 5)}
    finally:
        await spool.close()
    ahead[0] = 0.0
    restarted = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        await restarted.reclaim()
        # (and the three claimed before, inflight at the stop)
        assert found | live == {m.id for m in await restarted.claim(10)}
    finally:
        await restarted.close()


async def test_mail_deferred_before_the_clock_went_back_waits_its_step_not_the_jump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mail deferred 60 s while the wall clock was a day ahead (set right at the next boot,
    relay stopped meanwhile): the next delivery process finds it due 60 s after the
    deferral, not a day later, and dated no later than now. It waited the whole day, its
    age read 0 and the oldest-mail alert could not fire."""
    real = time.time
    ahead = [86400.0]
    monkeypatch.setattr(time, "time", lambda: real() + ahead[0])
    spool = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        soon, later = await add(spool, 1), await add(spool, 2)
        await spool.claim(10)
        waiting = await add(spool, 3)  # queued, never tried
        for qid, wait in ((soon, 0.0), (later, 60.0)):
            await spool.defer(
                qid, due_at=time.time() + wait, rule=None, route="upstream", reply="451 later"
            )
    finally:
        await spool.close()
    ahead[0] = 0.0
    restarted = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        await restarted.reclaim()
        claimed = [m.id for m in await restarted.claim(10)]
        found = rows(tmp_path / "spool")
    finally:
        await restarted.close()
    assert sorted([soon, waiting]) == sorted(claimed)
    assert 55 < found[later]["due_at"] - real() <= 60, found[later]["due_at"] - real()
    assert [True, True] == [found[q]["received_at"] <= real() for q in (later, waiting)]


@pytest.mark.parametrize(
    ("full_sync", "expected"), [(True, 2), (False, 1)], ids=["receive-FULL", "delivery-NORMAL"]
)
async def test_adds_commit_full_the_delivery_connection_normal(
    tmp_path: Path, full_sync: bool, expected: int
) -> None:
    """A 250 needs synchronous=FULL (2); the delivery process opens with full_sync=False,
    NORMAL (1): a lost claim or outcome only means a second delivery."""
    opened = await Spool.open(tmp_path / "spool", full_sync=full_sync)
    try:
        actual = await opened._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
    finally:
        await opened.close()
    assert expected == actual


def wal_pages(directory: Path) -> int:
    """How far the WAL file reaches, in 4 KB units (it only grows until a checkpoint
    has copied every frame and the next commit starts it again from its beginning)."""
    wal = directory / f"{DB_NAME}-wal"
    return wal.stat().st_size // 4096 if wal.exists() else 0


@pytest.mark.parametrize("full_sync", [True, False], ids=["receive", "delivery"])
async def test_commits_do_not_checkpoint(tmp_path: Path, full_sync: bool) -> None:
    """SQLite's default would checkpoint inside the commit that takes the WAL past 1,000
    pages, before that mail's 250. Both sides' commits leave it to the Checkpointer and
    only checkpoint themselves far beyond (should it be stuck)."""
    opened = await Spool.open(tmp_path / "spool", full_sync=full_sync)
    try:
        pages = await opened._call(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        )
    finally:
        await opened.close()
    assert checkpoint.SAFETY_PAGES == pages


async def wal_per_mail(directory: Path, *, size: int, mails: int) -> tuple[float, float, int]:
    """Bytes of WAL per add and per sent() of `mails` mails of `size` bytes (after five to
    get past the tables' first pages), with no checkpoint meanwhile; and the page size."""
    spool = await Spool.open(directory)
    wal = directory / f"{DB_NAME}-wal"
    try:
        for n in range(5):
            await add(spool, n, size=size)
        start = wal.stat().st_size
        for n in range(5, 5 + mails):
            await add(spool, n, size=size)
        added = wal.stat().st_size
        claimed_mails = await spool.claim(mails + 5)
        claimed = wal.stat().st_size
        for mail in claimed_mails:
            await spool.sent(mail.id, rule=None, route="upstream", reply="250 ok")
        done = wal.stat().st_size
        page_size = await spool._call(lambda conn: conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        await spool.close()
    return (added - start) / mails, (done - claimed) / (mails + 5), page_size


async def test_a_mail_puts_few_bytes_in_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each commit writes every page it changed, whole, to the WAL, and relay serve's fsync
    before the 250 writes them out. A new spool's pages are PAGE_SIZE bytes: a 4 KB mail's
    add and its sent() take 25 KiB of WAL each, against 45 and 43 with SQLite's 4,096."""
    monkeypatch.setattr(store, "SERVE_EVERY", 3600.0)  # no checkpoint: the WAL only grows
    per_add, per_sent, page_size = await wal_per_mail(tmp_path / "spool", size=4096, mails=50)
    assert PAGE_SIZE == page_size
    assert per_add < 32 * 1024, f"{per_add / 1024:.1f} KiB per add"
    assert per_sent < 32 * 1024, f"{per_sent / 1024:.1f} KiB per sent"


async def test_a_sent_mail_leaves_its_body_pages_unwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sent() deletes the body. With secure_delete on (Debian's build) SQLite zeroed each of
    a 20 KB body's ten overflow pages and wrote them to the WAL again: 40 KiB per sent()
    against 19 with secure_delete=FAST, which every connection sets."""
    monkeypatch.setattr(store, "SERVE_EVERY", 3600.0)  # no checkpoint: the WAL only grows
    _, per_sent, _ = await wal_per_mail(tmp_path / "spool", size=20_480, mails=30)
    assert per_sent < 32 * 1024, f"{per_sent / 1024:.1f} KiB per sent"
    conn = schema.connect(tmp_path / "spool" / DB_NAME)
    try:
        assert 2 == conn.execute("PRAGMA secure_delete").fetchone()[0]  # FAST
    finally:
        conn.close()


async def test_a_spool_keeps_the_page_size_it_was_made_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PAGE_SIZE is for new spools: one made with SQLite's 4,096 (by an older relay)
    opens and works as it is."""
    directory = tmp_path / "spool"
    with monkeypatch.context() as older:
        older.setattr(schema, "PAGE_SIZE", 4096)
        spool = await Spool.open(directory)
        await add(spool, 1)
        await spool.close()
    spool = await Spool.open(directory)
    try:
        qid = await add(spool, 2)
        claimed = [mail.id for mail in await spool.claim(2)]
        size = await spool._call(lambda conn: conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        await spool.close()
    assert 4096 == size
    assert qid in claimed and len(claimed) == 2


async def checkpointed_while_adding(
    tmp_path: Path, *, pause: float, mails: int, delivery: bool
) -> tuple[int, int]:
    """Add `mails` of 20 KB (about 17 pages of WAL each) through relay serve's side,
    `pause` seconds after every 15th, with or without the delivery side's spool open;
    (the pages the WAL file reached, checkpoints made by the side that should make them).
    Every mail must be in the database."""
    receive = await Spool.open(tmp_path / "spool")
    other = await Spool.open(tmp_path / "spool", full_sync=False) if delivery else None
    try:
        ids = []
        for n in range(mails):
            ids.append(await add(receive, n, size=20_000))
            if n % 15 == 0:
                await asyncio.sleep(pause)
        reached = wal_pages(tmp_path / "spool")
        made = (other or receive)._checkpointer.checkpoints
    finally:
        if other is not None:
            await other.close()
        await receive.close()
    assert set(ids) == set(bodies(tmp_path / "spool"))
    return reached, made


async def test_relay_serve_checkpoints_on_its_own(tmp_path: Path) -> None:
    """Without a delivery process (restarting, or delivery in the same process), relay
    serve's own Checkpointer keeps the WAL far under the 1,000 pages at which SQLite
    would checkpoint in a commit (2,500 pages without it): a small disk stays usable."""
    pause = checkpoint.SERVE_EVERY
    reached, made = await checkpointed_while_adding(
        tmp_path, pause=pause, mails=150, delivery=False
    )
    assert reached < 1000, f"the WAL reached {reached} pages"
    assert made >= 5


async def test_the_delivery_side_checkpoints_while_adds_go_on(tmp_path: Path) -> None:
    """With the delivery process's spool open, its Checkpointer (every EVERY seconds)
    copies the WAL while adds go on (7,500 pages in all), so the WAL starts again and
    stays small."""
    reached, made = await checkpointed_while_adding(
        tmp_path, pause=checkpoint.EVERY, mails=450, delivery=True
    )
    assert reached < 1000, f"the WAL reached {reached} pages"
    assert made >= 10


@pytest.mark.parametrize(
    "fault",
    [{"max_pages": 1}, {"read_only": True}],
    ids=["disk-full-page-limit", "read-only"],
)
async def test_failed_commit_leaves_nothing_and_recovers(
    spool: Spool, tmp_path: Path, fault: dict[str, object]
) -> None:
    """A commit that cannot happen raises SpoolError, stores nothing, and the next add
    after the cause is gone works (same writer thread, same connection)."""
    kept = await add(spool, 1)
    await spool.set_limits(**fault)  # type: ignore[arg-type]
    with pytest.raises(SpoolError):
        await add(spool, 2, size=200_000)  # more than any free page can hold
    assert ([kept], [kept]) == (list(rows(tmp_path / "spool")), list(bodies(tmp_path / "spool")))
    await spool.set_limits()
    recovered = await add(spool, 3, size=200_000)
    assert {kept, recovered} == set(rows(tmp_path / "spool")) == set(bodies(tmp_path / "spool"))


async def test_one_failing_call_does_not_fail_its_batch(spool: Spool, tmp_path: Path) -> None:
    """A call that fails inside a group commit is retried alone; the others commit."""
    taken = new_id()
    await spool.add(
        sender="",
        recipients=["a@b.example"],
        raw=b"x\r\n",
        peer="p",
        trace=b"",
        message_id="",
        queue_id=taken,
    )
    duplicate = spool.add(
        sender="",
        recipients=["a@b.example"],
        raw=b"y\r\n",
        peer="p",
        trace=b"",
        message_id="",
        queue_id=taken,
    )
    results = await asyncio.gather(
        *(add(spool, n) for n in range(10)), duplicate, return_exceptions=True
    )
    assert [SpoolError] == [type(r) for r in results if isinstance(r, BaseException)]
    assert 11 == len(rows(tmp_path / "spool"))


async def test_purge_drops_old_sent_rows_only(spool: Spool, tmp_path: Path) -> None:
    """purge(age) deletes finished rows (sent, bounced) older than `age` seconds, never
    queued or failed ones."""
    sent, failed, queued, bounced = [await add(spool, n) for n in range(4)]
    await spool.claim(4)
    await spool.sent(sent, rule=None, route="upstream", reply="250 ok")
    await spool.fail(failed, rule=None, route="upstream", reply="550 no")
    await spool.sent(bounced, rule=None, route="ses", reply="SES accepted", ses_message_id="b")
    await bounce(spool, "b", "user3@example.org")
    assert State.BOUNCED == rows(tmp_path / "spool")[bounced]["state"]
    assert 0 == await spool.purge(3600)
    assert 2 == await spool.purge(0)
    assert {failed, queued} == set(rows(tmp_path / "spool")) == set(bodies(tmp_path / "spool"))
    assert [] == events(tmp_path / "spool", sent) == events(tmp_path / "spool", bounced)


async def test_dead_letters_past_their_retention_are_dropped_and_nothing_else(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """purge_failed(age) deletes failed rows (body, history) that failed more than `age`
    seconds ago, in steps; younger dead letters, queued, sent and deferred rows stay, and so
    does the DSN queued when one failed (a row of its own)."""
    monkeypatch.setattr(store, "PURGE_ROWS", 2)
    old = [await add(spool, n) for n in range(5)]
    young, sent, deferred, queued = [await add(spool, n) for n in range(5, 9)]
    await spool.claim(8)
    dsn = Notice(
        id=new_id(),
        recipient="noreply@moodle.test",
        raw=b"Subject: Undelivered Mail Returned to Sender\r\n\r\nsorry\r\n",
        trace=TRACE,
        message_id="<dsn@relay.test>",
        summary="failed: user0@example.org",
    )
    for queue_id in [*old, young]:
        await spool.fail(
            queue_id,
            rule=None,
            route="upstream",
            reply="550 5.1.1 no such user",
            notice=dsn if queue_id == old[0] else None,
        )
    await spool.sent(sent, rule=None, route="upstream", reply="250 ok")
    await spool.defer(
        deferred, due_at=time.time() + 60, rule=None, route="upstream", reply="451 later"
    )
    conn = sqlite3.connect(tmp_path / "spool" / DB_NAME)
    with conn:
        conn.executemany(
            "UPDATE messages SET updated_at = updated_at - 40 * 86400 WHERE id = ?",
            [(queue_id,) for queue_id in [*old, sent, deferred, queued]],
        )
    conn.close()
    assert "" == rows(tmp_path / "spool")[dsn.id]["sender"]
    commits = spool.commits
    assert 5 == await spool.purge_failed(30 * 86400)
    assert spool.commits - commits >= 3
    left = set(rows(tmp_path / "spool"))
    assert {young, sent, deferred, queued, dsn.id} == left
    assert set(bodies(tmp_path / "spool")) == left - {sent}
    assert all(events(tmp_path / "spool", queue_id) == [] for queue_id in old)
    assert 0 == await spool.purge_failed(30 * 86400)


async def test_purge_goes_in_steps_until_nothing_is_left(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of a purge is one bounded transaction (relay serve's adds wait for the
    write lock meanwhile); steps go on until every old row and feedback key is gone."""
    monkeypatch.setattr(store, "PURGE_ROWS", 2)
    ids = [await add(spool, n) for n in range(5)]
    await spool.claim(5)
    for n, queue_id in enumerate(ids):
        await spool.sent(
            queue_id, rule=None, route="ses", reply="SES accepted", ses_message_id=f"s{n}"
        )
        await bounce(spool, f"s{n}", f"user{n}@example.org")
    commits = spool.commits
    assert 5 == await spool.purge(0)
    assert {} == rows(tmp_path / "spool")
    assert [] == feedback_keys(tmp_path / "spool")
    assert spool.commits - commits >= 3


async def bounce(spool: Spool, ses_id: str, *failed: str, key: str = "") -> None:
    """A permanent SES bounce of `failed`, as relay.deliver.feedback applies it."""
    await spool.feedback(
        key=key or f"Bounce/{ses_id}/{'/'.join(failed)}",
        ses_message_id=ses_id,
        event="ses_bounce",
        detail=f"bounce=Permanent/General {' '.join(failed)}",
        kind="bounce",
        failed=failed,
    )


async def test_a_mail_is_bounced_once_every_recipient_has_bounced(
    spool: Spool, tmp_path: Path
) -> None:
    """SES may report the recipients of one mail in separate events: the mail stays `sent`
    while one of them has not bounced, and is `bounced` once all have (a complaint or a
    transient bounce counts for nobody); the event repeated changes nothing, and the
    recipients' marks count in neither the bounce nor the complaint rate."""
    queue_id = await spool.add(
        sender="noreply@moodle.test",
        recipients=["a@example.org", "b@example.org"],
        raw=mail_bytes(1),
        peer="127.0.0.1",
        trace=TRACE,
        message_id="<1@moodle.test>",
    )
    await spool.claim(1)
    await spool.sent(queue_id, rule=None, route="ses", reply="SES accepted", ses_message_id="m")
    await bounce(spool, "m", "a@example.org")
    await spool.feedback(
        key="Complaint/m/1", ses_message_id="m", event="ses_complaint", detail="", kind="complaint"
    )
    await spool.feedback(
        key="Bounce/m/t", ses_message_id="m", event="ses_bounce", detail="", kind="transient_bounce"
    )
    assert State.SENT == rows(tmp_path / "spool")[queue_id]["state"]
    await bounce(spool, "m", "B@Example.ORG")
    await bounce(spool, "m", "B@Example.ORG")  # SQS delivers at least once
    assert State.BOUNCED == rows(tmp_path / "spool")[queue_id]["state"]
    assert [
        "received",
        "sent",
        *("ses_bounce", "ses_complaint", "ses_bounce"),  # a, the complaint, the transient
        *("ses_bounce", "bounced"),  # b, once
    ] == events(tmp_path / "spool", queue_id)
    seen = await spool.reputation(0.0)  # the marks count in no rate
    assert (1, 2, 1) == (seen.sends, seen.bounces, seen.complaints)


async def test_dropped_bodies_give_their_pages_back(spool: Spool, tmp_path: Path) -> None:
    """After delivery and purge, the space of big bodies is returned (auto_vacuum=INCREMENTAL)."""
    ids = [await add(spool, n, size=100_000) for n in range(10)]
    await spool.claim(10)
    for qid in ids:
        await spool.sent(qid, rule=None, route="upstream", reply="250 ok")
    await spool.purge(0)
    conn = sqlite3.connect(tmp_path / "spool" / DB_NAME)
    try:
        assert 0 == conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()


def test_ids_are_unique_and_sort_by_time() -> None:
    """Queue ids: 12 Crockford base32 characters, strictly increasing within a process."""
    ids = [new_id() for _ in range(10_000)]
    assert ids == sorted(set(ids))
    assert {12} == {len(i) for i in ids}


async def test_every_write_holds_the_spool_write_lock(spool: Spool, tmp_path: Path) -> None:
    """Transactions take write.lock, so the other relay process waits in the kernel (woken
    at once) instead of sleeping in SQLite's busy handler; the lock is free between them."""
    lock = os.open(tmp_path / "spool" / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:

        def taken(conn: sqlite3.Connection) -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False

        assert await spool._call(taken)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after the commit
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)


async def test_a_version_1_spool_is_upgraded_and_every_body_kept(tmp_path: Path) -> None:
    """Opening a spool of schema 1 (bodies inline) moves each body to `bodies` byte for
    byte, drops the old column and sets version 2; waiting mail is claimable as before."""
    binary = bytes(range(256)) * 80 + b"\r\n"  # every byte value, past one page
    kept = {
        "0000000000Q1": ("queued", mail_bytes(1, 30_000)),
        "0000000000D2": ("deferred", binary),
        "0000000000F3": ("failed", mail_bytes(3)),
    }
    make_spool(tmp_path / "spool", 1, {**kept, "0000000000S4": ("sent", None)})
    spool = await Spool.open(tmp_path / "spool")
    try:
        claimed = await spool.claim(10)
    finally:
        await spool.close()
    assert {qid: body for qid, (_, body) in kept.items()} == bodies(tmp_path / "spool")
    assert {"0000000000Q1": kept["0000000000Q1"][1], "0000000000D2": binary} == {
        m.id: m.raw for m in claimed
    }
    found = rows(tmp_path / "spool")
    assert ["0000000000D2", "0000000000F3", "0000000000Q1", "0000000000S4"] == sorted(found)
    assert "body" not in found["0000000000S4"]
    assert ["received"] == events(tmp_path / "spool", "0000000000S4")
    conn = sqlite3.connect(tmp_path / "spool" / DB_NAME)
    try:
        assert (SCHEMA_VERSION, "ok") == (
            conn.execute("PRAGMA user_version").fetchone()[0],
            conn.execute("PRAGMA integrity_check").fetchone()[0],
        )
    finally:
        conn.close()


def index_sql(directory: Path) -> dict[str, str]:
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        found = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")
        return {name: " ".join((sql or "").split()) for name, sql in found}
    finally:
        conn.close()


async def test_ordinary_mail_writes_no_entry_in_the_dsn_and_ses_indexes(tmp_path: Path) -> None:
    """`reports_on` and `ses_message_id` are NULL for ordinary mail: their indexes are partial,
    and a spool of the same version made with the full ones gets the partial ones on open
    with its mail and its lookups intact."""
    directory = tmp_path / "spool"
    await (await Spool.open(directory)).close()
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    conn.execute("DROP INDEX messages_reporting")
    conn.execute("DROP INDEX messages_by_ses_id")
    conn.execute("CREATE INDEX messages_reports_on ON messages (reports_on)")
    conn.execute("CREATE INDEX messages_ses_id ON messages (ses_message_id)")
    conn.close()
    spool = await Spool.open(directory)
    try:
        qid = await spool.add(
            sender="a@example.org",
            recipients=["b@example.org"],
            raw=mail_bytes(1),
            peer="127.0.0.1",
            trace=TRACE,
            message_id="<1@example.org>",
        )
        [mail] = await spool.claim(1)
        await spool.sent(mail.id, rule="r", route="ses", reply="250 Ok", ses_message_id="ses-1")
    finally:
        await spool.close()
    indexes = index_sql(directory)
    assert not {"messages_reports_on", "messages_ses_id"} & set(indexes)
    assert indexes["messages_reporting"].endswith("WHERE reports_on IS NOT NULL")
    assert indexes["messages_by_ses_id"].endswith("WHERE ses_message_id IS NOT NULL")
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        lookup = "SELECT id FROM messages WHERE ses_message_id = ?"
        plan = conn.execute(f"EXPLAIN QUERY PLAN {lookup}", ("ses-1",)).fetchall()
        assert "USING INDEX messages_by_ses_id" in str(plan)
        assert [(qid,)] == conn.execute(lookup, ("ses-1",)).fetchall()
        assert [(0,), (1,)] == conn.execute(
            "SELECT count(*) FROM messages INDEXED BY messages_reporting"
            " WHERE reports_on IS NOT NULL UNION ALL"
            " SELECT count(*) FROM messages INDEXED BY messages_by_ses_id"
            " WHERE ses_message_id IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()


async def test_a_spool_from_a_newer_relay_is_refused(tmp_path: Path) -> None:
    """A schema version this code does not know: SpoolError naming the file and both
    versions, and the file is left as it was."""
    make_spool(tmp_path / "spool", SCHEMA_VERSION + 1, {"0000000000Q1": ("queued", b"x\r\n")})
    with pytest.raises(SpoolError) as raised:
        await Spool.open(tmp_path / "spool")
    path = tmp_path / "spool" / DB_NAME
    assert (
        f"spool {path} has schema version {SCHEMA_VERSION + 1}; this relay knows versions up"
        f" to {SCHEMA_VERSION}: run the newer relay that wrote it"
    ) == str(raised.value)
    assert "body" in rows(tmp_path / "spool")["0000000000Q1"]


async def test_a_write_lock_held_too_long_fails_the_batch_not_the_spool(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other process stopped while holding write.lock (SIGSTOP, a hang): adds fail with
    SpoolError after TURN_TIMEOUT (the client gets its 451), never hang; once the lock is
    free again, adds commit."""

    async def add() -> str:
        return await spool.add(
            sender="a@example.org",
            recipients=["b@example.org"],
            raw=b"x",
            peer="127.0.0.1",
            trace=b"",
            message_id="",
        )

    monkeypatch.setattr(spoollock, "TURN_TIMEOUT", 0.3)
    lock = os.open(tmp_path / "spool" / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        adds = asyncio.gather(*(add() for _ in range(3)), return_exceptions=True)
        results = await asyncio.wait_for(adds, 5)
        assert all(isinstance(r, SpoolError) and WRITE_LOCK in str(r) for r in results), results
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)
    qid = await add()
    assert [qid] == [m.id for m in await spool.claim(10)]


async def test_a_lone_session_commits_on_its_own_thread_unless_it_would_wait(
    spool: Spool, tmp_path: Path
) -> None:
    """try_now() runs a transaction on the caller's thread (no hand-off to the writer) when
    nothing has to be waited for; while the other process holds write.lock it declines,
    and add(alone=True) then goes through the writer thread, which waits its turn."""

    def where(conn: sqlite3.Connection) -> str:
        return threading.current_thread().name

    assert (True, [threading.current_thread().name]) == spool._writer.try_now([where])
    lock = os.open(tmp_path / "spool" / WRITE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert (False, []) == spool._writer.try_now([where])
        add = spool.add(
            sender="a@example.org",
            recipients=["b@example.org"],
            raw=b"x",
            peer="127.0.0.1",
            trace=b"",
            message_id="",
            alone=True,
        )
        adding = asyncio.ensure_future(add)
        await asyncio.sleep(0.05)
        assert not adding.done()  # waiting for its turn, on the writer thread
        fcntl.flock(lock, fcntl.LOCK_UN)
        qid = await asyncio.wait_for(adding, 5)
    finally:
        os.close(lock)
    assert [qid] == [m.id for m in await spool.claim(10)]


async def test_a_spool_of_the_current_version_without_a_column_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """A spool whose version number is current but which lacks a column (a development
    build gave version 4 to another change) is refused at open, naming the file and the
    column. Before, relay answered 250 to new mail and logged `claim_failed` every second
    ("no such column: retried_at"), delivering nothing."""
    directory = tmp_path / "spool"
    await (await Spool.open(directory)).close()
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    conn.execute("ALTER TABLE messages DROP COLUMN retried_at")
    conn.close()
    with pytest.raises(SpoolError) as refused:
        await Spool.open(directory)
    expected = f"spool {directory / DB_NAME} (schema version {SCHEMA_VERSION}) lacks messages."
    assert str(refused.value).startswith(expected + "retried_at: a development build"), refused


async def test_an_upgrade_is_said_first_and_keeps_systemd_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool of an older schema is upgraded in one transaction, which takes seconds on a
    large spool while nothing listens: the log says so first (it said nothing), and systemd
    is asked for more start time (EXTEND_TIMEOUT_USEC), before and every EXTEND_EVERY
    seconds during the upgrade (here every step of the progress handler)."""
    import socket

    make_spool(tmp_path / "spool", 1, {f"0000000000Q{n}": ("queued", b"x") for n in range(9)})
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setattr(schema, "EXTEND_EVERY", 0.0)
    caplog.set_level("INFO", logger="relay.spool")
    spool = await Spool.open(tmp_path / "spool")
    await spool.close()
    said = []
    while True:
        try:
            said.append(notify.recv(100).decode())
        except BlockingIOError:
            break
    notify.close()
    assert said and all(s == "EXTEND_TIMEOUT_USEC=60000000" for s in said), said
    assert any(
        "event=spool_upgrade" in r.getMessage() and "from=1 to=" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("name", ["spool#2", "moodle?prod", "site%41"])
async def test_the_ses_rates_are_read_from_any_spool_directory(tmp_path: Path, name: str) -> None:
    """A `#`, `?` or `%` in the spool's path read as the URI's own in the read-only
    connection: the rates failed every minute, and `moodle?prod` made a stray empty
    database `moodle` beside it."""
    spool = await Spool.open(tmp_path / name)
    try:
        assert 0 == (await spool.reputation(0.0)).sends
    finally:
        await spool.close()
    assert [name] == os.listdir(tmp_path)


async def test_the_ses_rates_and_the_queue_gauges_are_read_outside_the_write_turn(
    tmp_path: Path,
) -> None:
    """The bounce and complaint rates scan every row (0.3 s for 300,000), once a minute in
    each process; the counts by state and the oldest waiting mail, every 5 s for metrics,
    took 0.1 s and 0.4 s at a million waiting rows. Read in the write turn, Moodle's adds
    waited behind them; read on a connection of their own, they need no turn: here they
    come while another process holds it (as the delivery process does while it commits)."""
    spool = await Spool.open(tmp_path)
    try:
        await add_one(spool)
        holder = os.open(tmp_path / WRITE_LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX)
            seen = await asyncio.wait_for(spool.reputation(0.0), 2.0)
            counts = await asyncio.wait_for(spool.counts(), 2.0)
            age = await asyncio.wait_for(spool.oldest_age(), 2.0)
        finally:
            os.close(holder)
        assert (0, 0, 0) == (seen.sends, seen.bounces, seen.complaints)
        assert 1 == counts[State.QUEUED.value]
        assert 0.0 <= age < 60
    finally:
        await spool.close()


async def test_the_writer_thread_keeps_no_call_once_it_is_committed(spool: Spool) -> None:
    """Once a batch is committed, the writer thread holds none of its calls while it waits
    for the next: an add's call holds the mail's bytes, and the last batch of a burst of
    9.5 MB mails stayed in memory after relay serve had trimmed its heap, until the next
    mail came (tests/reliability/test_hostile.py, the DATA hoarders, read 208 and 216 MiB
    15 s after they left, against under 206)."""

    class Held:
        """Stands for a mail's bytes (bytes cannot be weakly referenced)."""

    held = Held()
    gone = weakref.ref(held)

    def op(conn: sqlite3.Connection, held: Held = held) -> None:
        return None

    await asyncio.wrap_future(spool._writer.submit(op))
    del held, op
    for _ in range(200):  # the thread lets go once it is back from the commit
        if gone() is None:
            break
        await asyncio.sleep(0.01)
    assert gone() is None
