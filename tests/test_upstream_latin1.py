"""An original host whose replies are not UTF-8 (a localized Postfix: "Empfänger unbekannt" in
Latin-1), on a real socket, delivered to by the real Deliverer, UpstreamClient and Spool.

aiosmtplib decodes replies with surrogateescape. The lone surrogate reached SQLite, whose
driver refused it: recording the outcome failed, the delivery loop deferred the whole mail
as an internal error, and the recipients the host had accepted got it again at every retry.
A DSN that cannot be built (the same surrogate met it too) must not do that either.
"""

# STYLE.md asserts read `expected == actual`; ruff's SIM300 calls that Yoda.

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from relay.deliver import dsn
from relay.deliver.loop import Deliverer
from relay.deliver.ses.circuit import Circuit
from relay.deliver.ses.route import SesRoute
from relay.deliver.upstream import UpstreamClient
from relay.rules import Route, RuleSet
from relay.settings import HostPort, Settings, Upstream
from relay.spool import DB_NAME, Spool

GOOD, BAD = "good@example.org", "bad@example.org"
RAW = b"Subject: hi\r\nMessage-ID: <1@moodle.test>\r\n\r\nbody\r\n"
REFUSED = b"550 5.1.1 <bad@example.org>: Empf\xe4nger unbekannt\r\n"
QUEUED = b"250 2.0.0 Ok: in Warteschlange gestellt (\xe4)\r\n"


class Latin1Host:
    """Just enough SMTP: RCPT TO `BAD` gets REFUSED, DATA gets `data_reply`; the copies each
    recipient got are counted."""

    def __init__(self, data_reply: bytes) -> None:
        self.data_reply = data_reply
        self.copies: dict[str, int] = {}

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 host.test ESMTP\r\n")
        accepted: list[str] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-host.test\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                accepted = []
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT" and BAD.encode() in line:
                writer.write(REFUSED)
            elif verb == b"RCPT":
                accepted.append(line.split(b"<")[1].split(b">")[0].decode())
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                for address in accepted:
                    self.copies[address] = self.copies.get(address, 0) + 1
                writer.write(self.data_reply)
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def host() -> AsyncIterator[tuple[Latin1Host, int]]:
    """The host, answering DATA with a Latin-1 250, and its port."""
    latin1 = Latin1Host(QUEUED)
    server = await asyncio.start_server(latin1.session, "127.0.0.1", 0)
    yield latin1, server.sockets[0].getsockname()[1]
    server.close()


async def deliver_three_times(tmp_path: Path, port: int, recipients: list[str]) -> list[str]:
    """One mail spooled, then what is due claimed and delivered three times over, as retries
    would be; the states of all rows afterwards (DSNs included), oldest first."""
    spool_dir = tmp_path / "spool"
    receiving = await Spool.open(spool_dir)
    delivering = await Spool.open(spool_dir, full_sync=False)
    settings = Settings(
        source=tmp_path / "relay.yaml",
        listen=HostPort(host="127.0.0.1", port=2525),
        spool=spool_dir,
        rules=tmp_path / "rules.yaml",
        upstream=Upstream(host="127.0.0.1", port=port),
        hostname="relay.test",
    )
    deliverer = Deliverer(
        settings=settings,
        spool=delivering,
        rules=RuleSet(source="rules.yaml", default=Route.UPSTREAM, rules=()),
        upstream=UpstreamClient(settings.upstream, hostname="relay.test"),
        ses_route=SesRoute(ses=None, pace=None, circuit=Circuit(300.0)),
        wakeup=delivering.wakeup,
    )
    queue_id = await receiving.add(
        sender="noreply@moodle.test",
        recipients=recipients,
        raw=RAW,
        peer="127.0.0.1",
        trace=b"Received: from moodle.test\r\n",
        message_id="<1@moodle.test>",
    )
    try:
        for _ in range(3):
            with closing(sqlite3.connect(spool_dir / DB_NAME)) as conn, conn:
                conn.execute("UPDATE messages SET due_at = 0 WHERE id = ?", (queue_id,))
            for mail in await delivering.claim(10):  # a DSN too, once there is one
                await deliverer._guarded(mail)
        await deliverer.drain(5.0)
    finally:
        await delivering.close()
        await receiving.close()
    with closing(sqlite3.connect(spool_dir / DB_NAME)) as conn:
        return [state for (state,) in conn.execute("SELECT state FROM messages ORDER BY rowid")]


async def test_a_latin1_reply_to_data_is_recorded_and_the_mail_sent_once(
    tmp_path: Path, host: tuple[Latin1Host, int]
) -> None:
    latin1, port = host
    states = await deliver_three_times(tmp_path, port, [GOOD])
    assert {GOOD: 1} == latin1.copies
    assert ["sent"] == states


async def test_a_latin1_refusal_beside_an_acceptance_sends_once_and_fails_at_once(
    tmp_path: Path, host: tuple[Latin1Host, int]
) -> None:
    """The accepted recipient gets one copy, and the sender one DSN about the refused one (it
    was neither sent nor ever written: the outcome could not be recorded)."""
    latin1, port = host
    states = await deliver_three_times(tmp_path, port, [GOOD, BAD])
    assert {GOOD: 1, "noreply@moodle.test": 1} == latin1.copies
    assert ["sent", "sent"] == states  # the mail, the DSN


async def test_a_latin1_refusal_of_every_recipient_fails_at_once_with_a_dsn(
    tmp_path: Path, host: tuple[Latin1Host, int]
) -> None:
    """A dead letter and a DSN at the first try, not deferred as an internal error until
    `max_age` (five days) with no word to the sender."""
    latin1, port = host
    assert ["failed", "sent"] == await deliver_three_times(tmp_path, port, [BAD])
    assert {"noreply@moodle.test": 1} == latin1.copies


async def test_a_dsn_that_cannot_be_built_does_not_send_the_mail_again(
    tmp_path: Path, host: tuple[Latin1Host, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in building the refused recipient's DSN is logged and the DSN left out; the
    outcome is recorded, and the accepted recipient gets one copy, not one per retry."""

    def broken(mail: object, failures: list[object], settings: object) -> None:
        if failures:  # as for_outcome: nothing to build without them
            raise RuntimeError("a bug in the DSN")

    monkeypatch.setattr(dsn, "for_outcome", broken)
    latin1, port = host
    states = await deliver_three_times(tmp_path, port, [GOOD, BAD])
    assert {GOOD: 1} == latin1.copies
    assert ["sent"] == states
