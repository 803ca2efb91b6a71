"""Delivery status notifications (RFC 3464): what a mail's sender hears when it fails for good.

    deliver loop: upstream 5xx / retry.max_age -> for_outcome(mail, failures)
    SES feedback: a Bounce or Reject event -> for_ses_event(event) (when its mail is found)
        -> report.notice(mail, failures) -> spool (same transaction as the outcome or event)
        -> a mail of its own: MAIL FROM:<>, to the envelope sender, upstream only
    deferred past `bounces.delay_warning` -> delay_warning(): "still trying", once
        (relay's own deferral, or SES's DeliveryDelay event: for_ses_event too)

Moodle sends with a VERP envelope sender when bounce handling is on and counts
the notices that come back, as it did when the original host answered 5xx at
once. No notice for a mail from the null sender `<>`, so never one about a notice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from relay import metrics
from relay.deliver.report import Failure, header_lines, is_status, notice, status_in
from relay.deliver.ses.events import Recipient, SesEvent
from relay.mail import Mail
from relay.settings import Settings
from relay.settings.sections import YEAR
from relay.spool import Notice
from relay.spool.feedback import NoticeFor


def wanted(mail: Mail) -> bool:
    """Whether a mail may have a DSN: not from the null sender, not a DSN itself."""
    return bool(mail.sender) and not mail.reports_on


def none_because(mail: Mail, settings: Settings) -> str:
    """Why a mail that failed gets no DSN, for its log line: "" when it gets one. Postfix
    leaves such double bounces unsaid too by default; the log line is where they show."""
    if not mail.sender:
        return "none: null sender <>"
    if mail.reports_on:
        return f"none: it is relay's DSN about {mail.reports_on}"
    return "" if settings.bounces.dsn else "none: bounces.dsn is off"


def refused(settings: Settings, recipient: str, reply: str, *, status: str = "") -> Failure:
    """A recipient the original host refused for good (or relay for it: `status` given)."""
    remote = f"dns; {settings.upstream.host}"
    return Failure(recipient=recipient, reply=reply, status=status, remote=remote)


def for_outcome(mail: Mail, failures: Sequence[Failure], settings: Settings) -> Notice | None:
    """The DSN to queue with an outcome that has `failures`, if any is due (`bounces.dsn`)."""
    built = _notice(mail, failures, settings) if failures else None
    if built is not None:
        metrics.DSNS.inc()
    return built


def for_ses_event(event: SesEvent, settings: Settings) -> NoticeFor | None:
    """For the spool's transaction (relay.deliver.feedback): the DSN about an SES Bounce's
    recipients, with SES's status and diagnostic, or a Reject's (all of them, 5.7.1); or,
    with `bounces.delay_warning`, the "still trying" one about a DeliveryDelay's. None for
    the other events."""
    if event.type == "Reject":  # relay's words (X-Relay;), not a reply some host gave
        reply = f"SES rejected the message ({event.detail or 'no reason given'})"
        failures = [
            Failure(recipient=r.address, reply=reply, status="5.7.1") for r in event.recipients
        ]
    elif event.type == "Bounce" or event.delayed:
        soft = event.delayed or event.bounce_type == "Transient"
        fallback = "4.0.0" if soft else "5.0.0"  # when SES gives no status
        said = (
            f"SES delivery delay ({event.detail or 'no reason given'})"
            if event.delayed
            else f"SES bounce {event.bounce_type}/{event.bounce_subtype}"
        )
        failures = [
            Failure(recipient=r.address, reply=r.diagnostic or said, status=_status(r, fallback))
            for r in event.recipients
        ]
    else:
        return None
    until = _epoch(event.expires)

    def notice_for(mail: Mail, already: frozenset[str], got: frozenset[str]) -> Notice | None:
        # Not again for a recipient an earlier event failed (SQS delivers twice, a Transient
        # bounce comes before the Permanent one), nor "still trying" after that DSN or for a
        # recipient SES said it delivered to (SQS hands events over in any order).
        ours = {r.lower() for r in mail.recipients}  # not an address the mail never had
        done = already | got if event.delayed else already
        left = [f for f in failures if f.recipient.lower() in ours - done]
        if not left:
            return None
        if not mail.raw:  # the body went after sending: the headers SES sent with the event
            lines = event.headers or (("Message-ID", mail.message_id),)
            mail = replace(mail, raw=header_lines(lines))
        if event.delayed:
            return _warning(mail, left, settings, retry_until=until)
        return for_outcome(mail, left, settings)

    return notice_for


def _status(recipient: Recipient, fallback: str) -> str:
    """SES's status for a recipient, else the one in its diagnostic, else `fallback`."""
    given = recipient.status if is_status(recipient.status) else status_in(recipient.diagnostic)
    return given if given.startswith(("4", "5")) else fallback


def delay_warning(mail: Mail, delayed: Sequence[Failure], settings: Settings) -> Notice | None:
    """The "still trying" DSN about `delayed` (each recipient with its last reply) once
    `mail` has waited `bounces.delay_warning` (the spool queues one per mail at most); None
    when off, not yet due, or not wanted."""
    return _warning(mail, delayed, settings, retry_until=mail.since + settings.retry.max_age)


def _warning(
    mail: Mail, delayed: Sequence[Failure], settings: Settings, *, retry_until: float | None
) -> Notice | None:
    after = settings.bounces.delay_warning
    if after is None or time.time() - mail.received_at < after:
        return None
    return _notice(mail, delayed, settings, delayed=True, retry_until=retry_until)


def _notice(
    mail: Mail,
    failures: Sequence[Failure],
    settings: Settings,
    *,
    delayed: bool = False,
    retry_until: float | None = None,
) -> Notice | None:
    """`report.notice` from `bounces`' sender, unless DSNs are off or the mail has none."""
    if not settings.bounces.dsn or not wanted(mail):
        return None
    hostname = settings.hostname
    return notice(
        mail,
        failures,
        hostname=hostname,
        from_address=settings.bounces.sender(hostname),
        delayed=delayed,
        retry_until=retry_until,
    )


def _epoch(stamp: str) -> float | None:
    """An ISO 8601 time of SES's ("2026-12-04T22:00:01.000Z") in seconds; None when there is
    none, or it is before 1970 or more than a year ahead (it is "Will-Retry-Until" in the
    DSN: a year 9999 one, in the machine's zone, is past what a date can be)."""
    try:
        when = datetime.fromisoformat(stamp).timestamp() if stamp else None
    except (ValueError, OverflowError):
        return None
    if when is None or not 0 <= when <= time.time() + YEAR:
        return None
    return when
