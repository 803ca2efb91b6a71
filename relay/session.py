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

from aiosmtpd.smtp import SMTP

from relay import logs, metrics
from relay.receive import AIOSMTPD_REPLIES, NETWORK_REFUSED, SHUTTING_DOWN, Handler, peer_ip_of
from relay.settings import Settings

log = logging.getLogger("relay.receive")


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
