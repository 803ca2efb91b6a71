"""The original host's connections between mails, for the upstream route.

    UpstreamClient.send --take()--> a Connection (or room for a new one) --release()/retire()

Connections are reused, as Postfix's smtp client does: after a completed DATA
the connection waits up to REUSE_IDLE seconds for the next mail (no new TCP,
TLS, EHLO and AUTH per message), and is closed with QUIT after REUSE_LIMIT
mails, REUSE_FOR seconds, or any error.

A host that limits the connections it takes from one client (Postfix's
smtpd_client_connection_count_limit, Exim's smtp_accept_max_per_host, a 421
greeting past it) is up, not down: a busy greeting while other connections to
it are open sets a cap at their number for BUSY_FOR seconds (`cap_at_open`), and
the mail waits for one of them (`wait_for_room`) instead of being deferred
(Postfix's qmgr lowers the destination's concurrency, and calls the host dead
only when every connection fails). A busy greeting with no connection open is an
unreachable host (`others_got_in` is False).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiosmtplib

REUSE_IDLE = 2.0  # seconds an idle connection waits for the next mail (Postfix: 2 s)
REUSE_LIMIT = 100  # mails per connection, then QUIT
REUSE_FOR = 300.0  # seconds a connection is used at most (Postfix: 300 s)
BUSY_FOR = 60.0  # seconds a connection cap learnt from a busy greeting holds


@dataclass(slots=True)
class Connection:
    smtp: aiosmtplib.SMTP
    opened: float  # time.monotonic()
    used: int = 0  # mails sent on it
    idle_since: float = 0.0
    closed: bool = False


class Pool:
    """The open connections to one host, idle ones for reuse, and the host's cap on them."""

    def __init__(self) -> None:
        self._idle: list[Connection] = []  # open, between mails; the newest last
        self._closing: set[asyncio.Task[None]] = set()
        self.open = 0  # connections open now, in use or idle
        self.cap = 0  # the host's limit on them, learnt from a busy greeting (0: none) ...
        self._cap_until = 0.0  # ... until then (monotonic)
        self._room: list[asyncio.Future[None]] = []  # sends waiting for a connection
        self._connecting = 0  # connections being set up
        self._connect_ended = asyncio.Event()

    def take(self) -> Connection | None:
        """The newest idle connection still fit for a mail; the stale ones are retired."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.smtp.is_connected and now - conn.idle_since < REUSE_IDLE:
                return conn
            self.retire(conn)
        return None

    @contextlib.contextmanager
    def connecting(self) -> Iterator[None]:
        """Around the setup of a new connection, until it has its answer."""
        self._connecting += 1
        try:
            yield
        finally:
            self._connecting -= 1  # the others need not wait for this one any longer
            self._connect_ended.set()

    def added(self, smtp: aiosmtplib.SMTP) -> Connection:
        """A new connection the host took (under a cap, the cap grows to it)."""
        self.open += 1
        self.cap = max(self.cap, self.open) if self.cap else 0
        return Connection(smtp, opened=time.monotonic())

    async def others_got_in(self, deadline: float) -> bool:
        """After a busy greeting: whether relay has another connection to the host, once
        the connects under way beside this one have ended (a burst of them at the start)."""
        while not self.open and self._connecting and time.monotonic() < deadline:
            self._connect_ended.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._connect_ended.wait()
        return self.open > 0

    def cap_at_open(self) -> int:
        """The host said busy while relay has connections open: that many, for BUSY_FOR."""
        self.cap, self._cap_until = self.open, time.monotonic() + BUSY_FOR
        return self.cap

    def full(self) -> bool:
        """At the host's connection cap (a busy greeting within BUSY_FOR seconds)."""
        return bool(self.cap) and time.monotonic() < self._cap_until and self.open >= self.cap

    async def wait_for_room(self, deadline: float) -> bool:
        """Until a connection is freed or closed (True), or `deadline` passes (False)."""
        room = asyncio.get_running_loop().create_future()
        self._room.append(room)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await room
            return True
        except TimeoutError:
            return False
        finally:
            if room in self._room:
                self._room.remove(room)

    def release(self, conn: Connection) -> None:
        """After a completed DATA: kept for the next mail, unless it has served its time."""
        now = time.monotonic()
        if conn.used >= REUSE_LIMIT or now - conn.opened >= REUSE_FOR:
            self.retire(conn)
            return
        conn.idle_since = now
        self._idle.append(conn)
        asyncio.get_running_loop().call_later(REUSE_IDLE, self._expire)
        self._wake()

    def closed(self, conn: Connection) -> None:
        """`conn` is gone (closed by us after an error, or retired)."""
        if not conn.closed:
            conn.closed = True
            self.open -= 1
            self._wake()

    def retire(self, conn: Connection) -> None:
        """QUIT in the background; the outcome of every mail on it is already known."""
        self.closed(conn)

        async def quit_() -> None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                if conn.smtp.is_connected:
                    await conn.smtp.quit()
            conn.smtp.close()

        task = asyncio.get_running_loop().create_task(quit_())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, grace: float) -> None:
        """QUIT every idle connection (at stop), waiting at most `grace` seconds."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self.retire(conn)
        if self._closing:
            await asyncio.wait(self._closing, timeout=grace)

    def _wake(self) -> None:
        """A connection was freed or closed: the longest waiting send looks again."""
        while self._room:
            room = self._room.pop(0)
            if not room.done():
                room.set_result(None)
                return

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._idle if now - c.idle_since >= REUSE_IDLE]:
            self._idle.remove(conn)
            self.retire(conn)
