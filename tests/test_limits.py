"""The hostile-client limits as units: `limits:` keys, session caps, sampled logging."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from relay import logs, metrics, service, settings
from relay.errors import ConfigError
from relay.receive import handler as handler_mod
from relay.receive import passwords
from relay.receive.budget import Budget
from relay.receive.caps import (
    TOO_MANY_FROM_YOU,
    TOO_MANY_SESSIONS,
    Caps,
    client_of,
    sessions_problem,
)
from relay.receive.data import NO_ROOM, Body, free_bytes
from relay.receive.guesses import Guesses
from relay.settings import BareNewline, Limits
from relay.spool import DB_NAME


def load_limits(tmp_path: Path, text: str) -> Limits:
    path = tmp_path / "relay.yaml"
    path.write_text(f"upstream: {{host: smtp.example.org}}\nlimits:\n{text}", encoding="utf-8")
    return settings.load(path).limits


def test_the_defaults_are_design_3_2() -> None:
    """DESIGN 3.2's defaults, from the one place they are written (Limits)."""
    expected = (500, 50, 268435456, 5, BareNewline.NORMALIZE)
    limits = Limits()
    assert expected == (
        limits.max_sessions,
        limits.max_sessions_per_ip,
        limits.max_data_in_memory,
        limits.max_auth_failures,
        limits.bare_newline,
    )


def test_every_key_is_read(tmp_path: Path) -> None:
    """Each `limits:` key in relay.yaml lands in Limits."""
    text = (
        "  max_sessions: 40\n  max_sessions_per_ip: 4\n  max_data_in_memory: 1000\n"
        "  max_auth_failures: 3\n  max_junk_commands: 7\n  idle_timeout: 30\n"
        "  session_timeout: 60\n  bare_newline: reject\n  spill_min_free: 0\n"
    )
    expected = Limits(
        max_sessions=40,
        max_sessions_per_ip=4,
        max_data_in_memory=1000,
        max_auth_failures=3,
        max_junk_commands=7,
        idle_timeout=30.0,
        session_timeout=60.0,
        bare_newline=BareNewline.REJECT,
        spill_min_free=0,
    )
    assert expected == load_limits(tmp_path, text)


@pytest.mark.parametrize(
    ("address", "client"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack listener's IPv4 client
        ("2001:db8:5e55::1", "2001:db8:5e55::/84"),
        ("2001:db8:5e55:0:0:fff:ffff:ffff", "2001:db8:5e55::/84"),
        ("2001:db8:5e55:0:0:1000::", "2001:db8:5e55::1000:0:0/84"),
        ("fe80::1%eth0", "fe80::/84"),
        ("::1", "::/84"),
        ("/run/relay.sock", "/run/relay.sock"),
    ],
)
def test_a_client_is_an_ipv4_address_or_an_ipv6_slash_84(address: str, client: str) -> None:
    assert client == client_of(address)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("  max_sessions: 0\n", "relay.yaml:3: limits.max_sessions: "),
        ("  bare_newline: fix\n", "relay.yaml:3: limits.bare_newline: 'fix' is not one of"),
        ("  max_auth_failures: two\n", "relay.yaml:3: limits.max_auth_failures: expected"),
        (
            "  max_sessions: 10\n  max_sessions_per_ip: 20\n",
            "relay.yaml:4: limits.max_sessions_per_ip: max_sessions_per_ip (20) is more",
        ),
        (
            "  idle_timeout: 100\n  session_timeout: 50\n",
            "relay.yaml:4: limits.session_timeout: session_timeout (50) is shorter",
        ),
        ("  max_session: 10\n", "relay.yaml:3: limits.max_session: "),
    ],
    ids=["zero-sessions", "bad-choice", "not-a-number", "per-ip-over-total", "deadline", "typo"],
)
def test_bad_limits_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    """A wrong value is a load error with file:line: limits.key."""
    with pytest.raises(ConfigError) as caught:
        load_limits(tmp_path, text)
    assert message in str(caught.value)


def test_caps_count_in_all_and_per_client() -> None:
    """Two per client, three in all: the third from one client and the fourth overall are
    refused; a released place is free again."""
    caps = Caps(max_sessions=3, max_per_ip=2)
    replies = [caps.admit(ip) for ip in ("a", "a", "a", "b", "c")]
    assert [None, None, TOO_MANY_FROM_YOU.format(peer="a"), None, TOO_MANY_SESSIONS] == replies
    caps.release("a")
    assert (None, {"a": 1, "b": 1, "c": 1}) == (caps.admit("c"), caps.by_ip)


@pytest.mark.parametrize(
    ("max_sessions", "soft", "fits"),
    [(500, 1024, True), (892, 1024, True), (893, 1024, False), (5000, 4096, False)],
)
def test_max_sessions_must_fit_the_open_file_limit(
    max_sessions: int, soft: int, fits: bool
) -> None:
    """max_sessions + 100 reserved descriptors + 32 for DATA spill files must fit under the
    soft limit (at 924 of 1024, the most it allowed before, no body could spill)."""
    assert fits == (sessions_problem(max_sessions, soft) is None)


def test_a_sampled_event_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """1,000 events in a burst: one line, with count=1; the next interval's line counts the
    rest."""
    sampled = logs.Sampled(logging.getLogger("relay.test"), "thing", interval=0.2, kind="x")
    with caplog.at_level(logging.INFO, logger="relay.test"):
        for _ in range(1000):
            sampled(peer="p")
        sampled._next = 0.0  # the interval has passed
        sampled(peer="p")
    expected = ["event=thing kind=x count=1 peer=p", "event=thing kind=x count=1000 peer=p"]
    assert expected == [r.getMessage() for r in caplog.records]


async def test_accept_out_of_files_is_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio's "accept() out of system resource", 500 times: one line, no traceback;
    other loop errors still go to asyncio's default handler."""
    loop = asyncio.get_running_loop()
    error = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.INFO):
        for _ in range(500):
            service._loop_exception(
                loop, {"message": "socket.accept() out of system resource", "exception": error}
            )
        service._loop_exception(loop, {"message": "something else"})
    lines = [r.getMessage() for r in caplog.records]
    assert 2 == len(lines), lines
    assert lines[0].startswith("event=accept_failed count=1 error=")
    assert "something else" == lines[1]
    assert caplog.records[0].exc_info is None


def test_auth_delay_grows_per_connection_and_per_address() -> None:
    """1 s per earlier failure on the connection; past 10 failures from one address in 10
    minutes, 1 s per failure beyond, even on fresh connections; at most 10 s; forgotten
    after the window."""
    now = [0.0]
    guesses = Guesses(clock=lambda: now[0])
    first_connection = [guesses.failed("a", n) for n in (1, 2, 3, 4, 5)]
    reconnects = [guesses.failed("a", 1) for _ in range(10)]
    elsewhere = guesses.failed("b", 1)
    now[0] = 601.0
    later = guesses.failed("a", 1)
    assert [0.0, 1.0, 2.0, 3.0, 4.0] == first_connection
    assert [0.0] * 5 + [1.0, 2.0, 3.0, 4.0, 5.0] == reconnects
    assert (0.0, 0.0) == (elsewhere, later)
    assert 10.0 == max(guesses.failed("c", 1) for _ in range(30))


async def test_one_scrypt_at_a_time_even_when_the_client_hangs_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client hanging up during AUTH cancels its check, but its scrypt runs on in its
    thread: the next check waits for it. It did not, so a guesser hanging up at once ran
    one scrypt per core and skipped the queue."""
    running, most = 0, 0

    def slow(password: bytes, encoded: str) -> bool:
        nonlocal running, most
        running += 1
        most = max(most, running)
        time.sleep(0.2)
        running -= 1
        return False

    users_file = tmp_path / "users"
    users_file.write_text(f"moodle:{passwords.hash_password('right')}\n", encoding="utf-8")
    monkeypatch.setattr(passwords, "verify_password", slow)
    users = passwords.Users(users_file)
    hung_up = asyncio.create_task(users.verify(b"moodle", b"guess"))
    await asyncio.sleep(0.05)
    hung_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hung_up
    assert not await users.verify(b"moodle", b"another")
    assert 1 == most


async def test_a_users_file_gone_or_emptied_keeps_the_users_last_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The users file moved away, then written empty (rewritten by delete and create, or by
    root with umask 077): Moodle's login still works, a wrong password still fails, and it
    is logged once. Before, every AUTH got 535 until the file came back; Moodle's mail was
    lost. A readable file with users again is taken as it is."""
    users_file = tmp_path / "users"
    users_file.write_text(f"moodle:{passwords.hash_password('right', n=1024)}\n", "utf-8")
    users = passwords.Users(users_file)
    assert await users.verify(b"moodle", b"right")
    moved = users_file.rename(tmp_path / "users.old")
    with caplog.at_level(logging.WARNING, logger="relay.receive"):
        assert await users.verify(b"moodle", b"right")
        assert not await users.verify(b"moodle", b"wrong")
        users_file.write_text("", encoding="utf-8")
        assert await users.verify(b"moodle", b"right")
    said = [r.getMessage() for r in caplog.records]
    assert 1 == len(said), said
    assert said[0].startswith(f"event=users_file_unusable count=1 path={users_file}"), said
    moved.unlink()
    users_file.write_text(f"cron:{passwords.hash_password('other', n=1024)}\n", "utf-8")
    assert not await users.verify(b"moodle", b"right")
    assert await users.verify(b"cron", b"other")


def _stream(seed: int) -> bytes:
    """A DATA stream with stuffed dots, bare CR/LF and long lines, then the end line."""
    rng = random.Random(seed)
    vocabulary = [b"", b".", b"..", b"x" * 300, b"a\nb", b"c\rd", b". ", b"y" * 998, b"z" * 1200]
    lines = [rng.choice(vocabulary) for _ in range(rng.randrange(50, 400))]
    return b"\r\n".join(lines) + b"\r\n.\r\nQUIT\r\n"


async def _feed(stream: bytes, cuts: list[int], budget: Budget | None, spill_dir: Path) -> tuple:
    body = Body(size_limit=60_000, line_limit=1001, budget=budget, spill_dir=spill_dir)
    rest = None
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    try:
        for n, piece in enumerate(pieces):
            if body.spill_due:
                await body.spill()
            rest = body.feed(piece)
            if rest is not None:
                rest += b"".join(pieces[n + 1 :])
                break
        spilled = body.spilled
        content = body.content() if body.verdict is None else None
    finally:
        body.close()
    return body.verdict, content, rest, spilled


@pytest.mark.parametrize("seed", range(12))
async def test_a_spilled_body_is_the_body_kept_in_memory(seed: int, tmp_path: Path) -> None:
    """With a budget of 0 every judged line goes to the temporary file as it arrives: the
    verdict, the content and the bytes after the end are those of a body kept in memory,
    and the budget is back to 0 afterwards."""
    stream = _stream(seed)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(stream)), 12))
    budget = Budget(0)
    in_memory = await _feed(stream, cuts, None, tmp_path)
    spilling = await _feed(stream, cuts, budget, tmp_path)
    assert in_memory[:3] == spilling[:3]
    assert 0 == budget.used
    assert spilling[3] or in_memory[1] is None or len(in_memory[1]) < 2000


async def test_memory_is_handed_back_once_no_body_is_held_unfinished_or_read_back() -> None:
    """After the budget was reached, `trim` runs when the last unfinished body is gone and
    the last body read back is spooled, not before: hoarders ending at once leave their
    bodies read back after the unfinished ones are gone (the trim they missed kept
    100-140 MiB more in RSS afterwards)."""
    trims: list[int] = []
    budget = Budget(100, trim=lambda: trims.append(1))
    budget.used = 150
    assert budget.over
    await budget.load(60)
    budget.release(150)
    assert [] == trims  # a body read back is still in memory
    await budget.load(30)
    budget.unload(60)
    assert [] == trims
    budget.unload(30)
    assert [1] == trims
    budget.used = 50  # under the limit: nothing to hand back afterwards
    budget.release(50)
    assert [1] == trims


async def test_a_spill_that_would_eat_the_reserve_refuses_its_body(tmp_path: Path) -> None:
    """Past the memory budget a body spills to the spool's disk, but never into the last
    `min_free` bytes: then it is refused (452 4.3.1), keeps no file and gives its memory
    back. The same body with no reserve spills and is kept whole."""
    line = b"y" * 98 + b"\r\n"
    stream = line * 400 + b".\r\n"  # 40 KB: over a budget of 10 KB
    outcomes = {}
    for name, reserve in (("no reserve", 0), ("reserve", free_bytes(tmp_path) + 2**40)):
        budget = Budget(10_000)
        body = Body(
            size_limit=1_000_000,
            line_limit=1001,
            budget=budget,
            spill_dir=tmp_path,
            min_free=reserve,
        )
        rest = None
        for at in range(0, len(stream), 4096):
            if body.spill_due:
                await body.spill()
            rest = body.feed(stream[at : at + 4096])
            if rest is not None:
                break
        outcomes[name] = (body.verdict, body.spilled, rest)
        content = body.content() if body.verdict is None else None
        body.close()
        assert budget.used == 0
        if body.verdict is None:
            assert content == line * 400
    assert outcomes == {"no reserve": (None, True, b""), "reserve": (NO_ROOM, False, b"")}


async def test_spill_files_stay_within_the_descriptors_left(tmp_path: Path) -> None:
    """Each body that spills holds a descriptor beyond its session's, which the open-file
    check did not count: hoarders that each sent some DATA took every descriptor, accept()
    failed, and Moodle's connections were closed without a greeting. A body that would open
    one more than `max_files` is refused (452 4.3.1) instead; one closed gives its place."""
    budget = Budget(0, max_files=2)
    line = b"y" * 98 + b"\r\n"

    async def started() -> Body:
        body = Body(size_limit=1_000_000, line_limit=1001, budget=budget, spill_dir=tmp_path)
        for _ in range(2):  # unfinished: no end line
            if body.spill_due:
                await body.spill()
            assert body.feed(line * 40) is None
        return body

    bodies = [await started() for _ in range(3)]
    assert [(None, True), (None, True), (NO_ROOM, False)] == [
        (b.verdict, b.spilled) for b in bodies
    ]
    bodies[0].close()
    bodies.append(await started())
    assert (None, True) == (bodies[-1].verdict, bodies[-1].spilled)
    for body in bodies:
        body.close()
    assert (0, 0) == (budget.files, budget.used)


async def test_a_client_gone_mid_spill_gives_its_spill_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes while the thread opens and writes its first spill file (a slow disk,
    here 0.3 s): aiosmtpd cancels the spill. The file the thread opened was left to the
    garbage collector and its place never given back: after `max_files` such clients,
    every mail past the memory budget got 452 until a restart."""
    write = Body._write

    def slow_write(body: Body, data: memoryview) -> object:
        time.sleep(0.3)
        return write(body, data)

    monkeypatch.setattr(Body, "_write", slow_write)
    budget = Budget(0, max_files=1)
    fds = len(os.listdir("/proc/self/fd"))
    body = Body(size_limit=1_000_000, line_limit=1001, budget=budget, spill_dir=tmp_path)
    assert body.feed(b"y" * 98 + b"\r\n" * 400) is None
    spilling = asyncio.ensure_future(body.spill())
    await asyncio.sleep(0.1)
    spilling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await spilling
    body.close()
    assert (0, fds) == (budget.files, len(os.listdir("/proc/self/fd")))


async def test_a_hoarder_meets_the_disk_reserve_and_moodle_is_still_spooled(
    start_relay: Any,
) -> None:
    """Over sockets: with the memory budget spent, a 300 KB body would spill into the disk
    reserve (`limits.spill_min_free`, here more than the disk has): 452 4.3.1, counted in
    relay_data_no_room_total. The next mail, within the budget, gets its 250 and is stored.
    With no reserve the same 300 KB body is spooled (the control)."""
    line = b"z" * 998 + b"\r\n"
    big = b"Subject: hoard\r\n\r\n" + line * 300
    small = b"Subject: moodle\r\n\r\nA reminder.\r\n"
    refused_before = metrics.DATA_NO_ROOM._value.get()
    reserve = free_bytes(Path.cwd()) + 2**40
    running = await start_relay(limits={"max_data_in_memory": 100_000, "spill_min_free": reserve})
    assert (await _transaction(running.port, big)).startswith(NO_ROOM)
    assert metrics.DATA_NO_ROOM._value.get() == refused_before + 1
    reply = await _transaction(running.port, small)
    assert reply.startswith("250 2.0.0"), reply
    stored, _ = await asyncio.to_thread(_stored, running.settings.spool, reply.split()[-1])
    assert stored == small
    control = await start_relay(limits={"max_data_in_memory": 100_000, "spill_min_free": 0})
    reply = await _transaction(control.port, big)
    assert reply.startswith("250 2.0.0"), reply
    stored, _ = await asyncio.to_thread(_stored, control.settings.spool, reply.split()[-1])
    assert stored == big


async def _transaction(port: int, body: bytes) -> str:
    """EHLO, MAIL, RCPT, DATA with `body` sent as is; the reply to the end of data."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        for command in (
            b"EHLO moodle.test",
            b"MAIL FROM:<noreply@moodle.example.org>",
            b"RCPT TO:<a@example.org>",
            b"DATA",
        ):
            writer.write(command + b"\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
        writer.write(body + b".\r\n")
        return (await reader.readline()).decode().rstrip()
    finally:
        writer.close()


def _stored(spool: Path, queue_id: str) -> tuple[bytes, list[str]]:
    conn = sqlite3.connect(spool / DB_NAME)
    try:
        [(body,)] = conn.execute("SELECT body FROM bodies WHERE id = ?", (queue_id,))
        details = [
            d for (d,) in conn.execute("SELECT detail FROM events WHERE queue_id = ?", (queue_id,))
        ]
    finally:
        conn.close()
    return bytes(body), details


BARE_TABLE = [
    (
        "crlf-only",
        "normalize",
        b"Subject: a\r\n\r\nline\r\n..dot\r\n",
        b"Subject: a\r\n\r\nline\r\n.dot\r\n",
        False,
    ),
    (
        "lf-normalized",
        "normalize",
        b"Subject: a\r\n\r\nx\ny\r\n",
        b"Subject: a\r\n\r\nx\r\ny\r\n",
        True,
    ),
    (
        "cr-normalized",
        "normalize",
        b"Subject: a\r\n\r\nx\ry\r\r\n",
        b"Subject: a\r\n\r\nx\r\ny\r\n\r\n",
        True,
    ),
    (
        "crlf-only-reject",
        "reject",
        b"Subject: a\r\n\r\nline\r\n",
        b"Subject: a\r\n\r\nline\r\n",
        False,
    ),
    ("lf-rejected", "reject", b"Subject: a\r\n\r\nx\ny\r\n", None, False),
]


@pytest.mark.parametrize(
    ("policy", "sent", "stored", "noted"),
    [row[1:] for row in BARE_TABLE],
    ids=[row[0] for row in BARE_TABLE],
)
async def test_bare_newline_policy(
    start_relay: Any, policy: str, sent: bytes, stored: bytes | None, noted: bool
) -> None:
    """Well-formed mail is stored byte for byte (unstuffed only); a bare CR or LF is
    rewritten to CRLF and noted on the history (normalize) or refused with 550 (reject)."""
    running = await start_relay(limits={"bare_newline": policy})
    reply = await _transaction(running.port, sent)
    if stored is None:
        assert reply.startswith("550 5.5.2 Message contains a bare CR or LF")
        return
    body, details = await asyncio.to_thread(_stored, running.settings.spool, reply.split()[-1])
    assert (stored, noted) == (body, any("normalized" in d for d in details))


async def test_a_body_that_normalizing_takes_over_the_size_limit_is_refused(
    start_relay: Any,
) -> None:
    """max_message_size 10,000: 8,839 bytes with 4,400 bare LFs are within the limit as
    sent, and 13,239 bytes as stored (each LF made CRLF). Refused with 552 5.3.4, as Postfix
    counts what it stores; such mail was stored at up to twice the limit. A small one with
    bare LFs still goes through."""
    running = await start_relay(limits={"max_message_size": 10000})
    bare = b"Subject: big\r\n\r\n" + (b"x\n" * 400 + b"\r\n") * 11  # lines of 802 bytes
    assert len(bare) <= 10000 < len(bare.replace(b"\n", b"\r\n"))
    reply = await _transaction(running.port, bare)
    assert reply.startswith("552 5.3.4"), reply
    fine = await _transaction(running.port, b"Subject: ok\r\n\r\n" + b"x\n" * 100 + b"\r\n")
    assert fine.startswith("250 2.0.0"), fine


def test_the_spool_disk_is_read_once_per_interval_less_the_bodies_let_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`limits.spool_min_free` on a reading of the disk that stands FREE_FOR: a statvfs at
    every MAIL and DATA cost the event loop (bench/README.md). Within the interval each
    body let in is taken off the reading, so the floor holds as if the disk were read
    again; past it the disk is read anew."""
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"upstream: {{host: smtp.example.org}}\nspool: {tmp_path / 'spool'}\n"
        "limits: {spool_min_free: 1000000}\n",
        encoding="utf-8",
    )
    reads: list[Path] = []

    def disk(directory: Path) -> int:
        reads.append(directory)
        return 1_500_000

    monkeypatch.setattr(handler_mod, "free_bytes", disk)
    handler = handler_mod.Handler(spool=None, settings=settings.load(path))  # type: ignore[arg-type]
    handler._reusable = lambda: 0  # type: ignore[method-assign]  # no database file here
    assert not handler._no_room(300_000)  # MAIL's SIZE: asked, not taken
    assert not handler._no_room(400_000, spends=True)  # a body: 1.1 MB left
    assert handler._no_room(200_000, spends=True)  # 0.9 MB would be left: 452
    assert not handler._no_room(100_000, spends=True)
    assert len(reads) == 1
    handler._free_at -= handler_mod.FREE_FOR  # the reading is old: the disk is read again
    assert not handler._no_room(400_000, spends=True)
    assert len(reads) == 2
