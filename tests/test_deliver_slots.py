"""One route that hangs holds none of the other's mail (relay.deliver.slots): a host that
takes the mail and never answers the dot, an SES endpoint that never answers. Real SMTP,
the fake SES, the service in the test's loop; SLOT_MARGIN scaled down to 0.5 s."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relay.deliver import slots
from relay.deliver.slots import Slots
from relay.rules import Route
from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.relays import Start
from tests.support.smtp import asend
from tests.support.spools import await_rows, rows

pytestmark = pytest.mark.usefixtures("aws_env")

RULES = """default: upstream
rules:
  - name: reminders
    route: ses
    match: {subject: '^Reminder'}
"""
SENDER = "noreply@moodle.test"


class HangsAfterTheDot:
    """An original host that takes each mail's bytes and never answers the final dot
    (until `release`: then it hangs up)."""

    def __init__(self) -> None:
        self.dots = 0
        self.release = asyncio.Event()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 host.test ESMTP\r\n")
        while line := await reader.readline():
            if line[:4].upper() == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                self.dots += 1
                await self.release.wait()  # no reply before
                break
            writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()
        await writer.wait_closed()


class Silent:
    """An endpoint that takes connections and never answers (until `release`)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.release.wait()
        writer.close()
        await writer.wait_closed()


async def closed(server: asyncio.Server, release: asyncio.Event) -> None:
    """Release every session of `server`, let them end, close it."""
    release.set()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.2)


async def mails(port: int, subject: str, count: int) -> list[str]:
    return [
        await asend(
            port, SENDER, [f"u{n}@example.org"], f"Subject: {subject} {n}\r\n\r\nx\r\n".encode()
        )
        for n in range(count)
    ]


@pytest.mark.system
@pytest.mark.parametrize("deliverers", [4, 16])
async def test_a_host_that_never_answers_the_dot_holds_no_ses_mail(
    start_relay: Start,
    fake_ses: FakeSes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deliverers: int,
) -> None:
    """`deliverers` + 8 forum mails for a host that never answers the dot, then a reminder
    for SES. Before, the sends held every slot for 600 s (Postfix's
    smtp_data_done_timeout), and the reminder waited with them. Now `deliverers`
    connections wait on the host, no more; the forum mail after them is deferred untried
    ("not tried, all 4 connections ...") and the reminder goes through SES at once (with
    16, the spare came free and was never claimed again, once)."""
    monkeypatch.setattr(slots, "SLOT_MARGIN", 0.5)
    host = HangsAfterTheDot()
    server = await asyncio.start_server(host.session, "127.0.0.1", 0)
    (tmp_path / "rules.yaml").write_text(RULES)
    relay = await start_relay(
        deliver=True,
        rules="rules.yaml",
        deliverers=deliverers,
        upstream={"host": "127.0.0.1", "port": server.sockets[0].getsockname()[1], "timeout": 1},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 100},
    )
    try:
        forum = await mails(relay.port, "Forum post", deliverers + 8)
        started = time.monotonic()
        [reminder] = await mails(relay.port, "Reminder", 1)
        await await_rows(relay.settings.spool, [reminder], {"sent"}, within=10)
        took = time.monotonic() - started
        found = rows(relay.settings.spool)
        deferred = [q for q in forum if found[q]["state"] == "deferred"]
    finally:
        await closed(server, host.release)
    print(f"reminder sent after {took:.1f}s; {host.dots} dots unanswered; deferred {deferred}")
    assert (deliverers, 1, True) == (host.dots, fake_ses.calls, took < 5)
    said = f"not tried, all {deliverers} connections to the original host"
    assert deferred and all(said in found[q]["reply"] for q in deferred)


@pytest.mark.system
async def test_an_ses_endpoint_that_never_answers_holds_no_upstream_mail(
    start_relay: Start,
    capture: CaptureServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forty reminders for an SES endpoint that takes connections and never answers
    (`ses.timeout` 2 s), then a forum mail for the original host, `deliverers: 4`. Before,
    the forum mail waited for ten rounds of four timed-out SES calls (20 s). Now four SES
    calls wait, no more; the reminders after them are retried later untried, and the forum
    mail reaches the host at once."""
    monkeypatch.setattr(slots, "SLOT_MARGIN", 0.5)
    endpoint = Silent()
    silent = await asyncio.start_server(endpoint.session, "127.0.0.1", 0)
    (tmp_path / "rules.yaml").write_text(RULES)
    relay = await start_relay(
        deliver=True,
        rules="rules.yaml",
        deliverers=4,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={
            "region": REGION,
            "endpoint_url": f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}",
            "timeout": 2,
            "fallback_after": 600,
        },
    )
    try:
        await mails(relay.port, "Reminder", 40)
        started = time.monotonic()
        [forum] = await mails(relay.port, "Forum post", 1)
        await await_rows(relay.settings.spool, [forum], {"sent"}, within=15)
        took = time.monotonic() - started
    finally:
        await closed(silent, endpoint.release)
    print(f"forum mail at the original host after {took:.1f}s")
    assert took < 8


async def test_a_slot_comes_free_or_the_route_is_busy_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two slots of a route: a third send waits for one to come free; one that waits past
    the route's timeout and SLOT_MARGIN gets none, and the route is busy (mail deferred at
    once) for BUSY_FOR. The other route is not concerned."""
    monkeypatch.setattr(slots, "SLOT_MARGIN", 0.1)
    now = [0.0]
    lanes = Slots(clock=lambda: now[0])
    assert [True, True] == [await lanes.take(Route.UPSTREAM, 2, 0.1) for _ in range(2)]
    waiting = asyncio.create_task(lanes.take(Route.UPSTREAM, 2, 0.1))
    await asyncio.sleep(0.05)
    lanes.give(Route.UPSTREAM)
    assert (True, 2) == (await waiting, lanes.in_flight(Route.UPSTREAM))
    assert (False, True) == (
        await lanes.take(Route.UPSTREAM, 2, 0.1),
        lanes.busy(Route.UPSTREAM),
    )
    assert (True, False) == (await lanes.take(Route.SES, 2, 0.1), lanes.busy(Route.SES))
    now[0] += slots.BUSY_FOR
    assert not lanes.busy(Route.UPSTREAM)


class Slow:
    """An original host that takes `seconds` to answer each mail's dot; mails counted."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.taken = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 host.test ESMTP\r\n")
        while line := await reader.readline():
            if line[:4].upper() == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            if line[:4].upper() == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                await asyncio.sleep(self.seconds)
                self.taken += 1
            writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()


@pytest.mark.system
async def test_a_slow_host_gets_its_mail_in_turn_none_deferred(
    start_relay: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that works but takes 1.2 s a mail, `deliverers: 4`, twenty mails. With a
    fixed 10 s wait for a slot, a host slower than that (scaled here: a 1 s wait) had
    mails deferred untried in waves of `deliverers`, each wave up the retry schedule
    (60, 360, 1260 s) though the host took every mail it got. The wait is the route's
    own timeout (3 s here) and a margin: every mail waits its turn and is sent, none
    deferred, in about the time the host needs."""
    monkeypatch.setattr(slots, "SLOT_MARGIN", 0.5)
    host = Slow(1.2)
    server = await asyncio.start_server(host.session, "127.0.0.1", 0)
    relay = await start_relay(
        deliver=True,
        deliverers=4,
        upstream={"host": "127.0.0.1", "port": server.sockets[0].getsockname()[1], "timeout": 3},
        ses={"enabled": False},
    )
    try:
        started = time.monotonic()
        sent = await mails(relay.port, "Forum post", 20)
        found = await await_rows(relay.settings.spool, sent, {"sent"}, within=30)
        took = time.monotonic() - started
    finally:
        server.close()
    events = [e for row in found.values() for e, _ in row["events"]]
    print(f"20 mails through a 1.2 s host with 4 slots in {took:.1f}s")
    assert (20, 0) == (host.taken, events.count("deferred"))
    assert took < 20 * 1.2 / 4 + 4
