"""Disk full (DESIGN 3.4: "If the spool cannot commit (disk full ...): 451 4.3.0").

A real small file system: the spool lives on a 6 MB tmpfs (`mount -t tmpfs`,
needs root, as in CI). Clients keep sending 16 KB mails; a ballast file then
takes every free block; while the disk is full the clients get 451 4.3.0, and
once the ballast is deleted the same clients get 250 again.

- `test_disk_full_while_receiving...`: the receive path alone (the service in
  this process, its delivery task held back until space returned): nothing 250'd
  is lost and no refused transaction leaves a row behind.
- `test_disk_full_while_delivering...`: `relay serve` with delivery running
  through the full spell: a claim that cannot commit is retried, an outcome that
  cannot be recorded is retried until it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from relay.deliver import task
from relay.errors import SpoolError
from relay.receive.data import free_bytes
from relay.receive.handler import NO_ROOM, SPOOL_UNAVAILABLE
from relay.runtime import Context
from relay.spool import DB_NAME, Spool, open_existing
from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.load import Senders, Tally, summary
from tests.support.mails import MailFactory
from tests.support.processes import RelayProcess, relay_cli
from tests.support.relays import ConfigWriter, Running
from tests.support.smtp import try_send
from tests.support.spools import DONE, await_rows, wait_rows
from tests.support.waits import await_until, wait_until

# system: mounts a tmpfs (needs root) and runs `relay serve` as a process.
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("aws_env")]

CLIENTS = 3
PAD = 16384  # bytes of filler per mail: the disk fills in a few dozen mails
FULL_FOR = 1.5  # seconds the disk stays full once every client has been refused


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MB tmpfs mounted for this test (root only); lazily unmounted afterwards."""
    assert 0 == os.geteuid(), "the disk-full scenarios mount a tmpfs: run them as root (CI does)"
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def fill(directory: Path) -> Path:
    """Write a ballast file in `directory` until the file system has no block left."""
    ballast = directory / "ballast"
    for size in (65536, 512):  # big chunks, then the last partial one
        with ballast.open("ab", buffering=0) as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * size)
    return ballast


def config_for(capture: CaptureServer, fake_ses: FakeSes, spool: Path) -> dict[str, Any]:
    """relay.yaml settings: spool on the tmpfs, SES = the fake, upstream = capture; no
    spool_min_free (a disk another program fills past it: the commit fails, 451)."""
    return {
        "spool": str(spool),
        "limits": {"spool_min_free": 0},
        "upstream": {"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        "ses": {"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 500, "timeout": 5},
        "retry": {"schedule": [1], "max_age": 600},
    }


def refused_by_all(senders: Senders) -> int:
    """How many 451 4.3.0 refusals once every client has had one; 0 before."""
    per_client = [
        sum(1 for r in replies if r.text == SPOOL_UNAVAILABLE) for replies in senders.seen()
    ]
    return sum(per_client) if all(per_client) else 0


def accepted_again(senders: Senders, marks: list[int]) -> bool:
    """Every client has had a 250 since `marks` (its reply count when space returned)."""
    seen = senders.seen()
    return all(
        any(r.code == 250 for r in replies[mark:])
        for replies, mark in zip(seen, marks, strict=True)
    )


def spool_contents(spool: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """SQLite's integrity check, and per row: (body kept or sent, "received" events)."""
    with closing(open_existing(spool)) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        stored = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "SELECT m.id, m.id IN (SELECT id FROM bodies) OR m.state = 'sent',"
                " (SELECT count(*) FROM events e WHERE e.queue_id = m.id AND e.event = 'received')"
                " FROM messages m"
            )
        }
    return integrity, stored


def report(
    name: str, senders: Senders, tally: Tally, filled_at: int, refusals: int
) -> dict[str, Any]:
    codes = Counter(r.text[:9] if r.code else "no reply" for rs in senders.seen() for r in rs)
    return summary(
        name,
        senders,
        tally,
        extra={
            "250s before the fill": filled_at,
            "451s once all refused": refusals,
            "replies": dict(codes),
        },
    )


async def test_disk_full_while_receiving_gives_451_then_the_same_clients_succeed(
    tmpfs: Path,
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Spool on a tmpfs that a ballast file fills while clients send: they get "451 4.3.0"
    (no other refusal, no hang), then 250 again once the ballast goes; afterwards every
    250'd mail is delivered and the spool holds exactly the 250'd mails, each with its body
    and its "received" event, and passes SQLite's integrity check."""
    spool = tmpfs / "spool"
    space_back = asyncio.Event()

    async def delivery_after_space_returns(ctx: Context) -> None:
        await asyncio.wait(
            [asyncio.ensure_future(e.wait()) for e in (space_back, ctx.stop)],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not ctx.stop.is_set():
            await task.delivery(ctx)

    running = await start_relay(
        tasks=[delivery_after_space_returns], **config_for(capture, fake_ses, spool)
    )
    senders = Senders(running.port, MailFactory("fullrx", pad=PAD), threads=CLIENTS, pause=0.02)
    senders.start()
    try:
        await await_until(lambda: len(senders.acked) >= 20, "20 mails before the fill", within=10)
        ballast = await asyncio.to_thread(fill, tmpfs)
        filled_at = len(senders.acked)
        refusals = await await_until(
            lambda: refused_by_all(senders),
            "every client refused with 451 4.3.0 while the disk is full",
            within=20,
        )
        await asyncio.sleep(FULL_FOR)
        marks = [len(replies) for replies in senders.seen()]
        ballast.unlink()
        await await_until(
            lambda: accepted_again(senders, marks),
            "every client accepted again after space returned",
            within=20,
        )
        await asyncio.sleep(0.3)
    finally:
        await asyncio.to_thread(senders.stop)
    space_back.set()
    final = await await_rows(spool, senders.queue_ids(), DONE, within=30)
    integrity, stored = spool_contents(spool)

    numbers = report(
        "disk full (receiving)", senders, Tally.of(fake_ses, capture), filled_at, refusals
    )
    assert {SPOOL_UNAVAILABLE} == {r.text for rs in senders.seen() for r in rs if r.code != 250}
    assert "ok" == integrity
    assert {q: "sent" for q in final} == {q: row["state"] for q, row in final.items()}
    assert {q: (1, 1) for q in senders.queue_ids()} == stored
    assert (0, 0) == (numbers["lost"], numbers["duplicates"])


def test_disk_full_while_delivering_gives_451_then_delivers_everything(
    tmpfs: Path,
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """`relay serve` keeps receiving and delivering while its disk fills up and frees
    again: clients get 451 4.3.0 then 250; the service stays up throughout and every
    250'd mail ends sent (no restart needed), with no half rows in the spool."""
    spool = tmpfs / "spool"
    fake_ses.latency = 0.05  # SES sends in flight when the disk fills
    relay = relay_process(write_config(**config_for(capture, fake_ses, spool))).start()

    def alive(predicate: Callable[[], Any]) -> Callable[[], Any]:
        def check() -> Any:
            assert relay.proc is not None
            if relay.proc.poll() is not None:
                tail = "\n".join(relay.log().splitlines()[-5:])
                raise AssertionError(f"relay serve exited {relay.proc.returncode}:\n{tail}")
            return predicate()

        return check

    senders = Senders(relay.port, MailFactory("fulltx", pad=PAD), threads=CLIENTS, pause=0.02)
    senders.start()
    try:
        wait_until(alive(lambda: len(senders.acked) >= 20), "20 mails before the fill", timeout=10)
        ballast = fill(tmpfs)
        filled_at = len(senders.acked)
        refusals = wait_until(
            alive(lambda: refused_by_all(senders)), "451 for every client", timeout=20
        )
        time.sleep(FULL_FOR)
        marks = [len(replies) for replies in senders.seen()]
        ballast.unlink()
        wait_until(
            alive(lambda: accepted_again(senders, marks)),
            "250 again for every client",
            timeout=20,
        )
        time.sleep(0.3)
    finally:
        senders.stop()
    final = wait_rows(spool, senders.queue_ids(), DONE, timeout=20)
    assert 0 == relay.stop()
    integrity, stored = spool_contents(spool)

    numbers = report(
        "disk full (delivering)", senders, Tally.of(fake_ses, capture), filled_at, refusals
    )
    assert {SPOOL_UNAVAILABLE} == {r.text for rs in senders.seen() for r in rs if r.code != 250}
    assert "ok" == integrity
    assert {q: "sent" for q in final} == {q: row["state"] for q, row in final.items()}
    assert {q: (1, 1) for q in senders.queue_ids()} == stored
    assert 0 == numbers["lost"]


def test_the_queue_can_be_read_on_a_full_or_read_only_disk(
    tmpfs: Path, write_config: ConfigWriter
) -> None:
    """relay serve stopped on a full disk, then the file system remounted read-only (what
    ext4's errors=remount-ro does): `relay queue list` and `show` still show the mails (on
    the read-only one opened read-only, and stderr says so). SQLite could not open the
    spool to write, and every queue command failed ("unable to open database file"; "disk
    I/O error" on a full disk when WAL's files must be made), just when the admin needed to
    see what was queued. Opening it to write (what relay serve does) fails with the file's
    name and why: the disk full, the file system read-only (SQLite says only "disk I/O
    error" and "unable to open database file")."""
    # One spool for each step, each closed as a stopped relay serve leaves it (no WAL files)
    spools = {disk: tmpfs / disk for disk in ("full", "read-only")}
    ids = {disk: asyncio.run(two_mails(spool)) for disk, spool in spools.items()}
    fill(tmpfs)
    seen, said, opened = {}, {}, {}
    for disk, spool in spools.items():
        if disk == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        config = write_config(f"{disk}.yaml", spool=str(spool))
        listed = relay_cli("queue", "list", "--json", "--config", str(config))
        shown = relay_cli("queue", "show", ids[disk][0], "--config", str(config))
        listing = sorted(json.loads(line)["id"] for line in listed.stdout.splitlines())
        seen[disk] = (listed.returncode, listing == sorted(ids[disk]), shown.returncode)
        said[disk] = listed.stderr
        with pytest.raises(SpoolError) as refused:
            asyncio.run(Spool.open(spool))
        opened[disk] = str(refused.value)
    assert {disk: (0, True, 0) for disk in spools} == seen, said
    assert "read-only, as it is" in said["read-only"]
    why = {"full": "the disk is full", "read-only": "the file system is read-only"}
    for disk, message in opened.items():
        assert f"cannot open spool {spools[disk] / DB_NAME}: " in message, message
        assert why[disk] in message, message


async def two_mails(spool_dir: Path) -> list[str]:
    """A spool in `spool_dir` with two queued mails, closed; their ids."""
    spool = await Spool.open(spool_dir)
    try:
        return [
            await spool.add(
                sender="noreply@moodle.example.org",
                recipients=[f"u{n}@example.org"],
                raw=f"Subject: {n}\r\n\r\nx\r\n".encode(),
                peer="127.0.0.1",
                trace=b"Received: x\r\n",
                message_id=f"<{n}@moodle.example.org>",
            )
            for n in range(2)
        ]
    finally:
        await spool.close()


async def large_then_small(port: int, large: int, small: int) -> tuple[list[str], list[str]]:
    """`large` mails of 400 KB at once, then `small` Moodle-sized ones: their replies."""
    big = b"Subject: hoard\r\n\r\n" + (b"z" * 998 + b"\r\n") * 400
    little = b"Subject: moodle\r\n\r\n" + b"A reminder.\r\n" * 300

    async def one(body: bytes) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await reader.readline()
            for line in (b"EHLO t", b"MAIL FROM:<noreply@moodle.test>", b"RCPT TO:<a@x.org>"):
                writer.write(line + b"\r\n")
                while (await reader.readline())[3:4] == b"-":
                    pass
            writer.write(b"DATA\r\n")
            await reader.readline()
            writer.write(body + b".\r\n")
            return (await reader.readline()).decode()[:9]
        finally:
            writer.close()

    bigs = await asyncio.gather(*(one(big) for _ in range(large)))
    await asyncio.sleep(1.0)  # the checkpoint copies what they put in the WAL
    return list(bigs), [await one(little) for _ in range(small)]


async def test_large_mails_leave_the_reserve_to_moodles_small_ones(
    tmpfs: Path,
    start_relay: Callable[..., Awaitable[Running]],
) -> None:
    """Ten 400 KB mails at once on the 6 MB spool disk, over the memory budget (so they
    spill), `spill_min_free` 2 MB; nothing delivers. The reserve counted the spill file
    alone, but an accepted body is written again into the WAL and then the database: the
    disk filled at the checkpoint and every Moodle mail after got 451. Each spill now
    counts those copies too: some large mails get 452 4.3.1, and the twenty small mails
    after them are all accepted."""
    running = await start_relay(
        spool=str(tmpfs / "spool"),
        limits={"max_data_in_memory": 100_000, "spill_min_free": 2_000_000, "spool_min_free": 0},
        upstream={"host": "127.0.0.1", "port": 9},
    )
    bigs, smalls = await large_then_small(running.port, 10, 20)
    print(f"large: {Counter(bigs)}, small: {Counter(smalls)}, free: {free_bytes(tmpfs)}")
    assert {"250 2.0.0"} == set(smalls)
    assert "452 4.3.1" in bigs


def test_mail_that_fills_the_spools_own_disk_leaves_room_to_deliver_it(
    tmpfs: Path,
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
) -> None:
    """The original host down and Moodle sending on until the spool's own mail fills its
    disk: past `spool_min_free` each client gets 452 4.3.1 (never a 451: no commit fails),
    and once the host is back everything drains and mail is taken again, with no restart.
    Without the floor the disk filled to the last block: claims, outcomes and checkpoints
    could not commit, nothing drained, `relay queue delete` could not free space, and
    every mail got 451 until an admin freed space elsewhere on that file system."""
    spool = tmpfs / "spool"
    capture.stop()  # the host is down (its port stays ours)
    config = write_config(
        spool=str(spool),
        ses={"enabled": False},
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        retry={"schedule": [1], "max_age": 600},
        limits={"spool_min_free": 3_000_000},
    )
    relay = relay_process(config).start()
    senders = Senders(relay.port, MailFactory("selffull", pad=PAD), threads=CLIENTS, pause=0.01)
    senders.start()
    try:
        wait_until(
            lambda: all(any(r.text == NO_ROOM for r in rs) for rs in senders.seen()),
            "452 4.3.1 for every client",
            timeout=60,
        )
    finally:
        senders.stop()
    refused = Counter(r.text for rs in senders.seen() for r in rs if r.code != 250)
    capture.start()  # the host is back
    final = wait_rows(spool, senders.queue_ids(), DONE, timeout=60)
    again = try_send(relay.port, MailFactory("selffull-after")())
    assert relay.proc is not None and relay.proc.poll() is None, relay.log()
    assert 0 == relay.stop()
    print(f"accepted {len(senders.acked)}, refused {dict(refused)}, free {free_bytes(tmpfs)}")
    assert {NO_ROOM} == set(refused)
    assert {q: "sent" for q in final} == {q: row["state"] for q, row in final.items()}
    assert 250 == again.code, again
    assert "ok" == spool_contents(spool)[0]
