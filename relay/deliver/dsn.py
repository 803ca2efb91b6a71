"""Delivery status notifications (RFC 3464): what a mail's sender hears when it fails for good.

    deliver loop: upstream 5xx / retry.max_age -> for_outcome(mail, failures)
    SES feedback: a Bounce or Reject event -> for_ses_event(event) (when its mail is found)
        -> notice(mail, failures) -> spool (same transaction as the outcome or event)
        -> a mail of its own: MAIL FROM:<>, to the envelope sender, upstream only
    deferred past `bounces.delay_warning` -> delay_warning(): "still trying", once
        (relay's own deferral, or SES's DeliveryDelay event: for_ses_event too)

Moodle sends with a VERP envelope sender when bounce handling is on and counts
the notices that come back, as it did when the original host answered 5xx at
once. No notice for a mail from the null sender `<>`, so never one about a notice.
"""

from __future__ import annotations

import quopri
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from email.utils import formatdate

from relay import metrics
from relay.deliver.ses.events import SesEvent
from relay.mail import Mail, header_block
from relay.settings import Settings
from relay.spool import Notice, new_id
from relay.spool.feedback import NoticeFor

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_BASIC = re.compile(r"^\s*([245])\d\d\b")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
SUBJECT_FAILED = "Undelivered Mail Returned to Sender"  # Postfix's words, which people know
SUBJECT_DELAYED = "Delayed Mail (still being retried)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One recipient that will not get the mail, and what the far side said."""

    recipient: str
    reply: str  # e.g. "550 5.1.1 <a@example.org>: no such user"
    status: str = ""  # RFC 3463 code; "" = taken from `reply` (5.0.0 / 4.4.7 if none there)
    remote: str = ""  # who refused: "dns; smtp.example.org" (Remote-MTA), if known


def wanted(mail: Mail) -> bool:
    """Whether a mail may have a DSN: not from the null sender, not a DSN itself."""
    return bool(mail.sender) and not mail.reports_on


def refused(settings: Settings, recipient: str, reply: str) -> Failure:
    """A recipient the original host refused for good."""
    return Failure(recipient=recipient, reply=reply, remote=f"dns; {settings.upstream.host}")


def for_outcome(mail: Mail, failures: Sequence[Failure], settings: Settings) -> Notice | None:
    """The DSN to queue with an outcome that has `failures`, if any is due (`bounces.dsn`)."""
    if not failures or not settings.bounces.dsn or not wanted(mail):
        return None
    metrics.DSNS.inc()
    hostname = settings.hostname
    return notice(mail, failures, hostname=hostname, from_address=settings.bounces.sender(hostname))


def for_ses_event(event: SesEvent, settings: Settings) -> NoticeFor | None:
    """For the spool's transaction (relay.deliver.feedback): the DSN about an SES Bounce's
    recipients, with SES's status and diagnostic, or a Reject's (all of them, 5.7.1); or,
    with `bounces.delay_warning`, the "still trying" one about a DeliveryDelay's. None for
    the other events."""
    if event.type == "Reject":
        reply = f"554 5.7.1 SES rejected the message ({event.detail or 'no reason given'})"
        failures = [Failure(recipient=r.address, reply=reply) for r in event.recipients]
    elif event.type == "Bounce" or event.delayed:
        soft = event.delayed or event.bounce_type == "Transient"
        fallback = "4.0.0" if soft else "5.0.0"  # when SES gives no status
        said = (
            f"SES delivery delay ({event.detail or 'no reason given'})"
            if event.delayed
            else f"SES bounce {event.bounce_type}/{event.bounce_subtype}"
        )
        failures = [
            Failure(
                recipient=r.address,
                reply=r.diagnostic or said,
                status=r.status if r.status[:1] in ("4", "5") else fallback,
            )
            for r in event.recipients
        ]
    else:
        return None
    if event.delayed and settings.bounces.delay_warning is None:
        return None
    until = _epoch(event.expires)

    def notice_for(mail: Mail) -> Notice | None:
        if not mail.raw:  # the body went after sending: the headers SES sent with the event
            lines = event.headers or (("Message-ID", mail.message_id),)
            raw = "".join(f"{name}: {value}\r\n" for name, value in lines) + "\r\n"
            mail = replace(mail, raw=raw.encode("utf-8", "replace"))
        if event.delayed:
            return _warning(mail, failures, settings, retry_until=until)
        return for_outcome(mail, failures, settings)

    return notice_for


def status_of(failure: Failure) -> str:
    """The RFC 3463 status for `failure`: given, else in its reply, else from the reply code."""
    if failure.status:
        return failure.status
    found = _ENHANCED.search(failure.reply)
    if found:
        return found.group(1)
    basic = _BASIC.match(failure.reply)
    return "5.0.0" if basic and basic.group(1) == "5" else "4.4.7"


def delay_warning(mail: Mail, reply: str, settings: Settings) -> Notice | None:
    """The "still trying" DSN once `mail` has waited `bounces.delay_warning` (the spool
    queues one per mail at most); None when off, not yet due, or not wanted."""
    delayed = [Failure(recipient=r, reply=reply) for r in mail.recipients]
    return _warning(mail, delayed, settings, retry_until=mail.received_at + settings.retry.max_age)


def _warning(
    mail: Mail, delayed: Sequence[Failure], settings: Settings, *, retry_until: float | None
) -> Notice | None:
    after = settings.bounces.delay_warning
    if after is None or time.time() - mail.received_at < after or not wanted(mail):
        return None
    if not settings.bounces.dsn:
        return None
    hostname = settings.hostname
    return notice(
        mail,
        delayed,
        hostname=hostname,
        from_address=settings.bounces.sender(hostname),
        delayed=True,
        retry_until=retry_until,
    )


def _epoch(stamp: str) -> float | None:
    """An ISO 8601 time of SES's ("2026-12-04T22:00:01.000Z") in seconds, or None."""
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else None
    except ValueError:
        return None


def notice(
    mail: Mail,
    failures: Sequence[Failure],
    *,
    hostname: str,
    from_address: str,
    delayed: bool = False,
    retry_until: float | None = None,
) -> Notice:
    """The DSN for `failures` of `mail`, ready for the spool (its own queue id and trace).

    `delayed`: a delay warning instead (Action: delayed; Will-Retry-Until, when known)."""
    queue_id = new_id()
    now = time.time()
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"
    message_id = f"<{queue_id}.dsn@{hostname}>"
    rcpts = ", ".join(f.recipient for f in failures)
    head = _lines(
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{mail.sender}>",
        f"Subject: {SUBJECT_DELAYED if delayed else SUBJECT_FAILED}",
        f"Date: {formatdate(now, localtime=True)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    )
    headers = mail.trace + header_block(mail.raw)
    parts = (
        _part(
            boundary,
            "text/plain; charset=utf-8",
            _human(mail, failures, hostname, delayed, retry_until),
            "quoted-printable",
        ),
        _part(
            boundary,
            "message/delivery-status",
            _status(mail, failures, hostname, delayed, retry_until),
        ),
        _part(
            boundary,
            "text/rfc822-headers",
            headers.rstrip(b"\r\n") + b"\r\n",
            "7bit" if headers.isascii() else "8bit",
        ),
    )
    raw = head + b"".join(parts) + f"--{boundary}--\r\n".encode()
    trace = _lines(
        f"Received: from {hostname} (delivery status notification)",
        f"\tby {hostname} (relay) with local id {queue_id};",
        f"\t{formatdate(now, localtime=True)}",
    )
    return Notice(
        id=queue_id,
        recipient=mail.sender,
        raw=raw,
        trace=trace,
        message_id=message_id,
        summary=f"{'delayed' if delayed else 'failed'}: {rcpts}",
        kind="delayed" if delayed else "failed",
    )


def _human(
    mail: Mail,
    failures: Sequence[Failure],
    hostname: str,
    delayed: bool,
    retry_until: float | None,
) -> bytes:
    if delayed:
        until = f" until {formatdate(retry_until, localtime=True)}" if retry_until else ""
        why = [
            "Your message could not be delivered to one or more recipients yet.",
            f"It will be retried{until}; you need not send it again.",
        ]
    else:
        why = [
            "Your message could not be delivered to one or more recipients;",
            "it will not be retried. The reasons follow.",
        ]
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        *why,
        "",
        f"Message-ID: {mail.message_id or '(none)'}",
        f"Queue id: {mail.id}",
        "",
        *(f"<{f.recipient}>: {_clean(f.reply)}" for f in failures),
        "",
    ]
    return quopri.encodestring("\r\n".join(lines).encode("utf-8"))


def _status(
    mail: Mail,
    failures: Sequence[Failure],
    hostname: str,
    delayed: bool,
    retry_until: float | None,
) -> bytes:
    blocks = [
        [
            f"Reporting-MTA: dns; {hostname}",
            f"X-Relay-Queue-ID: {mail.id}",
            f"Arrival-Date: {formatdate(mail.received_at or time.time(), localtime=True)}",
        ]
    ]
    for failure in failures:
        reply = _clean(failure.reply)
        block = [
            f"Final-Recipient: rfc822; {failure.recipient}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {status_of(failure)}",
        ]
        if retry_until:
            block.append(f"Will-Retry-Until: {formatdate(retry_until, localtime=True)}")
        if failure.remote:
            block.append(f"Remote-MTA: {failure.remote}")
        if reply:
            kind = "" if reply.lower().startswith("smtp;") else "smtp; "
            block.append(f"Diagnostic-Code: {kind}{reply}")
        blocks.append(block)
    return b"".join(_lines(*block, "") for block in blocks)


def _part(boundary: str, content_type: str, body: bytes, encoding: str = "7bit") -> bytes:
    head = _lines(
        f"--{boundary}",
        f"Content-Type: {content_type}",
        f"Content-Transfer-Encoding: {encoding}",
        "",
    )
    return head + body.rstrip(b"\r\n") + b"\r\n\r\n"


def _clean(text: str) -> str:
    """One line, no control characters (a reply may span lines)."""
    return _UNSAFE.sub(" ", text).strip()


def _lines(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8", "replace")
