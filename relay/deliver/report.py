"""A delivery status notification as a mail (RFC 3464): what it says, not when it is due.

    relay.deliver.dsn (when, to whom, about which failures) -> notice(mail, failures)
        -> multipart/report: a text part for people, message/delivery-status (one block
           per recipient: Final-Recipient, Action, Status, Diagnostic-Code), the headers
           of the mail it reports on -> a spool `Notice` with its own queue id and trace

The words are Postfix's where people know them (the subjects, "This is the mail
system at host ..."), so a notice from relay reads like one from the original host.
"""

from __future__ import annotations

import quopri
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

from relay.mail import Mail, header_block
from relay.spool import Notice, new_id

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
# The enhanced code of a reply comes right after its basic code (RFC 3463 3.1), not
# anywhere: "554 Client host [192.5.4.21] blocked" has none (it read 5.4.21).
_REPLY_STATUS = re.compile(
    r"^\s*(?:smtp;\s*)?(?:[245]\d\d[ -]\s*)?([245]\.\d{1,3}\.\d{1,3})\b", re.IGNORECASE
)
_BASIC = re.compile(r"^\s*([245])\d\d\b")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
DIAGNOSTIC_MAX = 900  # characters of a Diagnostic-Code (a line of mail: at most 998)
SUBJECT_FAILED = "Undelivered Mail Returned to Sender"  # Postfix's words, which people know
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
HEADERS_MAX = 50_000  # bytes of the reported mail's headers a notice carries (Postfix's
# bounce_size_limit): the rest is cut at a line, so a mail of megabytes of headers does
# not come back as a notice the original host refuses for its size
LINE_MAX = 998  # characters of a line of mail (RFC 5322 2.1.1)
UNREACHABLE = "4.4.1"  # RFC 3463: no answer from the host (Postfix's status for a refused connect)
BOUNDARY_MAX = 70  # characters of a MIME boundary (RFC 2046 5.1.1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One recipient that will not get the mail, and what the far side said."""

    recipient: str
    reply: str  # e.g. "550 5.1.1 <a@example.org>: no such user"
    status: str = ""  # RFC 3463 code; "" = taken from `reply` (5.0.0 / 4.4.7 if none there)
    remote: str = ""  # who refused: "dns; smtp.example.org" (Remote-MTA), if known
    note: str = ""  # relay's words before the reply in the text for people ("gave up after ...")


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
    # RFC 2046 5.1.1: at most 70 characters (an EC2 host name alone is 45)
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"[:BOUNDARY_MAX]
    message_id = f"<{queue_id}.dsn@{hostname}>"
    rcpts = ", ".join(f.recipient for f in failures)
    until = formatdate(retry_until, localtime=True) if retry_until else ""
    if delayed:
        why = [
            "Your message could not be delivered to one or more recipients yet.",
            f"It will be retried{f' until {until}' if until else ''}; you need not send it again.",
        ]
        action = ["Action: delayed", *([f"Will-Retry-Until: {until}"] if until else [])]
    else:
        why = [
            "Your message could not be delivered to one or more recipients;",
            "it will not be retried. The reasons follow.",
        ]
        action = ["Action: failed"]
    status = _status(mail, failures, hostname, action, delayed=delayed)
    # RFC 6533 when an address is not ASCII (SMTPUTF8): its global form, its bytes as 8bit
    report, encoding = "delivery-status", "7bit"
    if not status.isascii():
        report, encoding = "global-delivery-status", "8bit"
        status = status.replace(b"Final-Recipient: rfc822; ", b"Final-Recipient: utf-8; ")
    head = _lines(
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{mail.sender}>",
        f"Subject: {SUBJECT_DELAYED if delayed else SUBJECT_FAILED}",
        f"Date: {formatdate(now, localtime=True)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report}; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    )
    headers = _capped(mail.trace + header_block(mail.raw))
    # RFC 6533 6.3: headers in UTF-8 (or any 8-bit bytes) are message/global-headers
    headers_type = "text/rfc822-headers" if headers.isascii() else "message/global-headers"
    parts = (
        _part(
            boundary,
            "text/plain; charset=utf-8",
            _human(mail, failures, hostname, why),
            "quoted-printable",
        ),
        _part(boundary, f"message/{report}", status, encoding),
        _part(
            boundary,
            headers_type,
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


def is_status(text: str) -> bool:
    """Whether `text` is an RFC 3463 status code and nothing else (4.2.2, 5.1.1)."""
    return _ENHANCED.fullmatch(text) is not None


def status_in(text: str) -> str:
    """The RFC 3463 status code of `text` (a reply, SES's diagnostic), or ""."""
    found = _REPLY_STATUS.match(text)
    return found.group(1) if found else ""


def replied(text: str) -> bool:
    """Whether `text` is a reply a host gave (it starts with a reply code)."""
    return _BASIC.match(text) is not None


def status_of(failure: Failure, *, delayed: bool = False) -> str:
    """The RFC 3463 status for `failure`: given, else in its reply, else from the reply
    code; else 4.4.7 (delivery time expired) for a failure, 4.0.0 for a delay. A delay is
    never 5.x.x (a 554 banner relay still retries past), as Postfix's soft_bounce says."""
    status = failure.status if is_status(failure.status) else status_of_reply(failure.reply)
    if not status:
        status = "4.0.0" if delayed else "4.4.7"
    return f"4{status[1:]}" if delayed and status.startswith("5") else status


def status_of_reply(reply: str) -> str:
    """The status a host's reply gives: its enhanced code, else 5.0.0 for a 5xx, else ""."""
    found = status_in(reply)
    if found:
        return found
    basic = _BASIC.match(reply)
    return "5.0.0" if basic and basic.group(1) == "5" else ""


def _human(mail: Mail, failures: Sequence[Failure], hostname: str, why: list[str]) -> bytes:
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        *why,
        "",
        f"Message-ID: {mail.message_id or '(none)'}",
        f"Queue id: {mail.id}",
        "",
        *(
            f"<{f.recipient}>: {_clean(f'{f.note}: {f.reply}' if f.note else f.reply)}"
            for f in failures
        ),
        "",
    ]
    return quopri.encodestring("\r\n".join(lines).encode("utf-8", "replace"))


def _status(
    mail: Mail, failures: Sequence[Failure], hostname: str, action: list[str], *, delayed: bool
) -> bytes:
    """The message/delivery-status part: relay's block, then one per recipient with
    `action` (Action, and Will-Retry-Until for a delay)."""
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
            f"Final-Recipient: rfc822; {_clean(failure.recipient)}",
            action[0],
            f"Status: {status_of(failure, delayed=delayed)}",
            *action[1:],
        ]
        if failure.remote:
            block.append(f"Remote-MTA: {failure.remote}")
        if reply:
            block.append(f"Diagnostic-Code: {_diagnostic(reply)}")
        blocks.append(block)
    return b"".join(_lines(*block, "") for block in blocks)


def _diagnostic(reply: str) -> str:
    """`smtp; ` and the reply when it is one (an SMTP host's, or SES's `smtp; 550 ...`), else
    `X-Relay; ` and relay's words, as Postfix writes `X-Postfix; `. In ASCII (the field is
    one; SES and hosts may write other bytes), within DIAGNOSTIC_MAX characters: with many
    recipients the replies joined ran past 10,000, over the 998 a line of mail may have."""
    if reply.lower().startswith("smtp;"):
        reply = reply[5:].lstrip()
    kind = "smtp" if _BASIC.match(reply) else "X-Relay"
    text = reply.encode("ascii", "replace").decode("ascii")
    if len(text) > DIAGNOSTIC_MAX:
        text = text[: DIAGNOSTIC_MAX - 3] + "..."
    return f"{kind}; {text}"


def _part(boundary: str, content_type: str, body: bytes, encoding: str = "7bit") -> bytes:
    head = _lines(
        f"--{boundary}",
        f"Content-Type: {content_type}",
        f"Content-Transfer-Encoding: {encoding}",
        "",
    )
    return head + body.rstrip(b"\r\n") + b"\r\n\r\n"


def header_lines(fields: Sequence[tuple[str, str]]) -> bytes:
    """Header fields given as (name, value) pairs (SES's event JSON: any text) as a header
    block: a field without a valid name is left out, a value made one line of at most
    LINE_MAX characters, so none of them can end the block early or add a field."""
    lines = [
        f"{name}: {_clean(value)}"[:LINE_MAX]
        for name, value in fields
        if _FIELD_NAME.fullmatch(name)
    ]
    return _lines(*lines, "")


def _capped(headers: bytes) -> bytes:
    """`headers` cut after the last whole line within HEADERS_MAX bytes."""
    if len(headers) <= HEADERS_MAX:
        return headers
    end = headers.rfind(b"\n", 0, HEADERS_MAX)
    return headers[: end + 1] if end >= 0 else b""


def _clean(text: str) -> str:
    """One line, no control characters (a reply may span lines)."""
    return _UNSAFE.sub(" ", text).strip()


def _lines(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8", "replace")
