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


async def ask(port: int, request: bytes) -> bytes:
    """One request on a connection of its own; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    return answer


async def test_readyz_is_checked_once_a_second_however_many_ask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The readiness check commits to the spool, through the writer SMTP's acceptances use:
    2,400 probes a second made the 250 path four times slower. Fifty probes at once share
    one check, the answer is kept READY_FOR seconds, then checked again. A POST is 405 (it
    was answered as a GET), a HEAD has no body."""
    monkeypatch.setattr(http, "READY_FOR", 0.5)
    checks = 0

    async def ready() -> bool:
        nonlocal checks
        checks += 1
        await asyncio.sleep(0.1)  # a commit
        return True

    server = await http.serve_http("127.0.0.1", 0, ready=ready)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = b"GET /readyz HTTP/1.1\r\n\r\n"
        answers = await asyncio.gather(*(ask(port, probe) for _ in range(50)))
        kept = checks
        await asyncio.sleep(0.6)
        again = await ask(port, probe)
        posted = await ask(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
        head = await ask(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    finally:
        server.close()
        await server.wait_closed()
    assert ({True}, 1, 2) == ({a.endswith(b"\r\n\r\nready\n") for a in answers}, kept, checks)
    assert again.endswith(b"ready\n")
    assert posted.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
