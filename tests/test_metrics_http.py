"""relay.metrics.http on a real socket, in this process: a client that asks and never reads."""

# STYLE.md asserts read `expected == actual`; ruff's SIM300 calls that Yoda.

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
import uvloop

from relay.metrics import http

BODY = 8 << 20  # bytes of /metrics: far more than the socket buffers hold


async def test_a_client_that_never_reads_its_answer_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its answer not taken within REQUEST_TIME, the connection is dropped, not closed
    gracefully: asyncio's close() waited for the client to read it all, so each such client
    kept a connection and a descriptor, outside MAX_CONNECTIONS, for as long as it liked."""
    monkeypatch.setattr(http, "REQUEST_TIME", 0.3)

    async def text() -> bytes:
        return b"x" * BODY

    server = await http.serve_http("127.0.0.1", 0, ready=lambda: True, text=text)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
    await asyncio.sleep(1.0)  # past REQUEST_TIME, reading nothing
    client.setblocking(False)
    got = 0
    loop = asyncio.get_running_loop()
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 2.0):
            got += len(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert got < BODY // 2, got


def test_a_connection_dropped_for_a_newer_one_ends_without_an_error() -> None:
    """MAX_CONNECTIONS clients each send one byte, then one more connects: the oldest is
    dropped to make room. Its handler then saw its request end and wrote a 404 to the dropped
    connection; on uvloop (relay serve's loop) that write raised RuntimeError, a traceback in
    relay's log for each connection a slowloris lost."""
    errors: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: errors.append(context["message"]))
        server = await http.serve_http("127.0.0.1", 0, ready=lambda: True)
        port = server.sockets[0].getsockname()[1]
        holders = []
        for _ in range(http.MAX_CONNECTIONS + 1):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"G")
            holders.append((reader, writer))
            await asyncio.sleep(0.01)
        oldest = holders[0][0]
        with contextlib.suppress(ConnectionResetError):
            assert b"" == await asyncio.wait_for(oldest.read(), 3)  # dropped, no answer
        await asyncio.sleep(0.2)  # its handler ends
        for _, writer in holders:
            writer.close()
        server.close()
        await server.wait_closed()

    uvloop.run(scenario())
    assert [] == errors
