"""`relay doctor`'s checks of what comes back after the 250 (relay.deliver.feedback):

    ok    events    https://sqs.../relay-ses-events: reachable, 0 messages waiting
    ok    events    moodle-reminders: publishes Bounce, Complaint, Reject (relay-events)
    warn  rates     bounce rate 3.1% (31 of 1000 SES sends, 7 days): half of SES's 5% review
    warn  feedback  moodle.example.org: SES also emails each bounce ... counts each twice

SES forwards bounces and complaints by email to the Return-Path (the envelope sender,
Moodle's VERP address) unless forwarding is off for the identity; relay sends its own
DSN for each SES bounce it hears of, so Moodle would count each bounce twice.

Returns (status, check, detail) lines for the doctor's report; none when
`ses.events.queue_url` is not set (relay then learns nothing after the send).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from relay.deliver.feedback import RATE_WINDOW, judge, sqs_location
from relay.settings import Settings
from relay.spool import DB_NAME, reader
from relay.spool.feedback import reputation

OK, WARN, FAIL = "ok", "warn", "FAIL"
NEEDED = ("bounce", "complaint", "reject")  # event types relay acts on
ELSEWHERE = {"CloudWatchDestination", "KinesisFirehoseDestination"}  # kinds no queue hears
_ERRORS = (BotoCoreError, ClientError, OSError)

Line = tuple[str, str, str]
# SES reports a soft bounce once it stops retrying, and a complaint when the mailbox
# provider sends one: hours or days after the send. An event for a row already purged
# (`retention`) is dropped as unknown, and its DSN never goes.
LATE_EVENTS = 2 * 86400.0
_SHORT_RETENTION = (
    "retention {seconds:.0f} s: SES events that come later than that (complaints can come"
    " days after the send) find no row, are dropped as unknown, and send no DSN; keep 2 days"
    " or more"
)


async def lines(
    settings: Settings, configuration_sets: Sequence[str], identities: Sequence[str] = ()
) -> list[Line]:
    """The events queue, each configuration set's event destinations, the SES rates, and
    email feedback forwarding on the sending `identities`."""
    if not settings.ses.events_queue_url:
        return []
    found = await _queue(settings)
    if settings.retention < LATE_EVENTS:
        found.append((WARN, "events", _SHORT_RETENTION.format(seconds=settings.retention)))
    found += await _destinations(settings, configuration_sets)
    found += _rates(settings.spool, min(RATE_WINDOW, settings.retention))
    found += await _forwarding(settings, identities)
    return found


async def _forwarding(settings: Settings, identities: Sequence[str]) -> list[Line]:
    """Email feedback forwarding would reach Moodle beside relay's DSN (module docstring);
    not when relay sends no DSN, or SES forwards elsewhere (`ses.source`, which is then
    the Return-Path, or `ses.feedback_address`)."""
    if not identities or not settings.bounces.dsn:
        return []
    if settings.ses.source or settings.ses.feedback_address:
        return []
    try:
        async with get_session().create_client(
            "ses",
            region_name=settings.ses.region,
            endpoint_url=settings.ses.endpoint_url,
            config=_config(settings),
        ) as ses:
            answer = await ses.get_identity_notification_attributes(Identities=list(identities))
    except _ERRORS as exc:
        return [(WARN, "feedback", f"email feedback forwarding unknown: {exc}")]
    found: list[Line] = []
    for identity in identities:
        attributes = answer.get("NotificationAttributes", {}).get(identity, {})
        if not attributes.get("ForwardingEnabled", True):
            detail = f"{identity}: email feedback forwarding off (relay's DSN tells Moodle)"
            found.append((OK, "feedback", detail))
            continue
        detail = (
            f"{identity}: SES also emails each bounce to the Return-Path (Moodle's), beside"
            " relay's DSN: Moodle counts each twice. Turn email feedback forwarding off (SNS"
            " topics for bounces and complaints needed), or set ses.feedback_address (api v2)"
        )
        found.append((WARN, "feedback", detail))
    return found


def _config(settings: Settings) -> AioConfig:
    timeout = min(10.0, settings.ses.timeout)
    return AioConfig(retries={"total_max_attempts": 1}, connect_timeout=timeout)


async def _queue(settings: Settings) -> list[Line]:
    url = settings.ses.events_queue_url or ""
    region, endpoint = sqs_location(url, settings.ses.region)
    session = get_session()
    try:
        async with session.create_client(
            "sqs", region_name=region, endpoint_url=endpoint, config=_config(settings)
        ) as sqs:
            answer = await sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
            )
    except _ERRORS as exc:
        return [(FAIL, "events", f"{url}: not reachable: {exc}")]
    waiting = answer.get("Attributes", {}).get("ApproximateNumberOfMessages", "?")
    return [(OK, "events", f"{url}: reachable, {waiting} messages waiting")]


async def _destinations(settings: Settings, names: Sequence[str]) -> list[Line]:
    """Each configuration set relay sends with must publish Bounce, Complaint and Reject to
    a destination that can reach the queue: SNS (or EventBridge, which SES v1 describes
    without a kind), not CloudWatch or Firehose."""
    if not names:
        why = "no configuration set (ses.configuration_set or a rule's): SES publishes no events"
        return [(WARN, "events", why)]
    found: list[Line] = []
    session = get_session()
    async with session.create_client(
        "ses",
        region_name=settings.ses.region,
        endpoint_url=settings.ses.endpoint_url,
        config=_config(settings),
    ) as ses:
        for name in names:
            try:
                answer: dict[str, Any] = await ses.describe_configuration_set(
                    ConfigurationSetName=name, ConfigurationSetAttributeNames=["eventDestinations"]
                )
            except _ERRORS as exc:
                found.append((FAIL, "events", f"{name}: event destinations unknown: {exc}"))
                continue
            enabled = [
                d
                for d in answer.get("EventDestinations", ())
                if d.get("Enabled") and not d.keys() & ELSEWHERE
            ]
            types = {t.lower() for d in enabled for t in d.get("MatchingEventTypes", ())}
            missing = [t.capitalize() for t in NEEDED if t not in types]
            where = (
                ", ".join(d.get("Name", "?") for d in enabled)
                or "none enabled to SNS or EventBridge"
            )
            if missing:
                detail = f"{name}: no event destination for {', '.join(missing)} ({where})"
                found.append((FAIL, "events", detail))
            else:
                detail = f"{name}: publishes Bounce, Complaint, Reject ({where})"
                found.append((OK, "events", detail))
    return found


def _rates(directory: Path, window: float) -> list[Line]:
    db = directory / DB_NAME
    if not db.is_file():
        return []
    try:
        with contextlib.closing(reader(db)) as c:
            seen = reputation(c, time.time() - window)
    except sqlite3.Error as exc:  # an older spool without the feedback table, for one
        return [(WARN, "rates", f"{db}: cannot read SES feedback: {exc}")]
    levels = {"ok": OK, "warn": WARN, "high": FAIL}
    found: list[Line] = [(levels[level], "rates", text) for level, text in judge(seen, window)]
    return found
