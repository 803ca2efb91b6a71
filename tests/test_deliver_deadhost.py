"""A dead original host costs one connection attempt, not one per message.

After a connection to the original host fails, the delivery loop defers mail
without trying for a few seconds (like Postfix's dead-host cache), so a backlog
against a dead host does not turn into a storm of connection attempts.
"""

from __future__ import annotations

import asyncio

from tests.support.relays import Start
from tests.support.smtp import asend
from tests.support.spools import await_rows

RAW = b"Subject: backlog\r\nMessage-ID: <{n}@moodle.test>\r\n\r\nbody\r\n"


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
        ids = [
            await asend(
                relay.port,
                "noreply@moodle.test",
                ["a@example.org"],
                RAW.replace(b"{n}", str(n).encode()),
            )
            for n in range(20)
        ]
        found = await await_rows(relay.settings.spool, ids, {"deferred"})
    finally:
        host.close()
    untried = [r for r in found.values() if r["reply"].startswith("not tried")]
    print(f"dead host: 20 mails, {connections} connections, {len(untried)} deferred untried")
    assert 1 <= connections <= 4
    assert 20 - connections <= len(untried)
    assert all("421" in r["reply"] for r in found.values())
