"""SES event records as they arrive on the feedback queue, read into one value.

    configuration set -> SNS topic -> SQS   body: {"Type": "Notification", "Message": "<event>"}
    configuration set -> EventBridge -> SQS body: {"source": "aws.ses", "detail": {event}}
    SNS with raw message delivery -> SQS    body: {event}

`parse(body)` -> `SesEvent`, or `MalformedEvent` when the body is none of these
(relay.deliver.feedback logs it once and deletes it; it deletes the types in UNUSED
without a word). The event fields follow
SES's "Contents of event data" pages: `eventType` (`notificationType` for identity
notifications), `mail.messageId`, and per type `bounce` / `complaint` / `delivery`
/ `reject` / `deliveryDelay`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from relay.errors import MalformedEvent

TYPES = ("Bounce", "Complaint", "Delivery", "Reject", "DeliveryDelay", "Send")
SUMMARY_MAX = 4000  # characters of an event's history line (a bounce may name 10,000 recipients)
# SES's other event types: about opens, clicks, templates and subscription pages, not about
# whether a mail arrived. Deleted unrecorded, as a configuration set may publish them too.
UNUSED = ("Open", "Click", "Rendering Failure", "Subscription")
_OBJECT = {
    "Bounce": "bounce",
    "Complaint": "complaint",
    "Delivery": "delivery",
    "Reject": "reject",
    "DeliveryDelay": "deliveryDelay",
    "Send": "send",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipient:
    """One recipient an event names; status and diagnostic for bounces and delays."""

    address: str
    status: str = ""
    diagnostic: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SesEvent:
    type: str  # one of TYPES, or of UNUSED (then nothing else is read)
    message_id: str  # SES's MessageId, as SendRawEmail returned it
    key: str  # the same event delivered twice has the same key
    timestamp: str
    recipients: tuple[Recipient, ...]
    bounce_type: str = ""  # Permanent | Transient | Undetermined
    bounce_subtype: str = ""
    detail: str = ""  # reject reason, complaint type, SMTP response, delay type
    expires: str = ""  # DeliveryDelay: when SES stops retrying (`expirationTime`, ISO 8601)
    headers: tuple[tuple[str, str], ...] = ()  # the sent mail's headers, when SES includes them

    @property
    def permanent_bounce(self) -> bool:
        return self.type == "Bounce" and self.bounce_type == "Permanent"

    @property
    def failed_for_good(self) -> bool:
        """The recipients named will not get the mail: a Bounce of any type (SES publishes
        a soft one only once it has stopped retrying: SESv2 `EventDestination`'s docs), or a
        Reject (SES took the call, then refused to send the message: a virus, for one)."""
        return self.type in ("Bounce", "Reject")

    @property
    def delayed(self) -> bool:
        """SES could not deliver yet to the recipients named, and is still retrying."""
        return self.type == "DeliveryDelay"

    @property
    def failed(self) -> tuple[str, ...]:
        """The addresses that will not get the mail (see failed_for_good); none otherwise."""
        return tuple(r.address for r in self.recipients) if self.failed_for_good else ()

    @property
    def delivered(self) -> tuple[str, ...]:
        """The addresses SES delivered the mail to (a Delivery); none otherwise."""
        return tuple(r.address for r in self.recipients) if self.type == "Delivery" else ()

    @property
    def suppressible(self) -> tuple[str, ...]:
        """The addresses SES may have put on the account suppression list just now: those
        of a hard bounce or a complaint."""
        if self.permanent_bounce or self.type == "Complaint":
            return tuple(r.address for r in self.recipients)
        return ()

    @property
    def rate_kind(self) -> str:
        """What the event counts as in the rates: SES's bounce rate counts hard (Permanent)
        bounces only, so a soft one is "transient_bounce"."""
        if self.type == "Bounce" and not self.permanent_bounce:
            return "transient_bounce"
        return self.type.lower()

    def summary(self) -> str:
        """One line for the mail's history (`relay queue show`)."""
        parts = [f"ses_message_id={self.message_id}", f"at={self.timestamp}"]
        if self.bounce_type:
            parts.append(f"bounce={self.bounce_type}/{self.bounce_subtype}")
        if self.detail:
            parts.append(f"detail={self.detail}")
        if self.expires:
            parts.append(f"until={self.expires}")
        for r in self.recipients:
            extra = " ".join(x for x in (r.status, r.diagnostic) if x)
            parts.append(f"{r.address}" + (f" ({extra})" if extra else ""))
        line = " ".join(parts)
        return line if len(line) <= SUMMARY_MAX else line[: SUMMARY_MAX - 3] + "..."


def parse(body: str) -> SesEvent:
    """The SES event in an SQS message body (SNS-wrapped, EventBridge or raw)."""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
            doc = json.loads(doc["Message"])
        elif isinstance(doc, dict) and doc.get("source") == "aws.ses" and "detail" in doc:
            doc = doc["detail"]
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: "[[[[..."
        raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedEvent("not a JSON object")
    try:
        return _event(doc)
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedEvent(f"not an SES event: missing or wrong {exc}") from exc


def _event(doc: dict[str, Any]) -> SesEvent:
    kind = doc.get("eventType") or doc.get("notificationType")
    if kind in UNUSED:
        mail_id = (doc.get("mail") or {}).get("messageId") or ""
        return SesEvent(type=kind, message_id=_text(mail_id), key="", timestamp="", recipients=())
    if kind not in _OBJECT:
        raise MalformedEvent(f"unknown SES event type {kind!r}")
    mail = doc["mail"]
    message_id = _text(mail["messageId"])
    inner: dict[str, Any] = doc.get(_OBJECT[kind]) or {}
    timestamp = _text(inner.get("timestamp") or mail.get("timestamp") or "")
    headers = tuple((_text(h["name"]), _text(h["value"])) for h in mail.get("headers") or ())
    common: dict[str, Any] = {"message_id": message_id, "timestamp": timestamp, "headers": headers}
    if kind == "Bounce":
        recipients = _as_sent(_with_status(inner["bouncedRecipients"]), mail.get("destination"))
        return SesEvent(
            type=kind,
            key=f"Bounce/{message_id}/{_text(inner.get('feedbackId') or timestamp)}",
            recipients=recipients,
            bounce_type=_text(inner["bounceType"]),
            bounce_subtype=_text(inner.get("bounceSubType") or ""),
            **common,
        )
    if kind == "Complaint":
        recipients = tuple(
            Recipient(address=_text(r["emailAddress"])) for r in inner["complainedRecipients"]
        )
        return SesEvent(
            type=kind,
            key=f"Complaint/{message_id}/{_text(inner.get('feedbackId') or timestamp)}",
            recipients=recipients,
            detail=_text(inner.get("complaintFeedbackType") or ""),
            **common,
        )
    if kind == "DeliveryDelay":
        recipients = _with_status(inner.get("delayedRecipients") or ())
        return SesEvent(
            type=kind,
            key=f"DeliveryDelay/{message_id}/{timestamp}",
            recipients=recipients,
            detail=_text(inner.get("delayType") or ""),
            expires=_text(inner.get("expirationTime") or ""),
            **common,
        )
    addresses = inner.get("recipients") if kind == "Delivery" else mail.get("destination")
    detail = {"Delivery": "smtpResponse", "Reject": "reason"}.get(kind, "")
    return SesEvent(
        type=kind,
        key=f"{kind}/{message_id}/{timestamp}/{','.join(map(_text, addresses or ()))}",
        recipients=tuple(Recipient(address=_text(a)) for a in addresses or ()),
        detail=_text(inner.get(detail) or "") if detail else "",
        **common,
    )


def _as_sent(recipients: tuple[Recipient, ...], destination: Any) -> tuple[Recipient, ...]:
    """SES names a bounced recipient by the remote DSN's Final-Recipient when there is one
    (an address that forwards or is an alias): with one destination, which every Moodle mail
    has, that is the address relay sent to. Matched to none, the bounce reached nobody: no
    DSN, and the mail stayed `sent`. SES's address goes into the diagnostic."""
    sent = [_text(a) for a in destination] if isinstance(destination, list) else []
    if len(sent) != 1 or not recipients:
        return recipients
    ours = [r for r in recipients if r.address.lower() == sent[0].lower()]
    if ours:
        return tuple(ours)
    first = recipients[0]
    final = ", ".join(r.address for r in recipients)
    diagnostic = f"{first.diagnostic} (as {final})".strip()
    return (replace(first, address=sent[0], diagnostic=diagnostic),)


def _with_status(items: Any) -> tuple[Recipient, ...]:
    """Bounce and DeliveryDelay recipients: address, status and diagnostic code."""
    return tuple(
        Recipient(
            address=_text(r["emailAddress"]),
            status=_text(r.get("status") or ""),
            diagnostic=_text(r.get("diagnosticCode") or ""),
        )
        for r in items
    )


def _text(value: Any) -> str:
    """A JSON value as text SQLite and a DSN can carry: JSON's "\\ud800" decodes to a lone
    surrogate, which SQLite's driver refuses (the event would come back from SQS forever)."""
    return str(value).encode("utf-8", "replace").decode("utf-8")
