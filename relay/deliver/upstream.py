"""Upstream route of the deliver stage: SMTP to the site's original host via aiosmtplib.

Connect (implicit TLS or STARTTLS as configured, never opportunistic),
optional AUTH, MAIL FROM the envelope sender (`<>` too), RCPT TO each recipient,
DATA `mail.wire_bytes()` (in its wire form by `relay.deliver.wire`). Per-recipient
replies come back in an `UpstreamResult`; whole-transaction failures raise:

    TemporaryFailure   connection refused/reset/timeout, TLS or AUTH failure, 4xx at
                       MAIL or DATA, the same 4xx to every RCPT
    PermanentFailure   5xx at MAIL or DATA, the same 5xx to every RCPT, an address SMTP
                       cannot carry

Every RCPT refused with replies that differ (most name the address) is a result, each
recipient with its own reply, as the DSN must report them.

AUTH failures are temporary on purpose: a wrong password is the relay's
problem, not the message's, so the mail waits for the fix instead of failing.

Connections are reused, as Postfix's smtp client does: after a completed DATA
the connection waits up to REUSE_IDLE seconds for the next mail (no new TCP,
TLS, EHLO and AUTH per message), and is closed with QUIT after REUSE_LIMIT
mails, REUSE_FOR seconds, or any error. If the host closed an idle connection,
the next MAIL FROM fails before anything of that mail was sent, and the mail
goes out on a fresh connection instead.

A host that limits the connections it takes from one client (Postfix's
smtpd_client_connection_count_limit, Exim's smtp_accept_max_per_host, a 421
greeting past it) is up, not down: a busy greeting while other connections to
it are open sets a cap at their number for BUSY_FOR seconds, and the mail waits
for one of them instead of being deferred (Postfix's qmgr lowers the
destination's concurrency, and calls the host dead only when every connection
fails). A busy greeting with no connection open is an unreachable host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from relay import logs
from relay import settings as _settings
from relay.deliver.wire import data_bytes, send_data
from relay.errors import (
    DeliveryError,
    HostUnreachable,
    HostUnusable,
    PermanentFailure,
    TemporaryFailure,
)
from relay.mail import Mail

REUSE_IDLE = 2.0  # seconds an idle connection waits for the next mail (Postfix: 2 s)
REUSE_LIMIT = 100  # mails per connection, then QUIT
REUSE_FOR = 300.0  # seconds a connection is used at most (Postfix: 300 s)
REPLY_MAX = 1000  # characters of a host's reply kept (the rest is "...")
BUSY_FOR = 60.0  # seconds a connection cap learnt from a busy greeting holds

log = logging.getLogger("relay.deliver")


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamResult:
    """What the host said: recipients taken, refused for now (4xx), refused for good (5xx).

    `accepted` is empty when every RCPT was refused with replies that differ (the same
    reply to all raises; DATA was not sent), or when DATA was refused after some RCPT
    refusals: those
    accepted at RCPT then carry DATA's reply, the others their own.
    """

    accepted: tuple[str, ...]
    temporary: tuple[tuple[str, str], ...] = ()  # (recipient, reply)
    permanent: tuple[tuple[str, str], ...] = ()
    reply: str = ""  # the DATA reply, or the refusals when none was accepted


@dataclass(slots=True)
class _Connection:
    smtp: aiosmtplib.SMTP
    opened: float  # time.monotonic()
    used: int = 0  # mails sent on it
    idle_since: float = 0.0
    closed: bool = False


class _Stale(Exception):
    """A reused connection was closed by the host while idle; nothing of the mail was sent."""


class _Busy(Exception):
    """A new connection got a 4xx greeting while others to the host are open: its limit."""


class UpstreamClient:
    """Sends mail to the original host exactly as received, envelope unchanged."""

    def __init__(self, settings: _settings.Upstream, *, hostname: str) -> None:
        self._settings = settings
        self._hostname = hostname  # our EHLO name
        self._idle: list[_Connection] = []  # open, between mails; the newest last
        self._closing: set[asyncio.Task[None]] = set()
        self._open = 0  # connections open now, in use or idle
        self._cap = 0  # the host's limit on them, learnt from a busy greeting (0: none) ...
        self._cap_until = 0.0  # ... until then (monotonic)
        self._room: list[asyncio.Future[None]] = []  # sends waiting for a connection
        self._connecting = 0  # connections being set up
        self._connect_ended = asyncio.Event()
        self._tls: ssl.SSLContext | None = None
        if settings.security is not _settings.Security.NONE:
            self._tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if not settings.verify_tls:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE

    @property
    def target(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    async def send(self, mail: Mail) -> UpstreamResult:
        """Deliver `mail`; see the module docstring for what raises and what returns."""
        deadline = time.monotonic() + self._settings.timeout  # for a connection under the cap
        while True:
            conn = self._take()
            if conn is not None:
                try:
                    return await self._send_on(conn, mail, reused=True)
                except _Stale:
                    continue  # the host let it go while idle: another, or a fresh one
            if self._full():
                await self._wait_for_room(mail, deadline)
                continue
            try:
                conn = await self._connect(mail, deadline)
            except _Busy:
                continue  # the cap is set: wait for a connection that is open
            return await self._send_on(conn, mail, reused=False)

    async def _connect(self, mail: Mail, deadline: float) -> _Connection:
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self._hostname,
            timeout=s.timeout,
            use_tls=s.security is _settings.Security.TLS,
            start_tls=False,
            tls_context=self._tls,
        )
        self._connecting += 1
        connecting = True
        try:
            await self._open_session(smtp, mail)
        except HostUnreachable as exc:
            smtp.close()
            self._connecting -= 1  # this one has its answer: the others need not wait for it
            self._connect_ended.set()
            connecting = False
            if _busy(exc) and await self._others_got_in(deadline):
                self._cap, self._cap_until = self._open, time.monotonic() + BUSY_FOR
                logs.event(
                    log,
                    "upstream_busy",
                    level=logging.WARNING,
                    host=self.target,
                    connections=self._cap,
                    seconds=BUSY_FOR,
                    reply=exc.reply,
                )
                raise _Busy() from exc
            raise
        except BaseException:
            smtp.close()
            raise
        finally:
            if connecting:
                self._connecting -= 1
                self._connect_ended.set()
        self._open += 1
        self._cap = max(self._cap, self._open) if self._cap else 0  # the host took this one
        return _Connection(smtp, opened=time.monotonic())

    async def _others_got_in(self, deadline: float) -> bool:
        """After a busy greeting: whether relay has another connection to the host, once
        the connects under way beside this one have ended (a burst of them at the start)."""
        while not self._open and self._connecting and time.monotonic() < deadline:
            self._connect_ended.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._connect_ended.wait()
        return self._open > 0

    def _full(self) -> bool:
        """At the host's connection cap (a busy greeting within BUSY_FOR seconds)."""
        return bool(self._cap) and time.monotonic() < self._cap_until and self._open >= self._cap

    async def _wait_for_room(self, mail: Mail, deadline: float) -> None:
        """Until a connection is freed or closed; a TemporaryFailure past `deadline`."""
        room = asyncio.get_running_loop().create_future()
        self._room.append(room)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await room
        except TimeoutError:
            reply = (
                f"4.4.5 upstream {self.target} takes {self._cap} connections at a time"
                f" from relay and none was free for {self._settings.timeout:g} s"
            )
            raise TemporaryFailure(f"{reply} ({mail.id})", reply=reply, status="4.4.5") from None
        finally:
            if room in self._room:
                self._room.remove(room)

    def _wake(self) -> None:
        """A connection was freed or closed: the longest waiting send looks again."""
        while self._room:
            room = self._room.pop(0)
            if not room.done():
                room.set_result(None)
                return

    def _closed(self, conn: _Connection) -> None:
        if not conn.closed:
            conn.closed = True
            self._open -= 1
            self._wake()

    async def close(self) -> None:
        """QUIT every idle connection (at stop)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._retire(conn)
        if self._closing:
            await asyncio.wait(self._closing, timeout=self._settings.timeout)

    async def _send_on(self, conn: _Connection, mail: Mail, *, reused: bool) -> UpstreamResult:
        """One transaction on `conn`; afterwards it is kept for the next mail or closed."""
        try:
            result = await self._transaction(conn.smtp, mail, reused=reused)
        except BaseException:
            conn.smtp.close()
            self._closed(conn)
            raise
        conn.used += 1
        if result.accepted:  # DATA completed: the session is ready for the next MAIL
            self._release(conn)
        else:
            self._retire(conn)
        return result

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.smtp.is_connected and now - conn.idle_since < REUSE_IDLE:
                return conn
            self._retire(conn)
        return None

    def _release(self, conn: _Connection) -> None:
        now = time.monotonic()
        if conn.used >= REUSE_LIMIT or now - conn.opened >= REUSE_FOR:
            self._retire(conn)
            return
        conn.idle_since = now
        self._idle.append(conn)
        asyncio.get_running_loop().call_later(REUSE_IDLE, self._expire)
        self._wake()

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._idle if now - c.idle_since >= REUSE_IDLE]:
            self._idle.remove(conn)
            self._retire(conn)

    def _retire(self, conn: _Connection) -> None:
        """QUIT in the background; the outcome of every mail on it is already known."""
        self._closed(conn)

        async def quit_() -> None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                if conn.smtp.is_connected:
                    await conn.smtp.quit()
            conn.smtp.close()

        task = asyncio.get_running_loop().create_task(quit_())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, mail: Mail, *, reused: bool
    ) -> UpstreamResult:
        where = f"upstream {self.target}"
        data = mail.wire_bytes()
        options, encoding = [], "ascii"
        if not all(a.isascii() for a in (mail.sender, *mail.recipients)):
            if not smtp.supports_extension("smtputf8"):
                # Postfix's words and status (RFC 6531: 5.6.7), in relay's name: no host said it.
                # The status leads, as in the reply's place on the row, the log and the DSN.
                reason = f"5.6.7 SMTPUTF8 is required, but was not offered by {where}"
                raise PermanentFailure(
                    f"{where}: {mail.id} has UTF-8 addresses: {reason}",
                    reply=reason,
                    status="5.6.7",
                )
            options, encoding = ["SMTPUTF8"], "utf-8"
        if not data.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("size"):  # RFC 1870: refused before the upload, as Postfix
            options.append(f"SIZE={len(data)}")
            _fits(where, mail, len(data), smtp.esmtp_extensions.get("size", ""))

        accepted: list[str] = []
        temporary: list[tuple[str, str]] = []
        permanent: list[tuple[str, str]] = []
        phase = "MAIL FROM"  # what the host refused, for the reply recorded
        try:
            try:
                await smtp.mail(mail.sender, options=options, encoding=encoding)
            except (aiosmtplib.SMTPServerDisconnected, OSError) as exc:
                if reused:
                    raise _Stale() from exc
                raise
            except aiosmtplib.SMTPResponseException as exc:
                if reused and exc.code == 421:  # closing this idle session (RFC 5321 3.8)
                    raise _Stale() from exc
                if exc.code // 100 != 2:  # a 2xx other than 250 is an acceptance too
                    raise
            phase = "RCPT TO"
            for rcpt in mail.recipients:
                try:
                    await smtp.rcpt(rcpt, encoding=encoding)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    if exc.code == 421:  # closing the session (RFC 5321 3.8): all wait, in
                        raise  # its words (the next RCPT said only "not connected")
                    if exc.code // 100 == 2:  # 252 and the like: taken (RFC 5321 4.2.1)
                        accepted.append(rcpt)
                        continue
                    refusal = (rcpt, _reply(exc))
                    (temporary if exc.code < 500 else permanent).append(refusal)
            if accepted:
                phase = "DATA"
                try:
                    response = await send_data(smtp, data_bytes(data))
                    reply = f"{response.code} {_oneline(response.message)}"
                except aiosmtplib.SMTPDataError as exc:
                    if not (temporary or permanent):
                        raise  # every recipient alike: a whole-transaction failure, below
                    # The reply to DATA is for the recipients accepted at RCPT (RFC 5321,
                    # 3.3); those refused at RCPT keep their own reply: a 4xx there stays
                    # deferred whatever DATA got.
                    refused = [(rcpt, f"{_reply(exc)} (at DATA)") for rcpt in accepted]
                    (temporary if exc.code < 500 else permanent).extend(refused)
                    return _none_accepted(temporary, permanent)  # each with its own reply
        except aiosmtplib.SMTPResponseException as exc:
            message = f"{where} refused {mail.id} at {phase}: {_reply(exc)}"
            raise _by_code(exc.code, message, reply=_reply(exc)) from exc
        except ValueError as exc:  # an address with characters SMTP cannot carry
            message = f"{where}: {mail.id} has an address SMTP cannot carry: {exc}"
            raise PermanentFailure(message, reply=str(exc)) from exc
        except aiosmtplib.SMTPTimeoutError as exc:  # Postfix's words and status
            reply = f"4.4.2 conversation with {where} timed out while sending {phase}"
            raise TemporaryFailure(f"{reply} ({mail.id})", reply=reply, status="4.4.2") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            message = f"{where} lost {mail.id} mid-transaction: {exc!r}"
            raise TemporaryFailure(message, reply=repr(exc)) from exc

        if not accepted:
            _raise_if_uniform(where, mail, temporary, permanent)
            return _none_accepted(temporary, permanent)
        return UpstreamResult(
            accepted=tuple(accepted),
            temporary=tuple(temporary),
            permanent=tuple(permanent),
            reply=reply,
        )

    async def _open_session(self, smtp: aiosmtplib.SMTP, mail: Mail) -> None:
        """Connect, STARTTLS and AUTH as configured; any failure here is temporary."""
        s = self._settings
        where = f"upstream {self.target}"
        try:
            try:
                await smtp.connect()
            except (aiosmtplib.SMTPConnectError, OSError) as exc:
                reply = _reply(exc) if isinstance(exc, aiosmtplib.SMTPException) else repr(exc)
                raise HostUnreachable(
                    f"{where} unreachable for {mail.id}: {reply}", reply=reply
                ) from exc
            if s.security is _settings.Security.STARTTLS:
                await smtp.starttls()
            if s.username:
                password = s.password()
                if password is None:
                    reason = f"no password for {s.username} (password_env/password_file unset)"
                    raise HostUnusable(f"{where} unusable for {mail.id}: {reason}", reply=reason)
                await smtp.login(s.username, password)
            if smtp.is_ehlo_or_helo_needed:  # before the first MAIL reads the extensions
                try:  # (aiosmtplib says EHLO only inside login() or mail())
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    if not smtp.is_connected:
                        raise
                    await smtp.helo()  # a host without ESMTP (RFC 5321 3.2), as Postfix
        except aiosmtplib.SMTPException as exc:
            message = f"{where} unusable for {mail.id}: {_reply(exc)}"
            raise HostUnusable(message, reply=_reply(exc)) from exc
        except OSError as exc:
            message = f"{where} unreachable for {mail.id}: {exc!r}"
            raise HostUnusable(message, reply=repr(exc)) from exc


def _fits(where: str, mail: Mail, size: int, offered: str) -> None:
    """PermanentFailure when the host's SIZE (RFC 1870) is under `size` bytes; a SIZE of 0
    or none at all sets no limit. In relay's words with 5.3.4, as Postfix's: the host never
    replied it (a DSN showing `smtp; 552 ...` would put words in its mouth)."""
    limit = int(offered) if offered.strip().isdigit() else 0
    if limit and size > limit:
        reply = f"5.3.4 message size {size} exceeds size limit {limit} of {where}"
        raise PermanentFailure(f"{where}: {mail.id}: {reply}", reply=reply, status="5.3.4")


def _none_accepted(
    temporary: list[tuple[str, str]], permanent: list[tuple[str, str]]
) -> UpstreamResult:
    """Every recipient refused, some for now and some for good (or at DATA): per recipient."""
    replies = "; ".join(f"{r}: {reply}" for r, reply in (*temporary, *permanent))
    return UpstreamResult(
        accepted=(),
        temporary=tuple(temporary),
        permanent=tuple(permanent),
        reply=f"no recipient accepted: {replies}",
    )


def _raise_if_uniform(
    where: str,
    mail: Mail,
    temporary: list[tuple[str, str]],
    permanent: list[tuple[str, str]],
) -> None:
    """Every recipient refused with the same reply is a whole-transaction failure; different
    replies are reported per recipient (`_none_accepted`): each its own Status in a DSN."""
    if len({reply for _, reply in (*temporary, *permanent)}) > 1:
        return
    replies = "; ".join(f"{r}: {reply}" for r, reply in (*temporary, *permanent))
    if not permanent:
        message = f"{where} refused every recipient of {mail.id} for now: {replies}"
        raise TemporaryFailure(message, reply=temporary[0][1])
    if not temporary:
        message = f"{where} refused every recipient of {mail.id}: {replies}"
        raise PermanentFailure(message, reply=permanent[0][1])


def _by_code(code: int, message: str, *, reply: str) -> DeliveryError:
    if 500 <= code < 600:
        return PermanentFailure(message, reply=reply)
    return TemporaryFailure(message, reply=reply)


def _busy(exc: HostUnreachable) -> bool:
    """A 4xx greeting: the host is there and says not now (a connection limit, a load)."""
    greeting = exc.__cause__
    return isinstance(greeting, aiosmtplib.SMTPConnectResponseError) and greeting.code // 100 == 4


def _reply(exc: aiosmtplib.SMTPException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {_oneline(exc.message)}"
    return _oneline(exc.message)


def _oneline(text: str) -> str:
    """A reply on one line, as text SQLite and a DSN can carry: aiosmtplib decodes replies
    with surrogateescape, and a lone surrogate (a Latin-1 byte in a localized 550) made
    recording the outcome fail, so the mail was sent again at every retry."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    # Kept on the row, in its history and the log at every try: a host's 32 KiB reply to
    # each of 50 recipients was 1.6 MB a try (Postfix keeps 2,048 bytes of a reply).
    return text if len(text) <= REPLY_MAX else text[: REPLY_MAX - 3] + "..."


__all__ = ["UpstreamClient", "UpstreamResult"]
