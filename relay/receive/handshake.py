"""Implicit TLS (`tls.implicit`, Moodle's smtpsecure=ssl): the handshake under an admitted
session.

    listener (plain TCP) --accept--> Session.connection_made --caps, counted-->
      Handshake.start_tls --SSLProtocol, within min(idle_timeout, 60 s)-->
      Session.connection_made again (TLS) --> 220 greeting

With create_server(ssl=...) asyncio called connection_made only after the handshake,
so a client that never finished one held a file uncounted, never evicted, for 60 s
(Postfix counts at connect). Now the session is admitted first and runs the handshake
itself, as aiosmtpd's STARTTLS does: at once, so the ClientHello cannot reach the
session's reader first (loop.start_tls from a task lost it under uvloop). Until the
handshake is done the session is silent to eviction: it has read nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from asyncio import sslproto
from typing import Any

from relay import logs, metrics
from relay.receive.caps import Refusal
from relay.receive.guard import Guard

log = logging.getLogger("relay.receive")

HANDSHAKE_TIMEOUT = 60.0  # seconds a TLS handshake may take at most (asyncio's default)

_FAILED = logs.Sampled(log, "tls_handshake_failed")  # a client can cause these at will


class Handshake(Guard):
    """Guard with implicit TLS: `start_tls` once admitted; `close_for` mid-handshake."""

    _implicit: ssl.SSLContext | None  # set by Session: the listener's TLS, or None
    _tcp: Any  # the connection while its handshake runs, else None

    def start_tls(self, transport: Any) -> None:
        """The handshake on `transport`; SSLProtocol calls connection_made when it is done."""
        assert self._implicit is not None
        self._tcp = transport
        waiter = self.loop.create_future()
        waiter.add_done_callback(self._handshake_ended)
        protocol = sslproto.SSLProtocol(
            self.loop,
            self,
            self._implicit,
            waiter,
            server_side=True,
            ssl_handshake_timeout=math.ceil(min(self._timeout_duration, HANDSHAKE_TIMEOUT)),
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def _handshake_ended(self, waiter: asyncio.Future[None]) -> None:
        tcp, self._tcp = self._tcp, None
        if self.session is not None:  # connection_made came: the session has begun
            return
        # Timed out, not TLS, gone, or evicted: SSLProtocol never tells us connection_lost.
        error = None if waiter.cancelled() else waiter.exception()
        _FAILED(peer=self._address, error=type(error).__name__ if error else "closed")
        self._uncount()
        tcp.abort()

    def close_for(self, reason: Refusal, reply: str) -> None:
        """As Guard's; mid-handshake there is no reply to give: drop the connection."""
        if self._tcp is not None:
            metrics.SESSIONS_REFUSED.labels(reason).inc()
            self._tcp.abort()
            return
        super().close_for(reason, reply)
