"""The tests' "original host": an aiosmtpd capture server on 127.0.0.1, port 0.

`CaptureServer` runs on its own thread and event loop, so sync tests, async tests
and a `relay serve` subprocess can all deliver to it while the test blocks. It
records every envelope with the bytes exactly as received, answers scripted
4xx/5xx replies, and can be stopped and started again on the same port (the
original host down for a while):

    with CaptureServer() as capture:
        capture.data_reply = "451 4.3.0 try later"   # every DATA, until set to None
        capture.refuse_rcpt("b@example.org", "550 5.1.1 no such user", times=1)
        capture.stop(); capture.start()              # same port
        capture.wait_for(3)                          # three messages, or AssertionError

It speaks plain SMTP by default; `tls="starttls"` (required before MAIL) or `tls="tls"`
(implicit TLS) with a `tls_context`, and `login=(user, password)` to require AUTH, make
it a host that a real relay would log in to:

    CaptureServer(tls="starttls", tls_context=context, login=(b"moodle", b"s3cret"))

Standalone, for a process that needs one (prints the port, then one JSON line per message):

    python -m tests.support.capture --port 0

The `capture` fixture (a pytest plugin of tests/conftest.py) gives a running one per test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from typing import Any, Self

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOSTNAME = "capture"
ACCEPTED = "250 2.0.0 Ok: captured"
_TRACE_ID = re.compile(rb"^Received: [^\r\n]*\r\n\tby \S+ \(relay\) with \S+ id (\w+);")


def trace_queue_id(content: bytes) -> str | None:
    """The relay queue id named in the Received: line relay puts on top of `content`."""
    found = _TRACE_ID.match(content)
    return found.group(1).decode() if found else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Captured:
    """One message the capture server accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes  # as received after DATA: relay's Received: line, then the original bytes
    at: float  # time.time() when DATA was accepted
    tls: bool = False  # the session was encrypted (STARTTLS or implicit TLS)
    login: bytes | None = None  # the user the session authenticated as
    mail_options: tuple[str, ...] = ()  # MAIL FROM's parameters (BODY=8BITMIME, SMTPUTF8)

    @property
    def queue_id(self) -> str | None:
        return trace_queue_id(self.content)

    @property
    def message_id(self) -> str:
        return str(BytesHeaderParser().parsebytes(self.content).get("Message-ID", "")).strip()


@dataclass
class _Refusal:
    reply: str
    times: int | None  # None: every time


class _Busy(asyncio.Protocol):
    """Postfix's smtpd past smtpd_client_connection_count_limit: a 421 greeting, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.7.0 relay.test Error: too many connections from 127.0.0.1\r\n")
        transport.close()


@dataclass
class CaptureServer:
    """An SMTP server that keeps what it gets; `port` stays the same across stop/start."""

    host: str = "127.0.0.1"
    port: int = 0
    mail_reply: str | None = None  # answer MAIL FROM with this instead of 250
    data_reply: str | None = None  # answer DATA with this (nothing recorded) instead of 250
    accepted_reply: str = ACCEPTED  # the 250 to a DATA that was recorded
    on_message: Callable[[Captured], None] | None = None
    tls: str = "none"  # "starttls" (required before MAIL) or "tls" (implicit TLS)
    tls_context: ssl.SSLContext | None = None  # the server's certificate, unless tls="none"
    login: tuple[bytes, bytes] | None = None  # AUTH required, this (user, password) accepted
    size: int | None = None  # bytes: the SIZE offered and enforced (None: aiosmtpd's 32 MiB)
    data_attempts: int = 0  # DATA commands seen, refused ones included
    max_connections: int | None = None  # past this many open, a 421 greeting (then close)
    busy_greetings: int = 0  # those 421 greetings
    most_connections: int = 0  # the most sessions open at once
    logins: list[tuple[bytes, bytes]] = field(default_factory=list, init=False)  # AUTH tries
    sessions: list[SMTP] = field(default_factory=list, init=False)  # one per connection
    _messages: list[Captured] = field(default_factory=list, init=False, repr=False)
    _refusals: dict[str, _Refusal] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tls not in ("none", "starttls", "tls"):
            raise ValueError(f"tls={self.tls!r}: expected none, starttls or tls")
        if self.tls != "none" and self.tls_context is None:
            raise ValueError(f"tls={self.tls!r} needs a tls_context")
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="capture", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []

    # lifecycle

    def start(self) -> Self:
        """Listen (again) on `port`; port 0 picks a free one the first time."""
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: connects are refused until `start()`."""
        self._call(self._stop())

    def drop_connections(self) -> None:
        """Close every open connection, as a host does with idle ones; keep listening."""
        self._call(self._drop())

    def close(self) -> None:
        """Stop and end the thread."""
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._server is not None

    # what the tests script and read

    def refuse_rcpt(self, address: str, reply: str, *, times: int | None = None) -> None:
        """Answer RCPT TO `address` with `reply` (`times` times, or always)."""
        with self._lock:
            self._refusals[address] = _Refusal(reply, times)

    def accept_rcpt(self, address: str) -> None:
        """Take RCPT TO `address` again (undoes `refuse_rcpt`)."""
        with self._lock:
            self._refusals.pop(address, None)

    @property
    def messages(self) -> list[Captured]:
        with self._lock:
            return list(self._messages)

    def wait_for(self, count: int, *, timeout: float = 20.0) -> list[Captured]:
        """Messages once at least `count` arrived; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"capture got {len(self.messages)} messages, expected {count}")

    # aiosmtpd handler hooks (run on the capture thread)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        with self._lock:
            refusal = self._refusals.get(address)
            if refusal is not None and refusal.times is not None:
                refusal.times -= 1
                if refusal.times <= 0:
                    del self._refusals[address]
        if refusal is not None:
            return refusal.reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.data_attempts += 1
        if self.data_reply:
            return self.data_reply
        transport = server.transport
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        captured = Captured(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=envelope.original_content or b"",
            at=time.time(),
            tls=transport is not None and transport.get_extra_info("ssl_object") is not None,
            login=login,
            mail_options=tuple(envelope.mail_options),
        )
        with self._lock:
            self._messages.append(captured)
        if self.on_message is not None:
            self.on_message(captured)
        return self.accepted_reply

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword), f"AUTH {mechanism}: {data!r}"
        with self._lock:
            self.logins.append((data.login, data.password))
        ok = (data.login, data.password) == self.login
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    # internals

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _protocol(self) -> SMTP | _Busy:
        # Open or about to be (connection_made comes later): what a per-client limit counts.
        self._protocols = [p for p in self._protocols if p.session is None or p.transport]
        if self.max_connections is not None and len(self._protocols) >= self.max_connections:
            with self._lock:
                self.busy_greetings += 1
            return _Busy()
        smtp = SMTP(
            self,
            hostname=HOSTNAME,
            tls_context=self.tls_context if self.tls == "starttls" else None,
            require_starttls=self.tls == "starttls",
            authenticator=self._authenticate if self.login else None,
            auth_required=self.login is not None,
            auth_require_tls=self.tls != "none",
            **({} if self.size is None else {"data_size_limit": self.size}),
        )
        # Keep the open sessions and the ones not connected yet (connection_made comes
        # later, so a burst of connects must not drop each other from the list).
        self._protocols.append(smtp)
        with self._lock:
            self.sessions.append(smtp)
            self.most_connections = max(self.most_connections, len(self._protocols))
        return smtp

    async def _start(self) -> None:
        if self._server is not None:
            return
        self._server = await self._loop.create_server(
            self._protocol,
            self.host,
            self.port,
            reuse_address=True,
            ssl=self.tls_context if self.tls == "tls" else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._drop()
        self._protocols.clear()
        await self._server.wait_closed()
        self._server = None

    async def _drop(self) -> None:
        # close() takes effect on a later turn of the loop, and a connection accepted just
        # before stop() gets its connection_made later still (its transport would be left
        # open, a ResourceWarning in some later test): close every transport that shows
        # up until every session has begun and ended (connections the relay keeps open
        # between mails, too), for a second at most.
        for _ in range(100):
            open_ = [p for p in self._protocols if p.transport is not None]
            for protocol in open_:
                assert protocol.transport is not None
                protocol.transport.close()
            if not open_ and all(p.session is not None for p in self._protocols):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the sessions' cancelled tasks finish


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    """A running capture server for one test (the relay's `upstream`)."""
    with CaptureServer() as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description="aiosmtpd capture server for relay tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    def emit(msg: Captured) -> None:
        line = {
            "mail_from": msg.mail_from,
            "rcpt_tos": list(msg.rcpt_tos),
            "at": msg.at,
            "content": base64.b64encode(msg.content).decode(),
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with CaptureServer(host=args.host, port=args.port, on_message=emit) as capture:
        print(capture.port, flush=True)
        done.wait()


if __name__ == "__main__":
    main()
