"""The /metrics, /healthz and /readyz endpoints: a small HTTP/1.1 server on the event loop.

Bounded as everything a client controls: a request arrives whole within REQUEST_TIME, its
lines are at most MAX_LINE bytes, at most MAX_HEADERS headers, MAX_CONNECTIONS at a time.
When that many are open, a new connection takes the place of the oldest one still sending
its request: clients holding connections open without a request (a slowloris) cannot keep
a health probe or a scrape out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay.metrics import exposition

log = logging.getLogger("relay.metrics")

Check = Callable[[], Awaitable[bool]]  # /readyz's question: is relay ready?

REQUEST_TIME = 5.0  # seconds a client gets to send its whole request
MAX_LINE = 8192  # bytes of the request line or one header line
MAX_HEADERS = 100
MAX_CONNECTIONS = 64  # at a time (relay.receive.caps reserves them); see above
READY_FOR = 1.0  # seconds a /readyz answer is kept: the check commits to the spool, through
# the writer SMTP's acceptances use (a probe flood made the 250 path 4x slower)


class _BadRequest(Exception):
    """The request broke one of the limits above."""


class _Kept:
    """A readiness check run at most once per READY_FOR seconds: the answer is kept that
    long, and the probes that come while it runs share that run."""

    def __init__(self, check: Check) -> None:
        self._check = check
        self._answer = False
        self._at = -READY_FOR
        self._running: asyncio.Future[bool] | None = None

    async def __call__(self) -> bool:
        if time.monotonic() - self._at < READY_FOR:
            return self._answer
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._running)  # a probe that gives up leaves the run

    async def _run(self) -> bool:
        try:
            self._answer = await self._check()
            self._at = time.monotonic()
            return self._answer
        finally:
            self._running = None


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and the path of a request; the headers are read (bounded) and ignored."""
    try:
        request = await reader.readline()
        for _ in range(MAX_HEADERS):
            if await reader.readline() in (b"\r\n", b"\n", b""):
                break
        else:
            raise _BadRequest("too many header lines")
    except (ValueError, asyncio.LimitOverrunError) as exc:  # a line over MAX_LINE
        raise _BadRequest("line too long") from exc
    parts = request.decode("latin-1").split()
    return (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")


async def serve_http(
    host: str,
    port: int,
    *,
    ready: Check,
    text: Callable[[], Awaitable[bytes]] = exposition,
    details: Callable[[], Awaitable[str]] | None = None,
) -> asyncio.Server:
    """Start the metrics endpoint; /readyz answers 503 while `ready()` is False.

    `text()` renders /metrics (see `exposition`); `details()` adds lines after /readyz's
    "ready" (the SES bounce and complaint rates), informative only. A request must arrive
    whole within REQUEST_TIME, with lines of at most MAX_LINE bytes and at most MAX_HEADERS
    headers (else 400 or a plain close); at most MAX_CONNECTIONS are served at a time, a new
    one taking the place of the oldest still sending its request. A bad request never logs a
    traceback.
    """
    open_now = 0
    reading: dict[asyncio.StreamWriter, None] = {}  # still sending their request, oldest first
    ready = _Kept(ready)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        if open_now >= MAX_CONNECTIONS:
            if not reading:  # all of them being answered: they end within REQUEST_TIME
                writer.transport.abort()
                return
            oldest = next(iter(reading))
            del reading[oldest]
            oldest.transport.abort()  # its handler ends (and counts itself out) at once
        open_now += 1
        reading[writer] = None
        flushed = False
        try:
            try:
                async with asyncio.timeout(REQUEST_TIME):
                    method, path = await _read_request(reader)
                reading.pop(writer, None)
                if method in ("GET", "HEAD"):
                    status, ctype, body = await _route(path, ready, text, details)
                else:  # a POST or a DELETE was answered as a GET
                    status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            except _BadRequest as exc:
                method, status, ctype = "", "400 Bad Request", "text/plain"
                body = f"{exc}\n".encode()
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            if writer.transport.is_closing():  # dropped for a newer one, or reset: on uvloop
                return  # write() would raise RuntimeError
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            async with asyncio.timeout(REQUEST_TIME):
                await writer.drain()
            flushed = True
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            reading.pop(writer, None)
            open_now -= 1
            # A client that does not read its answer: close() alone waits until it does,
            # holding the connection (and a descriptor) outside MAX_CONNECTIONS, unbounded.
            writer.close()
            if flushed:  # drain() leaves up to 64 KiB buffered: REQUEST_TIME more for it
                asyncio.get_running_loop().call_later(REQUEST_TIME, writer.transport.abort)
            else:
                writer.transport.abort()

    return await asyncio.start_server(handle, host, port, limit=MAX_LINE)


async def _route(
    path: str,
    ready: Check,
    render: Callable[[], Awaitable[bytes]],
    details: Callable[[], Awaitable[str]] | None = None,
) -> tuple[str, str, bytes]:
    text = "text/plain; charset=utf-8"
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, await render()
    if path == "/healthz":
        return "200 OK", text, b"ok\n"
    if path == "/readyz":
        try:
            ok = await asyncio.wait_for(ready(), 5)
        except Exception as exc:  # a readiness probe reports, it never crashes the server
            log.warning("event=readyz_error error=%r", exc)
            ok = False
        if not ok:
            return "503 Service Unavailable", text, b"no\n"
        extra = ""
        if details is not None:
            try:
                extra = await asyncio.wait_for(details(), 5)
            except Exception as exc:  # details never turn a ready answer into an error
                log.warning("event=readyz_details_error error=%r", exc)
        return "200 OK", text, b"ready\n" + extra.encode()
    return "404 Not Found", text, b"not found\n"
