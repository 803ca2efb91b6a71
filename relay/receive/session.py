"""The SMTP connection: aiosmtpd's protocol with fast ACKs, network checks, named replies.

    listener --accept--> Session (this module, on guard.Guard) --hooks--> receive.Handler --> Spool

Moodle's PHPMailer writes DATA line by line with Nagle on; a delayed ACK here
would cost it ~40 ms per mail, so a Session re-arms TCP_QUICKACK after every
read of a DATA body (the event loop's transport, uvloop's or asyncio's, has
turned TCP_NODELAY on). Commands come whole in one write and their replies
carry the ACK, so reads outside DATA cost no system call for it. It also
refuses peers outside `allow_networks`, rewrites aiosmtpd's own replies to ones
with enhanced status codes, and lets the service close idle sessions at shutdown.

Three of aiosmtpd 1.4.6's hot spots are replaced by code that behaves the same
(tests/test_session_fast.py holds them to aiosmtpd's own): DATA is read a chunk at
a time (`Body`), not a line at a time; a new session reuses the introspection of
the first one (`relay.receive.introspect`); plain `<local@domain>` addresses skip
the RFC 5322 parser (`PLAIN_ADDRESS`). That code reaches into aiosmtpd's private attributes, so
this module refuses to load with an aiosmtpd other than the versions in
AIOSMTPD_CHECKED (pyproject pins the same range).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, AnyStr

import aiosmtpd
from aiosmtpd.smtp import MISSING, login_always_fail, syntax

from relay import logs, metrics
from relay.receive.budget import Budget
from relay.receive.caps import Caps
from relay.receive.data import Body, unread
from relay.receive.guard import OVERSHOOT, writable
from relay.receive.handler import (
    AIOSMTPD_REPLIES,
    NETWORK_REFUSED,
    SHUTTING_DOWN,
    TLS_ACTIVE,
    TOO_MANY_RECIPIENTS,
    Handler,
    Transaction,
)
from relay.receive.handshake import Handshake
from relay.receive.introspect import AuthMethods, Methods, discover
from relay.settings import Limits, Settings

# The aiosmtpd versions whose SMTP.__init__ and DATA handling this module re-creates, as
# tests/test_session_fast.py checked them side by side; pyproject pins the same range.
AIOSMTPD_CHECKED = ("1.4.6",)


def check_aiosmtpd(version: str) -> None:
    """ImportError unless `version` is one this module was checked against."""
    if version not in AIOSMTPD_CHECKED:
        raise ImportError(
            f"relay needs aiosmtpd {' or '.join(AIOSMTPD_CHECKED)} (its session code re-creates"
            f" that version's internals), but aiosmtpd {version} is installed:"
            f" pip install 'aiosmtpd=={AIOSMTPD_CHECKED[-1]}'"
        )


check_aiosmtpd(aiosmtpd.__version__)

log = logging.getLogger("relay.receive")
_SMTP_LOG = logging.getLogger("mail.log")  # aiosmtpd's logger, for the lines it would log
# Its warnings are a client's to cause ("aborted AUTH with '*'", a hundred a connection).
_SMTP_LOG.addFilter(logs.SampledByText())
_NETWORK_REFUSED = logs.Sampled(log, "refused", reason="allow_networks")  # a client's to cause

CHUNK = 65536  # DATA is read this much at a time, not a line at a time
YIELD_EVERY = 32  # replies after which a session lets the other sessions run (see `push`)

DEFAULT_LIMITS = Limits()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# What aiosmtpd's SMTP.__init__ sets alike in every relay session: ident "relay", bytes
# (decode_data=False), no SMTPUTF8, 300 s timeout, no PROXY, no command call limit,
# AUTH never required and (without relay's users) its built-in always-fail callback.
_SMTP_FIXED: dict[str, Any] = {
    "__ident__": "relay",
    "enable_SMTPUTF8": False,
    "_decode_data": False,
    "_timeout_duration": 300,
    "_timeout_handle": None,
    "_tls_handshake_okay": True,
    "_tls_protocol": None,
    "_original_transport": None,
    "session": None,
    "envelope": None,
    "transport": None,
    "_handler_coroutine": None,
    "_proxy_timeout": None,
    "_auth_callback": login_always_fail,
    "_authenticator": None,
    "_auth_required": False,
    "_enforce_call_limit": False,
}


class Session(Handshake):
    """aiosmtpd's SMTP protocol with fast ACKs, network checks and replies we name.

    `registry` (the listener's set of open sessions) lets the service close idle
    sessions at shutdown and wait for the ones in a transaction.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        registry: set[Session],
        caps: Caps | None = None,
        budget: Budget | None = None,
        spill_dir: Path | None = None,
        limits: Limits = DEFAULT_LIMITS,
        allow: tuple[Network, ...] = (),
        hostname: str,
        data_size_limit: int,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
    ) -> None:
        # aiosmtpd 1.4.6's SMTP.__init__ as it runs for relay's arguments (relay's server
        # TLS contexts draw none of its warnings), but with its introspection (inspect.getmembers,
        # dir, signature: the bulk of a new connection's cost) done once per pair of classes by
        # `_discover`. tests/test_session_fast.py compares it with aiosmtpd's own.
        vars(self).update(_SMTP_FIXED)
        self.loop = asyncio.get_running_loop()  # make_loop()'s answer in a protocol factory
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.command_size_limits.clear()  # a class attribute: every new session resets it
        self.hostname = hostname or socket.getfqdn()
        self.tls_context = tls_context
        self.require_starttls = tls_context and False  # aiosmtpd: "... and require_starttls"
        self._auth_require_tls = tls_context is not None  # AUTH after STARTTLS when offered
        found = discover(self, handler)
        # aiosmtpd declares these dicts and only reads them once its __init__ is done
        self._auth_methods = AuthMethods(self, handler, found.auth)  # type: ignore[assignment]
        _SMTP_LOG.info(found.auth_line)
        self._handle_hooks = Methods(handler, found.hooks)  # type: ignore[assignment]
        self._ehlo_hook_ver = found.ehlo
        self._smtp_methods = Methods(self, found.commands)  # type: ignore[assignment]
        self.registry = registry
        self.caps = caps
        self.budget = budget
        self.spill_dir = spill_dir
        self.spill_min_free = limits.spill_min_free
        self.allow = allow
        self._sock: socket.socket | None = None
        self._refused = False
        self._shut = False
        self._held: list[str] = []  # leading lines of a multi-line reply (see `push`)
        self._replies = 0
        self._in_data = False  # reading a DATA body: quick ACKs (see the module docstring)
        self._implicit = implicit_tls
        self._tcp: Any = None  # implicit TLS: the connection, until the handshake ends
        self._guard(caps=caps, limits=limits)

    def connection_made(self, transport: Any) -> None:
        if self._sock is None:  # first call: the TCP connection (again after STARTTLS)
            sock = transport.get_extra_info("socket")
            self._sock = sock
            peer = transport.get_extra_info("peername")
            if self.allow and not _allowed(peer, self.allow):
                self._refused = True
                metrics.REJECTED.labels("network").inc()
                _NETWORK_REFUSED(peer=str(peer and peer[0]))
                transport.write(f"{NETWORK_REFUSED.format(peer=peer[0])}\r\n".encode())
                transport.close()
                return
            if self.caps is not None and not self._admit(transport, peer):
                self._refused = True
                return
            self.registry.add(self)
            self._started = self._last_read = self.last_mail = self.loop.time()
            if self._implicit is not None:
                self.start_tls(transport)  # connection_made again once it is done
                return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._uncount()
        if self.session is None:  # implicit TLS, gone mid-handshake (uvloop tells us too)
            return
        super().connection_lost(error)

    def _create_envelope(self) -> Transaction:
        return Transaction()  # counts the RCPTs it accepted (Handler.handle_RCPT)

    def data_received(self, data: bytes) -> None:
        if self._in_data:  # Linux leaves quick-ack mode on its own; re-arm per read
            _quick_ack(self._sock)
        self._last_read = self.loop.time()  # the idle timeout runs from the last read
        super().data_received(data)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, once: it answered 220 inside TLS too, and each layer stacked
        another SSL protocol and its buffers on the connection (about 278 KiB); some 140
        layers deep its cleanup broke, leaving sessions no timeout could close."""
        if self._tls_protocol is not None or self._implicit is not None:
            await self.push(TLS_ACTIVE)  # a 5xx: junk, as Postfix counts it
            return
        await super().smtp_STARTTLS(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's DATA (decode_data=False), reading a chunk at a time.

        aiosmtpd reads the body with one `readuntil(b"\\r\\n")` and one debug log
        per line (half the CPU of a 20 KB mail); `Body` gives the same verdict,
        end of data and content from whole chunks. Bytes after the end-of-data
        line go back to the reader for aiosmtpd's command loop.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self._in_data = True  # from here the client may write line by line (see above)
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = Body(
            size_limit=self.data_size_limit,
            line_limit=self.line_length_limit,
            budget=self.budget,
            spill_dir=self.spill_dir,
            min_free=self.spill_min_free,
        )
        rest: bytes | None = None
        loaded = 0  # a spilled body read back whole, until spooled (Budget.load)
        try:
            with _roomy(self._reader), contextlib.closing(body):  # closing: the budget back
                while rest is None:
                    try:
                        chunk = await self._reader.read(CHUNK)
                        if body.spill_due:  # past limits.max_data_in_memory (see data.py)
                            await body.spill()
                    except asyncio.CancelledError:  # connection lost: eof_received cancels us
                        _SMTP_LOG.info("Connection lost during DATA")
                        self._writer.close()
                        raise
                    if not chunk:  # unreachable, as for aiosmtpd: EOF cancels first; its
                        raise asyncio.IncompleteReadError(b"", None)  # readuntil would raise this
                    rest = body.feed(chunk)
                self._in_data = False
                unread(self._reader, rest)
                if body.verdict is not None:
                    await self.push(body.verdict)
                    self._set_post_data_state()  # type: ignore[no-untyped-call]
                    return
                if body.spilled:
                    if self.budget is not None:
                        await self.budget.load(body.size)
                        loaded = body.size
                    reading = asyncio.ensure_future(asyncio.to_thread(body.content))
                    try:
                        content = await asyncio.shield(reading)
                    finally:  # cancelled (connection lost): the thread still reads the body
                        if not reading.done():
                            await asyncio.wait([reading])
                        del reading  # its result is the body too (see the unload below)
                else:
                    content = body.content()
            self.envelope.content = self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")
        finally:
            if loaded and self.budget is not None:
                content = b""  # the body's memory goes before unload may trim the heap
                self.envelope.content = self.envelope.original_content = None
                self.budget.unload(loaded)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if status is not MISSING and status.startswith("250"):
            self.junk = 0  # as Postfix: a mail accepted wipes the slate (PHPMailer RSETs)
            self.last_mail = self.loop.time()
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = PLAIN_ADDRESS.fullmatch(arg)
        if plain is not None and not self.local_part_limit:  # as the parser would answer
            return plain["address"], plain["rest"] or ""
        # aiosmtpd's parser raises on some malformed input (e.g. "<a@[192.0.2.1>"),
        # which would surface as INTERNAL_ERROR; it is a malformed address.
        try:
            return super()._getaddr(arg)
        except (AttributeError, IndexError, TypeError, ValueError):
            return None, None

    async def push(self, status: AnyStr) -> None:
        """Send a reply line, with our wording for aiosmtpd's own. The lines of a
        multi-line reply (EHLO's "250-...") go out together with its last line:
        one write, one packet, instead of one each."""
        if isinstance(status, str):
            status = AIOSMTPD_REPLIES.get(status, status)
            if status[3:4] == "-":
                self._held.append(status)
                return
            if self._held:
                status = "\r\n".join([*self._held, status])
                self._held.clear()
        await super().push(status)
        self._replies += 1
        if self._replies % YIELD_EVERY == 0:
            # A client that pipelines commands and reads its replies slowly would keep the
            # event loop to itself until its buffers are full (a reply written below the
            # high-water mark and a command already read never yield): hundreds of
            # milliseconds in which no other client is served, nor even accepted.
            await asyncio.sleep(0)
        # A 5xx reply counts as junk; a 4xx is relay's own temporary state or limit. The 452
        # for RCPTs past max_recipients counts only past Postfix's recipient overshoot limit.
        if status[:1] in ("5", b"5"):
            self._junk_over()
        elif status == TOO_MANY_RECIPIENTS:
            self.overshoot += 1
            if self.overshoot > OVERSHOOT:
                self._junk_over()

    def shut(self) -> None:
        """Tell the client we are going away, and close. Mid-handshake (implicit TLS) there
        is no way to tell it: drop the connection, or the shutdown waited its whole drain
        for a client that sent nothing, the listener already closed to Moodle."""
        if self._tcp is not None:
            self._tcp.abort()
            return
        transport = writable(self.transport)
        if transport is not None and not self._shut:
            self._shut = True
            if not transport.is_closing():  # on uvloop, a write after the close raises
                transport.write(f"{SHUTTING_DOWN}\r\n".encode())
            self.close_within_linger(transport)

    def abort(self) -> None:
        """Drop the connection now (shutdown deadline passed)."""
        if self._tcp is not None:
            self._tcp.abort()
            return
        transport = writable(self.transport)
        if transport is not None:
            transport.abort()


# `<local@domain>` with a dot-atom local part (not "=?", which the parser would take
# for an RFC 2047 encoded word) and a host name; then nothing, or one space and
# parameters (the parser eats whitespace and comments after ">": those go to it).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_ADDRESS = re.compile(
    rf"<(?P<address>(?!=\?){_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    r"(?: (?![\s(])(?P<rest>.*))?",  # \s: what str.lstrip() takes, as the parser does
    re.DOTALL,
)


@contextlib.contextmanager
def _roomy(reader: asyncio.StreamReader) -> Iterator[None]:
    """Let `reader` hold a whole chunk during DATA.

    Its limit (aiosmtpd's 1001-byte line limit) also makes it pause and resume
    the transport whenever it holds over twice that: two epoll changes per
    read of a large mail. `Body` applies the line limit itself; the command
    loop gets the limit back. Private, like `data.unread`.
    """
    limit = reader._limit  # type: ignore[attr-defined]
    reader._limit = max(limit, CHUNK)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        reader._limit = limit  # type: ignore[attr-defined]


def _quick_ack(sock: Any) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not TCP, or not Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _allowed(peer: Any, allow: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allow)


def session_factory(
    handler: Handler,
    settings: Settings,
    registry: set[Session],
    *,
    caps: Caps | None = None,
    budget: Budget | None = None,
    tls_context: Any = None,
    implicit_tls: ssl.SSLContext | None = None,
) -> Callable[[], Session]:
    """The protocol factory for `loop.create_server()` (a plain TCP listener).

    `tls_context` enables STARTTLS; `implicit_tls` makes every session TLS from the first
    byte, its handshake started once the connection is admitted (see `Session`). AUTH
    needs TLS first when STARTTLS is offered.
    """

    def make() -> Session:
        return Session(
            handler,
            registry=registry,
            caps=caps,
            budget=budget,
            spill_dir=settings.spool,
            limits=settings.limits,
            allow=settings.allow_networks,
            hostname=settings.hostname,
            data_size_limit=settings.limits.max_message_size,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
        )

    return make
