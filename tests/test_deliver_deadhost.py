"""A dead original host costs one connection attempt, not one per message.

After a connection to the original host fails, the delivery loop defers mail
without trying for a few seconds (like Postfix's dead-host cache), so a backlog
against a dead host does not turn into a storm of connection attempts.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.capture import CaptureServer
from tests.support.relays import Start
from tests.support.smtp import asend
from tests.support.spools import await_rows
from tests.support.tls import TlsFiles, server_context

RAW = b"Subject: backlog\r\nMessage-ID: <{n}@moodle.test>\r\n\r\nbody\r\n"


async def twenty_mails(port: int) -> list[str]:
    """Twenty mails into relay at `port`, one after the other: their queue ids."""
    raws = [RAW.replace(b"{n}", str(n).encode()) for n in range(20)]
    return [await asend(port, "noreply@moodle.test", ["a@example.org"], raw) for raw in raws]


async def test_busy_host_is_not_hammered(start_relay: Start) -> None:
    """A host greeting 421 gets at most `deliverers` connections for 20 mails sent at once;
    every mail is deferred with a reply saying why."""
    connections = 0

    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"421 4.3.2 too busy\r\n")
        await writer.drain()
        writer.close()

    host = await asyncio.start_server(busy, "127.0.0.1", 0)
    port = host.sockets[0].getsockname()[1]
    try:
        relay = await start_relay(
            deliver=True,
            deliverers=4,
            ses={"enabled": False},
            upstream={"host": "127.0.0.1", "port": port, "timeout": 5},
        )
        ids = await twenty_mails(relay.port)
        found = await await_rows(relay.settings.spool, ids, {"deferred"})
    finally:
        host.close()
    untried = [r for r in found.values() if r["reply"].startswith("not tried")]
    print(f"dead host: 20 mails, {connections} connections, {len(untried)} deferred untried")
    assert 1 <= connections <= 4
    assert 20 - connections <= len(untried)
    assert all("421" in r["reply"] for r in found.values())


async def test_a_refused_login_is_not_tried_again_for_every_mail(
    start_relay: Start, monkeypatch: pytest.MonkeyPatch, tls_files: TlsFiles
) -> None:
    """A wrong (or rotated) upstream password: each mail opened its own connection and
    failed AUTH, two logins each (aiosmtplib tries every mechanism offered), 200 for 100
    mails in seconds: what locks the site's mail account (fail2ban, Microsoft 365's smart
    lockout). A session that cannot be set up now pauses the host as a dead one does,
    as Postfix's smtp_sess_fail does."""
    monkeypatch.setenv("UPSTREAM_PASSWORD", "wrong")
    context = server_context(tls_files)
    with CaptureServer(login=(b"moodle", b"s3cret"), tls="starttls", tls_context=context) as host:
        relay = await start_relay(
            deliver=True,
            deliverers=2,
            ses={"enabled": False},
            upstream={
                "host": "127.0.0.1",
                "port": host.port,
                "timeout": 5,
                "security": "starttls",
                "verify_tls": False,
                "username": "moodle",
                "password_env": "UPSTREAM_PASSWORD",
            },
        )
        ids = await twenty_mails(relay.port)
        found = await await_rows(relay.settings.spool, ids, {"deferred"})
    print(f"refused login: 20 mails, {len(host.logins)} logins")
    assert 1 <= len(host.logins) <= 2 * 2  # the two slots' first tries, each mechanism
    assert all("535" in r["reply"] for r in found.values())
