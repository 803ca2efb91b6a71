"""The SMTP front door (aiosmtpd): limits, address checks, `spool.add()`, replies.

    Moodle --SMTP--> Session (aiosmtpd SMTP) --hooks--> Handler --add--> Spool --250 queued as ID

The reply to DATA is 250 only after the spool committed the message. Every
refusal is one of the named replies below; a handler bug becomes
`INTERNAL_ERROR`, never aiosmtpd's generic 500.

Choices worth knowing:
- 8BITMIME is advertised and 8-bit data is accepted with or without
  BODY=8BITMIME: PHPMailer sends 8bit bodies either way, and refusing would
  lose the mail (Moodle never retries). The bytes are stored as received.
- SMTPUTF8 is not offered; addresses must be ASCII (RFC 5321 syntax, checked
  with email-validator). Intranet domains (`moodle.local`) are accepted.
- Bare LF: aiosmtpd 1.4.6 ends DATA only at CRLF.CRLF, so `\\n.\\r\\n` and
  `\\r\\n.\\n` stay inside the one message ("SMTP smuggling" cannot split it).
  A CR or LF outside a CRLF pair is then rewritten to CRLF (`limits.bare_newline:
  normalize`, Postfix 3.9's default, noted on the mail's history) or refused
  (`reject`), so SES never gets bare line ends. Mail of CRLF lines only (all that
  PHPMailer sends) is stored byte for byte: three counts decide, no copy.
- Lines longer than 998 octets are refused (RFC 5321 4.5.3.1.6); PHPMailer
  re-encodes bodies with longer lines, so Moodle never sends them.
- TCP: the connection itself (fast ACKs for Moodle's PHPMailer, allowed
  networks, reply rewriting, shutdown) is `relay.receive.session.Session`.
- AUTH PLAIN and LOGIN are hooks of `relay.receive.auth.Auth`, a base of the handler.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import logging
import math
import re
import sqlite3
import time

from aiosmtpd.smtp import SMTP, Envelope, TLSSetupException
from aiosmtpd.smtp import Session as SmtpSession
from email_validator import EmailNotValidError, validate_email

from relay import logs, metrics
from relay.errors import SpoolError
from relay.mail import bare_line_ends, header_block
from relay.receive.auth import Auth
from relay.receive.caps import peer_ip_of
from relay.receive.data import free_bytes
from relay.receive.guesses import Guesses
from relay.receive.passwords import Users
from relay.settings import BareNewline, Settings
from relay.spool import Spool, reader

log = logging.getLogger("relay.receive")
# A client's to cause at will: sampled, without the two tracebacks an ERROR line carried.
_STARTTLS_FAILED = logs.Sampled(log, "tls_handshake_failed", via="starttls")
_SPOOL_NO_ROOM = logs.Sampled(log, "spool_no_room")

QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
SENDER_OK = "250 2.1.0 Ok"
RECIPIENT_OK = "250 2.1.5 Ok"
SPOOL_UNAVAILABLE = "451 4.3.0 Cannot queue the message now, try again later"
NO_ROOM = "452 4.3.1 Insufficient system storage"  # Postfix's words under queue_minfree
REUSABLE_FOR = 0.1  # seconds the database's free pages, once counted, are taken as they were
FREE_FOR = 0.1  # seconds the disk's free bytes, once read, stand (less what was let in since)
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
BAD_SENDER = "501 5.1.7 Bad sender address syntax: {reason}"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax: {reason}"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
NETWORK_REFUSED = "554 5.7.1 Access denied for {peer}"
TOO_BIG_AT_MAIL = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_BIG_AT_DATA = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6: at most 998 octets)"
COMMAND_TOO_LONG = "500 5.5.2 Command line too long"
NOT_ASCII = "500 5.5.2 Non-ASCII command (SMTPUTF8 is not offered)"
TLS_ACTIVE = "554 5.5.1 Error: TLS already active"  # Postfix's words
TOO_MANY_HOPS = "554 5.4.6 Too many hops"  # Postfix's words: a mail loop
BARE_NEWLINE = "550 5.5.2 Message contains a bare CR or LF: lines must end with CRLF"
NORMALIZED = "bare CR/LF normalized to CRLF (limits.bare_newline: normalize)"

# aiosmtpd's own replies -> ours with enhanced status codes (RFC 3463).
AIOSMTPD_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG_AT_MAIL,
    "552 Error: Too much mail data": TOO_BIG_AT_DATA,
    "500 Line too long (see RFC5321 4.5.3.1.6)": LINE_TOO_LONG,
    "500 Command line too long": COMMAND_TOO_LONG,
    "500 Error: strict ASCII mode": NOT_ASCII,
}

_VALIDATE = {
    "check_deliverability": False,
    "allow_smtputf8": False,
    "allow_quoted_local": True,
    "allow_domain_literal": True,
    "globally_deliverable": False,
}
_SPECIAL_USE = re.compile(r"(?i)^[a-z0-9.-]+\.(local|localhost|internal|lan|home\.arpa|test)$")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
_UNSAFE = re.compile(r"[^!-~]|[()\\]")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# A mail with this many Received lines is in a loop (Postfix's hopcount_limit): an
# `upstream` that leads back to relay (its own listener, or a host relaying to it).
MAX_HOPS = 50
_RECEIVED = re.compile(rb"^received[ \t]*:", re.I | re.M)


@functools.lru_cache(maxsize=8192)  # Moodle sends from one noreply address, over and over
def address_problem(address: str) -> str | None:
    """Why `address` is not a valid ASCII mailbox for the envelope; None when it is."""
    try:
        validate_email(address, **_VALIDATE)  # type: ignore[arg-type]
        return None
    except EmailNotValidError as exc:
        problem = str(exc)
    local, _, domain = address.rpartition("@")
    if local and _SPECIAL_USE.match(domain):  # intranet names email-validator refuses
        try:
            validate_email(f"{local}@example.org", **_VALIDATE)  # type: ignore[arg-type]
            return None
        except EmailNotValidError as exc:
            problem = str(exc)
    return problem


def extract_message_id(raw: bytes) -> str:
    """The Message-ID header value from the header block only; "" when absent."""
    return _message_id_in(header_block(raw))


def _message_id_in(headers: bytes) -> str:
    match = _MESSAGE_ID.search(headers)
    if match is None:
        return ""
    return " ".join(match.group(1).decode("ascii", "replace").split())[:998]


def _size_of(options: list[str]) -> int:
    """MAIL FROM's SIZE= (RFC 1870) in bytes, 0 when not given or not a number."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


class Transaction(Envelope):
    """aiosmtpd's envelope, and how many RCPTs it accepted, repeats too (handle_RCPT)."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpt_accepted = 0


class Handler(Auth):
    """aiosmtpd hooks: one instance per listener, shared by all sessions."""

    def __init__(
        self,
        *,
        spool: Spool,
        settings: Settings,
        users: Users | None = None,
        implicit_tls: bool = False,
    ) -> None:
        self.spool = spool
        self.spool_dir = settings.spool
        self.spool_min_free = settings.limits.spool_min_free
        self._reusable_at, self._reusable_bytes = -math.inf, 0  # see _reusable
        self._free_at, self._free_bytes = -math.inf, 0  # see _free
        self.hostname = settings.hostname
        self.max_recipients = settings.limits.max_recipients
        self.max_auth_failures = settings.limits.max_auth_failures
        self.reject_bare = settings.limits.bare_newline is BareNewline.REJECT
        self.users = users
        self.guesses = Guesses()
        self.implicit_tls = implicit_tls
        self.stopping = False  # set at shutdown: no new transaction starts (421)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: SmtpSession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.users is None:  # no AUTH to offer (aiosmtpd would offer its always-fail one)
            return [line for line in responses if not line.startswith("250-AUTH")]
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: SmtpSession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if self.stopping:  # a reused connection must not start a transaction after SIGTERM
            return SHUTTING_DOWN
        if self.users is not None and not session.authenticated:
            metrics.REJECTED.labels("auth_required").inc()
            return AUTH_REQUIRED
        if address != "<>":
            problem = address_problem(address)
            if problem is not None:
                metrics.REJECTED.labels("bad_sender").inc()
                return BAD_SENDER.format(reason=problem)
        if self._no_room(_size_of(options)):
            return NO_ROOM
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return SENDER_OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: SmtpSession,
        envelope: Transaction,
        address: str,
        options: list[str],
    ) -> str:
        # Every RCPT accepted counts, a repeat too, as in Postfix's smtpd_recipient_limit: a
        # repeat answered 250 without end was a flood no limit stopped (a core for an hour).
        if envelope.rcpt_accepted >= self.max_recipients:
            metrics.REJECTED.labels("too_many_recipients").inc()
            return TOO_MANY_RECIPIENTS
        if address in envelope.rcpt_tos:
            envelope.rcpt_accepted += 1
            return RECIPIENT_OK  # one copy each, as Postfix's cleanup keeps (its duplicate filter)
        problem = address_problem(address)
        if problem is not None:
            metrics.REJECTED.labels("bad_recipient").inc()
            return BAD_RECIPIENT.format(reason=problem)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_accepted += 1
        envelope.rcpt_options.extend(options)
        return RECIPIENT_OK

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        sender = "" if envelope.mail_from == "<>" else (envelope.mail_from or "")
        peer = peer_ip_of(session)
        note = ""
        if bare_line_ends(raw):
            if self.reject_bare:
                metrics.REJECTED.labels("bare_newline").inc()
                logs.event(log, "bare_newline_refused", level=logging.WARNING, peer=peer)
                return BARE_NEWLINE
            raw, note = _LINE_END.sub(b"\r\n", raw), NORMALIZED
            limit = server.data_size_limit
            if limit and len(raw) > limit:  # each bare line end grew by a byte: as stored
                metrics.REJECTED.labels("too_big").inc()
                return TOO_BIG_AT_DATA
        headers = header_block(raw)  # once, for the hop count and the Message-ID
        hops = len(_RECEIVED.findall(headers))
        if hops >= MAX_HOPS:
            metrics.REJECTED.labels("too_many_hops").inc()
            logs.event(log, "too_many_hops", level=logging.WARNING, peer=peer, hops=hops)
            return TOO_MANY_HOPS
        if self._no_room(2 * len(raw), spends=True):  # the WAL's copy, the database file's
            return NO_ROOM
        queue_id = self.spool.new_id()
        message_id = _message_id_in(headers)
        try:
            await self.spool.add(
                queue_id=queue_id,
                sender=sender,
                recipients=envelope.rcpt_tos,
                raw=raw,
                peer=peer,
                trace=self._trace(session, peer, queue_id),
                message_id=message_id,
                alone=len(getattr(server, "registry", ())) == 1,  # relay's Session: see spool
                note=note,
            )
        except SpoolError as exc:
            metrics.REJECTED.labels("spool").inc()
            logs.event(
                log,
                "spool_error",
                level=logging.ERROR,
                peer=peer,
                sender=sender,
                size=len(raw),
                error=str(exc),
            )
            return SPOOL_UNAVAILABLE
        metrics.RECEIVED.inc()
        logs.event(
            log,
            "accepted",
            id=queue_id,
            peer=peer,
            sender=sender,
            recipients=",".join(envelope.rcpt_tos),
            size=len(raw),
            message_id=message_id,
        )
        return QUEUED.format(queue_id=queue_id)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # no TLS after STARTTLS: aiosmtpd hangs up
            cause = error.__cause__
            _STARTTLS_FAILED(error=type(cause).__name__ if cause else "closed")
            return INTERNAL_ERROR
        log.error("event=session_error error=%r", error, exc_info=error)
        return INTERNAL_ERROR

    def _no_room(self, need: int, *, spends: bool = False) -> bool:
        """Whether `need` more bytes would take the spool's disk under spool_min_free, which
        is kept for the delivery side: a spool that filled its own disk could not record a
        claim, an outcome or a checkpoint, so nothing drained and nothing was accepted
        again until an admin freed space (Postfix's smtpd keeps queue_minfree so). Counted
        and sampled in the log; a disk relay cannot stat is left to the commit. With
        `spends` (a body about to be spooled), its bytes are taken off the reading."""
        if not self.spool_min_free:
            return False
        try:
            free = self._free()
        except OSError:
            return False
        if free - need < self.spool_min_free:
            free += self._reusable()
            if free - need < self.spool_min_free:
                metrics.REJECTED.labels("no_room").inc()
                _SPOOL_NO_ROOM(
                    level=logging.ERROR,
                    spool=self.spool_dir,
                    free=free,
                    min_free=self.spool_min_free,
                )
                return True
        if spends:
            self._free_bytes -= need
        return False

    def _free(self) -> int:
        """The spool disk's free bytes: statvfs at most once per FREE_FOR, less the bodies
        let in since. A statvfs at every MAIL and DATA was 5% of the event loop's samples
        at 20 sessions (bench/README.md, "The spool's free bytes, once per 0.1 s"): each
        let the spool writer thread take the GIL in the middle of a mail."""
        now = time.monotonic()
        if now - self._free_at >= FREE_FOR:
            self._free_bytes = free_bytes(self.spool_dir)
            self._free_at = now
        return self._free_bytes

    def _reusable(self) -> int:
        """Bytes of the database's free pages, what the mail delivered meanwhile left (the
        file keeps its size until a purge gives them back): room the next mails take
        before the disk's. Asked only near the floor, at most once per REUSABLE_FOR."""
        now = time.monotonic()
        if now - self._reusable_at >= REUSABLE_FOR:
            self._reusable_at = now
            try:
                with contextlib.closing(reader(self.spool.path, timeout=0.1)) as conn:
                    pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
                    size = conn.execute("PRAGMA page_size").fetchone()[0]
                self._reusable_bytes = int(pages) * int(size)
            except sqlite3.Error:
                self._reusable_bytes = 0
        return self._reusable_bytes

    def _trace(self, session: SmtpSession, peer: str, queue_id: str) -> bytes:
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if self.implicit_tls or session.ssl is not None:
            proto += "S"
        if session.authenticated:
            proto += "A"
        helo = _UNSAFE.sub("?", session.host_name or "unknown")[:255]
        date = _date(int(time.time()))
        return (
            f"Received: from {helo} ({peer})\r\n\tby {self.hostname} (relay) with {proto}"
            f" id {queue_id};\r\n\t{date}\r\n"
        ).encode("ascii", "replace")


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322 date of `second`, local time: one formatting per second, not per mail."""
    return email.utils.formatdate(second, localtime=True)
