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

Connections to the host are kept between mails and capped as the host asks
(`relay.deliver.pool`). If the host closed an idle connection, the next MAIL FROM
fails before anything of that mail was sent, and the mail goes out on a fresh
connection instead.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from relay import logs
from relay import settings as _settings
from relay.deliver.pool import BUSY_FOR, Connection, Pool
from relay.deliver.wire import data_bytes, send_data
from relay.errors import (
    DeliveryError,
    HostUnreachable,
    HostUnusable,
    PermanentFailure,
    TemporaryFailure,
)
from relay.mail import Mail

REPLY_MAX = 1000  # characters of a host's reply kept (the rest is "...")

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


class _Stale(Exception):
    """A reused connection was closed by the host while idle; nothing of the mail was sent."""


class _Busy(Exception):
    """A new connection got a 4xx greeting while others to the host are open: its limit."""


class UpstreamClient:
    """Sends mail to the original host exactly as received, envelope unchanged."""

    def __init__(self, settings: _settings.Upstream, *, hostname: str) -> None:
        self._settings = settings
        self._hostname = hostname  # our EHLO name
        self._pool = Pool()
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
            conn = self._pool.take()
            if conn is not None:
                try:
                    return await self._send_on(conn, mail, reused=True)
                except _Stale:
                    continue  # the host let it go while idle: another, or a fresh one
            if self._pool.full():
                if not await self._pool.wait_for_room(deadline):
                    reply = (
                        f"4.4.5 upstream {self.target} takes {self._pool.cap} connections at"
                        f" a time from relay and none was free for {self._settings.timeout:g} s"
                    )
                    raise TemporaryFailure(f"{reply} ({mail.id})", reply=reply, status="4.4.5")
                continue
            try:
                conn = await self._connect(mail, deadline)
            except _Busy:
                continue  # the cap is set: wait for a connection that is open
            return await self._send_on(conn, mail, reused=False)

    async def _connect(self, mail: Mail, deadline: float) -> Connection:
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
        try:
            with self._pool.connecting():
                await self._open_session(smtp, mail)
        except HostUnreachable as exc:
            smtp.close()
            if _busy(exc) and await self._pool.others_got_in(deadline):
                logs.event(
                    log,
                    "upstream_busy",
                    level=logging.WARNING,
                    host=self.target,
                    connections=self._pool.cap_at_open(),
                    seconds=BUSY_FOR,
                    reply=exc.reply,
                )
                raise _Busy() from exc
            raise
        except BaseException:
            smtp.close()
            raise
        return self._pool.added(smtp)

    async def close(self) -> None:
        """QUIT every idle connection (at stop)."""
        await self._pool.close(self._settings.timeout)

    async def _send_on(self, conn: Connection, mail: Mail, *, reused: bool) -> UpstreamResult:
        """One transaction on `conn`; afterwards it is kept for the next mail or closed."""
        try:
            result = await self._transaction(conn.smtp, mail, reused=reused)
        except BaseException:
            conn.smtp.close()
            self._pool.closed(conn)
            raise
        conn.used += 1
        if result.accepted:  # DATA completed: the session is ready for the next MAIL
            self._pool.release(conn)
        else:
            self._pool.retire(conn)
        return result

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
