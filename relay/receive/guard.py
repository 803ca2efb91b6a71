"""The hostile-client limits of one SMTP session: caps, eviction, timers, junk commands.

    aiosmtpd SMTP <- Guard (this module) <- session.Session (fast paths, relay's replies)

A relay that stops makes Moodle lose mail, so one client must not be able to stop
it (issue "Hold the line"). `Guard` is aiosmtpd's protocol with:

- admission against `relay.receive.caps.Caps` (421 4.7.0 above `max_sessions` or
  `max_sessions_per_ip`, after evicting the longest-silent session of that scope);
- one timer per session, measured from the last byte read (`limits.idle_timeout`,
  in commands and DATA alike) and from the start (`limits.session_timeout`), where
  aiosmtpd re-arms a timer at each valid command;
- Postfix's junk-command limit (`limits.max_junk_commands`): NOOP, RSET, VRFY, HELP
  and 5xx replies, reset by each mail accepted, and each RCPT past max_recipients
  beyond the first OVERSHOOT of them;
- `close_for`, the one way a limit ends a session: 421, counted, logged once per 10 s,
  and the connection dropped if the client has not taken its replies within `linger`
  seconds (as Postfix's smtpd_timeout, which holds for writes too).

AUTH failures are counted here (`auth_failures`) and judged by relay.receive.auth.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from aiosmtpd.smtp import SMTP, syntax

from relay import logs, metrics
from relay.receive.caps import (
    EVICT_BARREN,
    EVICT_BUSY_BARREN,
    EVICT_BUSY_IDLE,
    EVICT_IDLE,
    TOO_MANY_SESSIONS,
    Caps,
    Refusal,
    address_of,
    client_of,
    peer_ip_of,
)
from relay.settings import Limits

log = logging.getLogger("relay.receive")

TIMED_OUT = "421 4.4.2 {host} Error: timeout exceeded"  # Postfix's words
SESSION_TOO_LONG = "421 4.4.2 {host} Error: session lasted too long, try again"
EVICTED = "421 4.7.0 {host} Error: idle too long while others wait, try again"
TOO_MANY_JUNK = "421 4.7.0 {host} Error: too many errors or junk commands"
# RCPTs a session may send past max_recipients (each answered 452) before each further one
# counts as junk: Postfix's smtpd_recipient_overshoot_limit.
OVERSHOOT = 1000
LINGER = 10.0  # seconds a closed session's replies get to reach a client (at most idle_timeout)
FREE_GREETINGS = 2  # EHLO/HELO on a connection before each more counts as a junk command

# One log line per reason per 10 s (with a count): a client can cause these at will.
_REFUSED = {reason: logs.Sampled(log, "session_refused", reason=reason) for reason in Refusal}
_CLOSED = {reason: logs.Sampled(log, "session_closed", reason=reason) for reason in Refusal}


class Guard(SMTP):
    """aiosmtpd's SMTP with relay's hostile-client limits; `session.Session` builds it."""

    registry: set[Any]  # the listener's open sessions: set[Session] (set by Session)

    def _guard(self, *, caps: Caps | None, limits: Limits) -> None:
        """Set the limits' state (Session.__init__ replaces SMTP.__init__, so not here)."""
        self.caps = caps
        self._timeout_duration = limits.idle_timeout
        self.linger = min(LINGER, limits.idle_timeout)
        self.session_timeout = limits.session_timeout
        self.junk_limit = limits.max_junk_commands
        self.junk = 0  # junk commands and error replies since the last mail accepted
        self.greetings = 0  # EHLO and HELO commands on this connection
        self.overshoot = 0  # RCPTs answered 452 for being past max_recipients
        self.auth_failures = 0
        self._client: str | None = None  # counted in `caps` as this client (caps.client_of)
        self._address = "?"  # the peer's own address
        self._started = self._last_read = 0.0
        self.last_mail = 0.0  # when it connected, then when it last had a mail accepted
        self.began = 0.0  # when its present (or last) transaction began: MAIL accepted

    def _admit(self, transport: Any, peer: Any) -> bool:
        """Count this new connection in `caps` (evicting a silent one if need be); when
        a cap still refuses it, send the 421, close, and return False."""
        assert self.caps is not None
        address = address_of(peer)
        client = client_of(address)
        refusal = self.caps.admit(client)
        # At max_sessions, another client's session makes room only if this client is under
        # its own cap; else one of its own does (or it would be refused all the same).
        anyone = refusal == TOO_MANY_SESSIONS and not self.caps.full_for(client)
        if refusal is not None and self._evict(client, anyone):
            refusal = self.caps.admit(client)
        if refusal is not None:
            reason = Refusal.MAX_SESSIONS
            if refusal != TOO_MANY_SESSIONS:
                reason = Refusal.MAX_SESSIONS_PER_IP
            metrics.SESSIONS_REFUSED.labels(reason).inc()
            _REFUSED[reason](peer=address, client=client, open=self.caps.total)
            transport.write(f"{refusal}\r\n".encode())
            transport.close()
            return False
        self._client, self._address = client, address
        return True

    @property
    def peer_ip(self) -> str:
        return peer_ip_of(self.session) if self.session is not None else "?"

    @property
    def busy(self) -> bool:
        """In a mail transaction (MAIL given, DATA not yet answered)."""
        return bool(self.envelope is not None and self.envelope.mail_from)

    def _uncount(self) -> None:
        self.registry.discard(self)
        if self._client is not None and self.caps is not None:
            self.caps.release(self._client)
            self._client = None

    def _evict(self, client: str, anyone: bool) -> bool:
        """Close the session (anyone's, or `client`'s) furthest past its eviction idle time or
        EVICT_BARREN, to make room for this one (see relay.receive.caps); True if one was."""
        now = self.loop.time()
        victim, most = None, 0.0
        for session in self.registry:
            if anyone or session._client == client:
                if session.busy:  # see relay.receive.caps: a mail is being sent
                    quiet = now - session._last_read - EVICT_BUSY_IDLE
                    barren = now - session.began - EVICT_BUSY_BARREN  # after its last mail
                else:
                    quiet = now - session._last_read - EVICT_IDLE
                    barren = now - session.last_mail - EVICT_BARREN
                over = max(quiet, barren)
                if over >= most:
                    victim, most = session, over
        if victim is None:
            return False
        victim._uncount()  # its place is this session's now, not when its close completes
        victim.close_for(Refusal.EVICTED, EVICTED)
        return True

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms its timer at each valid command (so a slow DATA upload is cut
        300 s after the DATA command, and a NOOP flood is never cut); relay's timer is
        armed once and `_timeout_cb` measures from the last read instead."""
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_later(self._timeout_duration, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """Close after `idle_timeout` seconds without a byte from the client, or once the
        session is older than `session_timeout` (a transaction in progress then still
        gets one more idle timeout to finish: its mail is not cut off)."""
        now = self.loop.time()
        idle_end = self._last_read + self._timeout_duration
        end = self._started + self.session_timeout
        if now < idle_end and (now < end or (self.busy and now < end + self._timeout_duration)):
            wake = min(idle_end, end if now < end else end + self._timeout_duration)
            self._timeout_handle = self.loop.call_at(wake, self._timeout_cb)
            return
        if now >= idle_end:
            self.close_for(Refusal.IDLE_TIMEOUT, TIMED_OUT)
        else:
            self.close_for(Refusal.SESSION_TIMEOUT, SESSION_TOO_LONG)

    def close_for(self, reason: Refusal, reply: str) -> None:
        """Send the 421 `reply` and close: a limit ended this session."""
        metrics.SESSIONS_REFUSED.labels(reason).inc()
        _CLOSED[reason](peer=self.peer_ip)
        transport = writable(self.transport)
        if transport is not None:
            if not transport.is_closing():
                transport.write(f"{reply.format(host=self.hostname)}\r\n".encode())
            self.close_within_linger(transport)

    def close_within_linger(self, transport: asyncio.WriteTransport) -> None:
        """close(), which waits until every reply written has gone out (in asyncio and
        uvloop alike): a client that never reads would keep its socket, and its file, for
        ever. Unless the replies are gone within `linger` seconds, the connection is
        dropped. Also for a transport closing already (after QUIT's 221, or a 421 before):
        with the session evicted, or past its idle timeout, nothing else would drop it."""
        transport.close()
        try:
            held = transport.get_write_buffer_size()
        except AttributeError:  # asyncio's TLS transport cannot tell once closed
            held = 1
        if held:
            self.loop.call_later(self.linger, transport.abort)  # a no-op once closed

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        await super().smtp_QUIT(arg)  # 221, then close()
        transport = writable(self.transport)
        if transport is not None and transport.is_closing():
            self.close_within_linger(transport)

    def _junk_over(self) -> bool:
        """Count a junk command or error reply; past the limit, 421 and close (True)."""
        self.junk += 1
        if self.junk <= self.junk_limit:
            return False
        self.close_for(Refusal.JUNK_COMMANDS, TOO_MANY_JUNK)
        return True

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        idle = not self.busy
        await super().smtp_MAIL(arg)
        if idle and self.busy:
            self.began = self.loop.time()  # a transaction began: see _evict

    # Postfix's smtpd_junk_command_limit commands, plus HELP; `push` counts error replies.
    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not self._junk_over():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not self._junk_over():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not self._junk_over():
            await super().smtp_VRFY(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not self._junk_over():
            await super().smtp_HELP(arg)

    # A client greets once, and again after STARTTLS: any more is junk. Each EHLO is a
    # 250 that stores nothing; not counted, one connection sending nothing else (or EHLO,
    # MAIL, 50 RCPT over and over) kept relay at a full core for session_timeout.
    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not self._greeting_over():
            await super().smtp_EHLO(hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not self._greeting_over():
            await super().smtp_HELO(hostname)

    def _greeting_over(self) -> bool:
        self.greetings += 1
        return self.greetings > FREE_GREETINGS and self._junk_over()


def writable(transport: object) -> asyncio.WriteTransport | None:
    """`transport` if a reply can be written to it, else None (no connection yet).

    Not isinstance(..., asyncio.WriteTransport): uvloop's TCPTransport, which
    `relay serve` runs on, implements it without subclassing it."""
    return cast(asyncio.WriteTransport, transport) if hasattr(transport, "write") else None
