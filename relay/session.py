"""The SMTP connection: aiosmtpd's protocol with fast ACKs, network checks, named replies.

    listener --accept--> Session (this module) --hooks--> receive.Handler --> Spool

Moodle's PHPMailer writes DATA line by line with Nagle on; a delayed ACK here
would cost it ~40 ms per mail, so a Session turns on TCP_NODELAY and re-arms
TCP_QUICKACK after every read. It also refuses peers outside `allow_networks`,
rewrites aiosmtpd's own replies to ones with enhanced status codes, and lets the
service close idle sessions at shutdown.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, syntax

from relay import logs, metrics
from relay.receive import AIOSMTPD_REPLIES, NETWORK_REFUSED, SHUTTING_DOWN, Handler, peer_ip_of
from relay.settings import Settings

log = logging.getLogger("relay.receive")
_SMTP_LOG = logging.getLogger("mail.log")  # aiosmtpd's logger, for the lines it would log

CHUNK = 65536  # DATA is read this much at a time, not a line at a time


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Session(SMTP):
    """aiosmtpd's SMTP protocol with fast ACKs, network checks and replies we name.

    `registry` (the listener's set of open sessions) lets the service close idle
    sessions at shutdown and wait for the ones in a transaction.
    """

    def __init__(
        self, handler: Handler, *, registry: set[Session], allow: tuple[Network, ...] = (),
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(handler, **kwargs)
        self.registry = registry
        self.allow = allow
        self._sock: socket.socket | None = None
        self._refused = False
        self._shut = False

    def connection_made(self, transport: Any) -> None:
        if self._sock is None:  # first call: the TCP connection (again after STARTTLS)
            sock = transport.get_extra_info("socket")
            self._sock = sock
            _fast_acks(sock, nodelay=True)
            peer = transport.get_extra_info("peername")
            if self.allow and not _allowed(peer, self.allow):
                self._refused = True
                metrics.REJECTED.labels("network").inc()
                logs.event(log, "refused", level=logging.WARNING, peer=str(peer and peer[0]))
                transport.write(f"{NETWORK_REFUSED.format(peer=peer[0])}\r\n".encode())
                transport.close()
                return
            self.registry.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self.registry.discard(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        _fast_acks(self._sock)  # Linux leaves quick-ack mode on its own; re-arm per read
        super().data_received(data)

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
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = Body(size_limit=self.data_size_limit, line_limit=self.line_length_limit)
        rest: bytes | None = None
        while rest is None:
            try:
                chunk = await self._reader.read(CHUNK)
            except asyncio.CancelledError:  # connection lost: eof_received cancels us
                _SMTP_LOG.info("Connection lost during DATA")
                self._writer.close()
                raise
            if not chunk:  # unreachable, as for aiosmtpd: EOF cancels first; its readuntil
                raise asyncio.IncompleteReadError(b"", None)  # would raise this
            rest = body.feed(chunk)
        _unread(self._reader, rest)
        if body.verdict is not None:
            await self.push(body.verdict)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = body.content()
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's parser raises on some malformed input (e.g. "<a@[192.0.2.1>"),
        # which would surface as INTERNAL_ERROR; it is a malformed address.
        try:
            return super()._getaddr(arg)
        except (AttributeError, IndexError, TypeError, ValueError):
            return None, None

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(AIOSMTPD_REPLIES.get(status, status))
        else:
            await super().push(status)

    @property
    def peer_ip(self) -> str:
        return peer_ip_of(self.session) if self.session is not None else "?"

    @property
    def busy(self) -> bool:
        """In a mail transaction (MAIL given, DATA not yet answered)."""
        return bool(self.envelope is not None and self.envelope.mail_from)

    def shut(self) -> None:
        """Tell the client we are going away, and close."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not self._shut:
            self._shut = True
            transport.write(f"{SHUTTING_DOWN}\r\n".encode())
            transport.close()

    def abort(self) -> None:
        """Drop the connection now (shutdown deadline passed)."""
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()


TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's replies; `push`
TOO_MUCH = "552 Error: Too much mail data"  # rewrites them to ours


class Body:
    """One DATA body fed in chunks, judged as aiosmtpd 1.4.6 judges it line by line.

    Lines end at CRLF only; the body ends at the first line that is exactly
    ".\\r\\n" (so bare-LF look-alikes stay inside). aiosmtpd refuses the body
    (`verdict`) at the first line that is too long or takes the byte count
    (raw, with CRLF and stuffing dots) past `size_limit`; a line whose text
    exceeds `line_limit` (the StreamReader limit: LimitOverrunError) is refused
    before it is counted, a shorter one only after. Once refused, only the
    last 4 bytes are kept, to find the end; before, at most `size_limit` plus
    one line plus one chunk.
    """

    def __init__(self, *, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit or 0  # aiosmtpd: None or 0 is no limit
        self.line_limit = line_limit
        self.verdict: str | None = None
        self._raw = bytearray()  # from the 354 on (until refused: then the last 4 bytes)
        self._judged = 0  # _raw[:_judged] are whole lines within both limits

    def feed(self, chunk: bytes) -> bytes | None:
        """Take the next chunk; once the end-of-data line is in, the bytes after it."""
        raw = self._raw
        start = max(len(raw) - 4, 0)  # an end marker can straddle the last chunk
        raw += chunk
        if self.verdict is None and raw.startswith(b".\r\n"):
            end = 0
        else:
            end = raw.find(b"\r\n.\r\n", start)
            end += 2 if end >= 0 else 0
        if end < 0:
            if self.verdict is None:
                last = raw.rfind(b"\r\n", self._judged)
                self._judge(last + 2 if last >= 0 else self._judged)
                if self.verdict is None and len(raw) - self._judged >= self.line_limit + 2:
                    self.verdict = TOO_LONG  # an unfinished line already past the reader's limit
            if self.verdict is not None:
                del raw[:-4]
            return None
        rest = bytes(raw[end + 3 :])
        if self.verdict is None:
            self._judge(end)
        del raw[end:]
        return rest

    def content(self) -> bytes:
        """The body without its end line, the first dot of each line removed (RFC 5321 4.5.2)."""
        text = bytes(self._raw.replace(b"\r\n.", b"\r\n"))
        return text[1:] if text.startswith(b".") else text

    def _judge(self, stop: int) -> None:
        """Judge the whole lines _raw[_judged:stop]."""
        lines = self._raw[self._judged : stop].split(b"\r\n")[:-1]
        longest = max(map(len, lines), default=0) + 2
        if longest <= self.line_limit and not (self.size_limit and stop > self.size_limit):
            self._judged = stop
            return
        count = self._judged  # the raw byte count aiosmtpd keeps
        for line in lines:  # which limit a line meets first decides the reply
            count += len(line) + 2
            if len(line) > self.line_limit:
                self.verdict = TOO_LONG
            elif self.size_limit and count > self.size_limit:
                self.verdict = TOO_MUCH
            elif len(line) + 2 > self.line_limit:
                self.verdict = TOO_LONG
            if self.verdict is not None:
                return


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put `data` back in front of what `reader` holds, for aiosmtpd's command loop.

    StreamReader has no unread(); its buffer is a private bytearray (aiosmtpd
    itself clears it at STARTTLS). The only place relay touches it.
    """
    if data:
        reader._buffer[:0] = data  # type: ignore[attr-defined]


def _fast_acks(sock: Any, *, nodelay: bool = False) -> None:
    if sock is None:
        return
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except (OSError, AttributeError):  # not TCP, or not Linux
        pass


def _allowed(peer: Any, allow: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allow)


def session_factory(
    handler: Handler, settings: Settings, registry: set[Session], *, tls_context: Any = None,
) -> Callable[[], Session]:  # fmt: skip
    """The protocol factory for `loop.create_server()`.

    `tls_context` enables STARTTLS (pass None with implicit TLS: the listener
    wraps the socket instead). AUTH needs TLS first when STARTTLS is offered.
    """

    def make() -> Session:
        return Session(
            handler, registry=registry, allow=settings.allow_networks,
            hostname=settings.hostname, ident="relay",
            data_size_limit=settings.limits.max_message_size, enable_SMTPUTF8=False,
            decode_data=False, tls_context=tls_context, require_starttls=False,
            auth_required=False, auth_require_tls=tls_context is not None, timeout=300,
            command_call_limit=None,
        )  # fmt: skip

    return make
