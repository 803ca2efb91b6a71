"""SES event feedback over SQS: moto in server mode is both SES (relay sends there) and SQS
(the configuration set's event destination); the events are shaped like SES's documented
event records, SNS-wrapped (SNS -> SQS) and as EventBridge delivers them. The original host
is a capture server, where the DSNs for permanent bounces arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from relay import metrics
from relay import settings as settings_mod
from relay.deliver.feedback import UNKNOWN_AFTER, SqsQueue, sqs_location
from relay.deliver.ses.events import parse
from relay.errors import ConfigError, MalformedEvent, TemporaryFailure
from relay.spool import DB_NAME, Spool
from relay.spool.feedback import reputation
from tests.support.aws import REGION, new_queue, sqs
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.processes import RelayProcess, relay_cli
from tests.support.relays import ConfigWriter, Running
from tests.support.smtp import asend, send
from tests.support.spools import await_rows, rows, wait_rows

pytestmark = pytest.mark.usefixtures("aws_env")

VERP = "mdl+a1b2c3@moodle.example.org"
ORIGIN = "https://moodle.example.org => web01:mod/reengagement/lib.php:564"
GONE, HERE = "gone@students.example.org", "here@students.example.org"
RAW = (
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b'To: "Ann Student" <gone@students.example.org>\r\n'
    b'From: "Moodle Support (via Example)" <noreply@moodle.example.org>\r\n'
    b"Subject: We miss you in BIO101\r\n"
    b"Message-ID: <5f1a2b3c4d5e63.12345678@moodle.example.org>\r\n"
    b"X-Moodle-Originating-Script: " + ORIGIN.encode() + b"\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Come back.\r\n"
)
ACCOUNT = "123456789012"
STAMP = "2026-12-04T10:00:01.000Z"
FROM = '"Moodle Support (via Example)" <noreply@moodle.example.org>'


# SES event records, shaped like "Examples of event data that Amazon SES publishes"


def mail_object(message_id: str, destination: list[str]) -> dict[str, Any]:
    return {
        "timestamp": "2026-12-04T10:00:00.000Z",
        "source": VERP,
        "sourceArn": f"arn:aws:ses:{REGION}:{ACCOUNT}:identity/moodle.example.org",
        "sendingAccountId": ACCOUNT,
        "messageId": message_id,
        "destination": destination,
        "headersTruncated": False,
        "headers": [
            {
                "name": "From",
                "value": '"Moodle Support (via Example)" <noreply@moodle.example.org>',
            },
            {"name": "To", "value": '"Ann Student" <gone@students.example.org>'},
            {"name": "Subject", "value": "We miss you in BIO101"},
            {"name": "Message-ID", "value": "<5f1a2b3c4d5e63.12345678@moodle.example.org>"},
        ],
        "commonHeaders": {
            "from": [FROM],
            "to": ['"Ann Student" <gone@students.example.org>'],
            "messageId": message_id,
            "subject": "We miss you in BIO101",
        },
        "tags": {"ses:configuration-set": ["moodle-reminders"], "rule": ["reengagement-student"]},
    }


def bounce(
    message_id: str,
    recipient: str = GONE,
    kind: str = "Permanent",
    subtype: str = "General",
    status: str = "5.1.1",
    diagnostic: str = "smtp; 550 5.1.1 user unknown",
) -> dict[str, Any]:
    return {
        "eventType": "Bounce",
        "bounce": {
            "bounceType": kind,
            "bounceSubType": subtype,
            "bouncedRecipients": [
                {
                    "emailAddress": recipient,
                    "action": "failed",
                    "status": status,
                    "diagnosticCode": diagnostic,
                }
            ],
            "timestamp": STAMP,
            "feedbackId": f"0100017{uuid.uuid4().hex[:10]}-{uuid.uuid4()}-000000",
            "reportingMTA": f"dns; a1-2.smtp-out.{REGION}.amazonses.com",
        },
        "mail": mail_object(message_id, [recipient]),
    }


def complaint(message_id: str, recipient: str = HERE) -> dict[str, Any]:
    return {
        "eventType": "Complaint",
        "complaint": {
            "complainedRecipients": [{"emailAddress": recipient}],
            "timestamp": STAMP,
            "feedbackId": f"0100017{uuid.uuid4().hex[:10]}-{uuid.uuid4()}-000000",
            "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
            "complaintFeedbackType": "abuse",
            "arrivalDate": STAMP,
        },
        "mail": mail_object(message_id, [recipient]),
    }


def delivery(message_id: str, recipient: str = HERE) -> dict[str, Any]:
    return {
        "eventType": "Delivery",
        "delivery": {
            "timestamp": STAMP,
            "processingTimeMillis": 546,
            "recipients": [recipient],
            "smtpResponse": "250 2.6.0 Message received",
            "reportingMTA": f"a8-70.smtp-out.{REGION}.amazonses.com",
            "remoteMtaIp": "192.0.2.7",
        },
        "mail": mail_object(message_id, [recipient]),
    }


def sns_wrapped(event: dict[str, Any]) -> str:
    """The SQS body when SES publishes to an SNS topic that an SQS queue subscribes to."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:ses-events",
            "Message": json.dumps(event),
            "Timestamp": STAMP,
            "SignatureVersion": "1",
            "Signature": "EXAMPLE",
            "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/cert.pem",
            "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe",
        }
    )


DETAIL_TYPES = {"Bounce": "Email Bounced", "Complaint": "Email Complaint Received"}


def eventbridge(event: dict[str, Any]) -> str:
    """The SQS body when an EventBridge rule sends SES's event to the queue."""
    return json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": DETAIL_TYPES.get(event["eventType"], "Email Delivered"),
            "source": "aws.ses",
            "account": ACCOUNT,
            "time": STAMP,
            "region": REGION,
            "resources": [f"arn:aws:ses:{REGION}:{ACCOUNT}:configuration-set/moodle-reminders"],
            "detail": event,
        }
    )


WRAPS = {"sns": sns_wrapped, "eventbridge": eventbridge}


def queue_left(moto: str, queue_url: str) -> int:
    """Messages still on the queue, visible or not."""
    attrs = sqs(moto).get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


async def await_events(spool: Path, queue_id: str, wanted: set[str], within: float = 20) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        row = rows(spool)[queue_id]
        if wanted <= {event for event, _ in row["events"]}:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"events {wanted} not on {queue_id}: {rows(spool)[queue_id]['events']}")


def dsns_of(spool: Path, queue_id: str) -> list[str]:
    return [q for q, r in rows(spool).items() if r["reports_on"] == queue_id]


def dropped(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("relay_ses_events_dropped_total", {"reason": reason})
    return value or 0.0


async def await_empty(moto: str, queue_url: str, within: float = 15) -> int:
    """Messages left on the queue once it is empty or `within` seconds passed."""
    for _ in range(int(within * 10)):
        left = queue_left(moto, queue_url)
        if not left:
            return 0
        await asyncio.sleep(0.1)
    return queue_left(moto, queue_url)


async def start_with_queue(
    start_relay: Callable[..., Awaitable[Running]],
    host: CaptureServer,
    moto: str,
    queue: str,
    **sections: Any,
) -> Running:
    return await start_relay(
        **sections,
        deliver=True,
        upstream={"host": "127.0.0.1", "port": host.port, "timeout": 5},
        ses={
            "region": REGION,
            "endpoint_url": moto,
            "max_send_rate": 50,
            "events": {"queue_url": queue},
        },
    )


async def sent_through_ses(relay: Running) -> tuple[str, str]:
    """A mail from VERP to GONE sent through relay and on to SES: its queue id and its SES
    MessageId."""
    queue_id = await asend(relay.port, VERP, [GONE], RAW)
    row = (await await_rows(relay.settings.spool, [queue_id], {"sent"}))[queue_id]
    return queue_id, row["ses_message_id"]


async def sent_past_delay_warning(
    start_relay: Callable[..., Awaitable[Running]], capture: CaptureServer, moto_server: str
) -> tuple[Running, str, str, str]:
    """relay with `bounces.delay_warning: 1` and a queue of its own, and a mail sent through
    SES a second before: (relay, queue URL, queue id, SES MessageId)."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(
        start_relay, capture, moto_server, queue, bounces={"delay_warning": 1}
    )
    queue_id, ses_id = await sent_through_ses(relay)
    await asyncio.sleep(1.1)  # past a delay_warning of 1 s
    return relay, queue, queue_id, ses_id


@pytest.mark.parametrize("wrap", WRAPS.values(), ids=WRAPS.keys())
async def test_ses_events_are_recorded_and_a_permanent_bounce_reaches_the_sender(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
    wrap: Callable[[dict[str, Any]], str],
) -> None:
    """Must-show 2. A re-engagement mail goes through SES (moto) to two recipients; SES then
    reports a Permanent Bounce for one, a Complaint and a Delivery for the other. All three
    show on the mail's history (`relay queue show ID --json`), the bounce queues one DSN that
    reaches the envelope sender at the original host (Final-Recipient the bounced address,
    Status 5.1.1, SES's diagnostic), and the SQS queue is empty afterwards."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    queue_id = await asend(relay.port, VERP, [GONE, HERE], RAW)
    sent = (await await_rows(spool, [queue_id], {"sent"}))[queue_id]
    assert ("ses", True) == (sent["route"], bool(sent["ses_message_id"]))
    ses_id = sent["ses_message_id"]

    for event in (bounce(ses_id), complaint(ses_id), delivery(ses_id)):
        sqs(moto_server).send_message(QueueUrl=queue, MessageBody=wrap(event))
    wanted = {"ses_bounce", "ses_complaint", "ses_delivery", "dsn"}
    await await_events(spool, queue_id, wanted)
    [dsn_id] = dsns_of(spool, queue_id)
    await await_rows(spool, [dsn_id], {"sent"})

    shown = relay_cli("queue", "--config", str(relay.settings.source), "show", queue_id, "--json")
    record = json.loads(shown.stdout)
    history = {e["event"]: e["detail"] for e in record["events"]}
    assert ([dsn_id], "sent") == (record["dsns"], record["state"])
    assert "bounce=Permanent/General" in history["ses_bounce"] and GONE in history["ses_bounce"]
    assert "abuse" in history["ses_complaint"] and HERE in history["ses_complaint"]
    assert "250 2.6.0 Message received" in history["ses_delivery"]

    [notice] = capture.messages
    report = message_from_bytes(notice.content, policy=policy.default)
    status = report.get_payload()[1].get_payload()
    assert ("<>", (VERP,), "multipart/report") == (
        notice.mail_from,
        notice.rcpt_tos,
        report.get_content_type(),
    )
    assert (f"rfc822; {GONE}", "failed", "5.1.1", "smtp; 550 5.1.1 user unknown") == (
        status[1]["Final-Recipient"],
        status[1]["Action"],
        status[1]["Status"],
        status[1]["Diagnostic-Code"],
    )
    assert 0 == await await_empty(moto_server, queue)


async def test_a_mail_every_recipient_of_which_bounced_is_bounced(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """SES reports the two recipients of one mail bounced, in two events: after the first
    the mail is still `sent` (the other may yet be delivered), after the second it is
    `bounced`, which `relay queue list` leaves out with the sent ones and `--state bounced`
    lists. Each bounce brings its own DSN to the sender."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool, config = relay.settings.spool, str(relay.settings.source)
    queue_id = await asend(relay.port, VERP, [GONE, HERE], RAW)
    ses_id = (await await_rows(spool, [queue_id], {"sent"}))[queue_id]["ses_message_id"]

    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(bounce(ses_id)))
    assert 0 == await await_empty(moto_server, queue)
    assert "sent" == rows(spool)[queue_id]["state"]
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(bounce(ses_id, HERE)))
    await await_rows(spool, [queue_id], {"bounced"})
    notices = dsns_of(spool, queue_id)
    await await_rows(spool, notices, {"sent"})

    listed = relay_cli("queue", "--config", config, "list", "--json").stdout
    bounced = relay_cli("queue", "--config", config, "list", "--state", "bounced", "--json")
    assert [] == [json.loads(line)["id"] for line in listed.splitlines()]
    assert [queue_id] == [json.loads(line)["id"] for line in bounced.stdout.splitlines()]
    assert [(VERP,), (VERP,)] == [m.rcpt_tos for m in capture.messages]
    assert 2 == len(notices)


async def test_unknown_malformed_and_repeated_events_are_dropped_and_deleted(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """An event for a MessageId relay never sent, a body that is no SES event and an event
    type relay has no use for (Open) are counted and deleted; the same bounce delivered
    twice is applied once: one history line, one DSN. The unknown one only after
    UNKNOWN_AFTER receives (a visibility timeout of 1 s here: 30 s by default), since the
    send it is about may not be committed yet, or may be another relay's."""
    queue = new_queue(moto_server, visibility=1)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    before = {
        r: dropped(r) for r in ("unknown_message_id", "malformed", "duplicate", "unused_type")
    }
    queue_id, ses_id = await sent_through_ses(relay)
    twice = sns_wrapped(bounce(ses_id))
    client = sqs(moto_server)
    for body in (
        sns_wrapped(bounce("0100018c-not-ours-000000")),
        "this is not JSON",
        json.dumps({"Type": "Notification", "Message": json.dumps({"eventType": "Nope"})}),
        sns_wrapped({**delivery(ses_id), "eventType": "Open", "open": {"timestamp": STAMP}}),
        twice,
    ):
        client.send_message(QueueUrl=queue, MessageBody=body)
    await asyncio.sleep(1.5)
    assert 1 == queue_left(moto_server, queue)  # the unknown one, back after its timeout
    assert 0 == await await_empty(moto_server, queue, within=UNKNOWN_AFTER + 10)
    client.send_message(QueueUrl=queue, MessageBody=twice)
    assert 0 == await await_empty(moto_server, queue)
    after = {r: dropped(r) - before[r] for r in before}
    assert {"unknown_message_id": 1, "malformed": 2, "duplicate": 1, "unused_type": 1} == after
    events = [e for e, _ in rows(spool)[queue_id]["events"] if e.startswith("ses_")]
    assert ["ses_bounce"] == events
    assert 1 == len(dsns_of(spool, queue_id))


async def test_hostile_event_text_is_recorded_or_refused_and_deleted(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """A bounce whose diagnostic carries a lone surrogate (JSON's "\\udce4": a Latin-1 byte
    mangled on its way) is recorded and its DSN sent; a body nested 100,000 deep is malformed.
    Both leave the queue. Before, neither could be handled: they came back at every visibility
    timeout until SQS's retention ran out, and the bounce's DSN never went."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    before = dropped("malformed")
    queue_id, ses_id = await sent_through_ses(relay)
    client = sqs(moto_server)
    client.send_message(QueueUrl=queue, MessageBody="[" * 100_000 + "]" * 100_000)
    mangled = bounce(ses_id, diagnostic="smtp; 550 5.1.1 Empf\udce4nger unbekannt")
    client.send_message(QueueUrl=queue, MessageBody=sns_wrapped(mangled))
    await await_events(spool, queue_id, {"ses_bounce", "dsn"})
    assert 0 == await await_empty(moto_server, queue)
    assert 1 == dropped("malformed") - before
    [dsn_id] = dsns_of(spool, queue_id)
    await await_rows(spool, [dsn_id], {"sent"})
    assert b"Empf?nger unbekannt" in capture.messages[0].content


async def test_an_event_is_deleted_from_sqs_only_once_its_commit_is_on_disk(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delivery process commits with synchronous=NORMAL, so an applied event is on disk
    only at the next fsync of the WAL. Three events for one mail: each DeleteMessage comes
    after a `Spool.sync` (an fsync of the WAL) that followed the event's commit, not before.
    The real spool, SQS (moto) and fsync run; the test only records their order."""
    order: list[str] = []

    def spy(cls: type, name: str) -> None:
        real = getattr(cls, name)

        async def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = await real(self, *args, **kwargs)
            order.append(name)
            return result

        monkeypatch.setattr(cls, name, recorded)

    spy(Spool, "feedback")
    spy(Spool, "sync")
    spy(SqsQueue, "delete")
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    queue_id = await asend(relay.port, VERP, [GONE, HERE], RAW)
    ses_id = (await await_rows(spool, [queue_id], {"sent"}))[queue_id]["ses_message_id"]
    for event in (bounce(ses_id), complaint(ses_id), delivery(ses_id)):
        sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(event))
    assert 0 == await await_empty(moto_server, queue)
    print(f"feedback calls in order: {order}")
    assert 3 == order.count("feedback") == order.count("delete")
    for at, call in enumerate(order):
        if call == "delete":
            last_commit = max(n for n in range(at) if order[n] == "feedback")
            assert "sync" in order[last_commit:at], order


async def test_a_queue_that_fails_is_polled_less_and_less_often(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A queue URL SQS does not know (a typo, a deleted queue) fails every ReceiveMessage:
    the pause after each failure doubles up to MAX_ERROR_PAUSE (scaled down here), so a
    wrong URL does not log a warning every few seconds for ever; once the queue exists, the
    next poll reads its events."""
    monkeypatch.setattr("relay.deliver.feedback.ERROR_PAUSE", 0.05)
    monkeypatch.setattr("relay.deliver.feedback.MAX_ERROR_PAUSE", 0.4)
    name = f"ses-events-{uuid.uuid4().hex[:8]}"
    queue = f"{moto_server}/{ACCOUNT}/{name}"  # moto's URL for it, once it exists
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    await asyncio.sleep(2.0)
    waits = [r.getMessage() for r in caplog.records if "ses_feedback_failed" in r.getMessage()]
    assert 5 <= len(waits) <= 10, waits  # every 0.05 s it would be about 30
    pauses = [float(w.split("retry_in=")[1].split()[0]) for w in waits]
    assert [0.05, 0.1, 0.2, 0.4, 0.4] == pauses[:5]
    up = {"queue": queue}
    assert 0 == metrics.REGISTRY.get_sample_value("relay_ses_feedback_up", up)  # the alert's
    assert queue == sqs(moto_server).create_queue(QueueName=name)["QueueUrl"]
    queue_id = await asend(relay.port, VERP, [GONE], RAW)
    spool = relay.settings.spool
    ses_id = (await await_rows(spool, [queue_id], {"sent"}))[queue_id]["ses_message_id"]
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(delivery(ses_id, GONE)))
    await await_events(spool, queue_id, {"ses_delivery"}, within=5)
    assert 1 == metrics.REGISTRY.get_sample_value("relay_ses_feedback_up", up)


SOFT = {
    "as-given": (
        ("4.2.2", "smtp; 452 4.2.2 mailbox full"),
        ("4.2.2", "smtp; 452 4.2.2 mailbox full"),
    ),
    "none-given": (("", ""), ("4.0.0", "X-Relay; SES bounce Transient/MailboxFull")),
}


@pytest.mark.parametrize(("given", "expected"), SOFT.values(), ids=SOFT.keys())
async def test_a_soft_bounce_is_final_but_not_in_the_bounce_rate(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
    given: tuple[str, str],
    expected: tuple[str, str],
) -> None:
    """SES publishes a Transient bounce only once it has stopped retrying, so the mail did
    not arrive: the sender gets a DSN (Action failed, SES's status and diagnostic, as Postfix
    reports a mail that expired in its queue; without a status, 4.0.0) and the mail is
    `bounced`. SES's bounce rate counts hard bounces only, and so does relay's
    (`relay_ses_bounce_rate`)."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    queue_id, ses_id = await sent_through_ses(relay)
    full = bounce(
        ses_id,
        kind="Transient",
        subtype="MailboxFull",
        status=given[0],
        diagnostic=given[1],
    )
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(full))
    await await_rows(spool, [queue_id], {"bounced"})
    [dsn_id] = dsns_of(spool, queue_id)
    await await_rows(spool, [dsn_id], {"sent"})
    [notice] = capture.messages
    status = message_from_bytes(notice.content, policy=policy.default).get_payload()[1]
    recipient = status.get_payload()[1]
    assert ("failed", *expected) == (
        recipient["Action"],
        recipient["Status"],
        recipient["Diagnostic-Code"],
    )
    with contextlib.closing(sqlite3.connect(spool / DB_NAME)) as conn:
        seen = reputation(conn, 0.0)  # what relay_ses_bounce_rate is made of
    assert (1, 0, 0) == (seen.sends, seen.bounces, seen.complaints)


BODIES = {
    "sns": (sns_wrapped(delivery("m-1")), ("Delivery", "m-1")),
    "eventbridge": (eventbridge(complaint("m-2")), ("Complaint", "m-2")),
    "raw": (json.dumps(bounce("m-3")), ("Bounce", "m-3")),
    "identity-notification": (
        json.dumps({**bounce("m-4"), "notificationType": "Bounce", "eventType": None}),
        ("Bounce", "m-4"),
    ),
    "unused-type": (eventbridge({**delivery("m-5"), "eventType": "Click"}), ("Click", "m-5")),
    "unused-type-bare": (json.dumps({"eventType": "Rendering Failure"}), ("Rendering Failure", "")),
}


@pytest.mark.parametrize(("body", "expected"), BODIES.values(), ids=BODIES.keys())
def test_parse_reads_every_wrapping(body: str, expected: tuple[str, str]) -> None:
    """SNS-wrapped, EventBridge, raw (SNS raw message delivery) and identity notifications
    (`notificationType`) all give the event's type and SES MessageId; so do the event types
    relay does not record (Open, Click, ...: the feedback task deletes them unrecorded)."""
    event = parse(body)
    assert expected == (event.type, event.message_id)


MALFORMED = {
    "not-json": "{",
    "a-list": "[]",
    "no-mail": json.dumps({"eventType": "Bounce", "bounce": {}}),
    "unknown-type": json.dumps({"eventType": "Opened", "mail": {"messageId": "x"}}),
    "sns-with-bad-message": json.dumps({"Type": "Notification", "Message": "nope"}),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_parse_refuses_what_is_no_ses_event(body: str) -> None:
    """Anything else is MalformedEvent (logged once and deleted by the feedback task)."""
    with pytest.raises(MalformedEvent):
        parse(body)


# kill -9 between the commit and DeleteMessage


class _Proxy(BaseHTTPRequestHandler):
    """Forwards SQS calls to moto; holds DeleteMessage until `release` is set."""

    upstream: tuple[str, int]
    deletes: threading.Event
    release: threading.Event

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        target = self.headers.get("X-Amz-Target", "")
        if "DeleteMessage" in target or b"Action=DeleteMessage" in body:
            self.deletes.set()
            self.release.wait(30)
            self.close_connection = True
            return  # no answer: the caller sees the connection drop
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        conn.request("POST", self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def holding_proxy(moto_server: str) -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """(url, deletes seen, release): an SQS endpoint that never answers DeleteMessage."""
    host, port = moto_server.removeprefix("http://").split(":")
    deletes, release = threading.Event(), threading.Event()
    handler = type(
        "Proxy", (_Proxy,), {"upstream": (host, int(port)), "deletes": deletes, "release": release}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", deletes, release
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.system
def test_kill_9_between_commit_and_delete_applies_the_event_once(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    moto_server: str,
    holding_proxy: tuple[str, threading.Event, threading.Event],
) -> None:
    """`relay serve` applies a Permanent Bounce (history line, DSN queued and delivered),
    then its DeleteMessage hangs (a proxy holds it) and the process group is killed with
    SIGKILL. After a restart SQS shows the message again (visibility timeout 2 s): it is
    recognised, deleted, and nothing is applied twice: one history line, one DSN row, one
    DSN at the original host."""
    proxy, deletes, release = holding_proxy
    queue = new_queue(moto_server, visibility=2)
    proxied = queue.replace(moto_server, proxy)

    def configured(name: str, queue_url: str) -> Path:
        return write_config(
            name,
            upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
            ses={
                "region": REGION,
                "endpoint_url": moto_server,
                "max_send_rate": 50,
                "events": {"queue_url": queue_url},
            },
        )

    config = configured("relay.yaml", proxied)
    spool = config.parent / "spool"
    relay = relay_process(config).start()
    queue_id = send(relay.port, VERP, [GONE], RAW)
    ses_id = wait_rows(spool, [queue_id], {"sent"})[queue_id]["ses_message_id"]
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(bounce(ses_id)))
    assert deletes.wait(20), relay.log()
    [dsn_id] = dsns_of(spool, queue_id)
    wait_rows(spool, [dsn_id], {"sent"})
    assert relay.proc is not None
    os.killpg(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait(10)
    release.set()

    again = relay_process(configured("again.yaml", queue)).start()  # SQS direct this time
    deadline = time.monotonic() + 20
    while queue_left(moto_server, queue) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 == queue_left(moto_server, queue), again.log()
    assert 0 == again.stop()
    events = [e for e, _ in rows(spool)[queue_id]["events"]]
    once = (events.count("ses_bounce"), events.count("dsn"), dsns_of(spool, queue_id))
    assert (1, 1, [dsn_id]) == once
    assert [("<>", (VERP,))] == [(m.mail_from, m.rcpt_tos) for m in capture.messages]
    assert "duplicate" in again.log()


LOCATIONS = {
    "aws": ("https://sqs.eu-west-1.amazonaws.com/123456789012/q", ("eu-west-1", None)),
    "aws-legacy": ("https://us-east-2.queue.amazonaws.com/123456789012/q", ("us-east-2", None)),
    "emulator": ("http://127.0.0.1:4566/000000000000/q", ("ap-south-1", "http://127.0.0.1:4566")),
}


@pytest.mark.parametrize(("url", "expected"), LOCATIONS.values(), ids=LOCATIONS.keys())
def test_the_queue_url_says_region_and_endpoint(url: str, expected: tuple[str, str | None]) -> None:
    """AWS queue URLs name their region (no endpoint override); any other host is an
    emulator and becomes the endpoint, with `ses.region`."""
    assert expected == sqs_location(url, "ap-south-1")


def test_events_queue_url_is_validated(write_config: ConfigWriter) -> None:
    """`ses.events.queue_url` must be a URL; an unknown key under `events` is refused too;
    both with file:line."""
    path = write_config(ses={"events": {"queue_url": "ses-events", "wait": 5}})
    with pytest.raises(ConfigError) as raised:
        settings_mod.load(path)
    text = str(raised.value)
    assert "queue_url" in text and "wait" in text and f"{path}:" in text
    good = write_config(
        "ok.yaml", ses={"events": {"queue_url": "https://sqs.eu-west-1.amazonaws.com/1/q"}}
    )
    assert "https://sqs.eu-west-1.amazonaws.com/1/q" == settings_mod.load(good).ses.events_queue_url


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    head, _, body = answer.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_readyz_shows_the_ses_rates(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """With an events queue, /readyz adds the bounce and complaint rates of relay's SES sends
    under "ready": one send, one Permanent bounce is 100%, marked high; still 200."""
    queue = new_queue(moto_server)
    relay = await start_relay(
        deliver=True,
        metrics="127.0.0.1:0",
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": moto_server, "events": {"queue_url": queue}},
    )
    spool = relay.settings.spool
    queue_id, ses_id = await sent_through_ses(relay)
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(bounce(ses_id)))
    await await_events(spool, queue_id, {"ses_bounce"})
    assert relay.ctx.metrics_port is not None
    assert (
        200,
        "ready\n"
        "ses high: bounce rate 100.00% (1 of 1 SES sends, 7 days): at SES's 5.0% review level\n"
        "ses ok: complaint rate 0.00% (0 of 1 SES sends, 7 days)\n",
    ) == await http_get(relay.ctx.metrics_port, "/readyz")


def reject(message_id: str, recipient: str = GONE) -> dict[str, Any]:
    return {
        "eventType": "Reject",
        "reject": {"reason": "Bad content"},
        "mail": mail_object(message_id, [recipient]),
    }


async def test_a_reject_event_is_recorded_and_reported_to_the_sender(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """SES took the call, then rejected the message (Reject, "Bad content"): nobody got it,
    so the history says so and the sender gets a DSN (5.7.1, SES's reason)."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    queue_id, ses_id = await sent_through_ses(relay)
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=eventbridge(reject(ses_id)))
    row = await await_events(spool, queue_id, {"ses_reject", "dsn"})
    assert any("Bad content" in d for e, d in row["events"] if e == "ses_reject")
    [dsn_id] = dsns_of(spool, queue_id)
    await await_rows(spool, [dsn_id], {"sent"})
    [notice] = capture.messages
    assert b"Status: 5.7.1" in notice.content and b"Bad content" in notice.content


def delivery_delay(message_id: str, stamp: str, recipient: str = GONE) -> dict[str, Any]:
    return {
        "eventType": "DeliveryDelay",
        "deliveryDelay": {
            "timestamp": stamp,
            "delayType": "TransientCommunicationFailure",
            "expirationTime": "2026-12-05T10:00:01.000Z",
            "delayedRecipients": [
                {
                    "emailAddress": recipient,
                    "status": "4.4.1",
                    "diagnosticCode": "smtp; 421 4.4.1 Unable to connect to remote host",
                }
            ],
            "reportingMTA": f"dns; a8-70.smtp-out.{REGION}.amazonses.com",
        },
        "mail": mail_object(message_id, [recipient]),
    }


DELAY_WARNING = {"off": (None, 0), "not-yet-due": (3600, 0), "due": (1, 1)}


@pytest.mark.parametrize(("after", "warnings"), DELAY_WARNING.values(), ids=DELAY_WARNING.keys())
async def test_an_ses_delivery_delay_warns_the_sender_once_when_asked_for(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
    after: int | None,
    warnings: int,
) -> None:
    """SES reports twice that it could not deliver yet (DeliveryDelay). Both are in the
    history and the mail stays `sent` (SES is still retrying). With `bounces.delay_warning`
    and once the mail has waited that long, the sender gets one "Delayed Mail" DSN, as for
    relay's own deferrals: Action delayed, SES's 4.4.1 and diagnostic, Will-Retry-Until at
    SES's expirationTime. Off by default, as in Postfix."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(
        start_relay, capture, moto_server, queue, bounces={"delay_warning": after}
    )
    spool = relay.settings.spool
    queue_id, ses_id = await sent_through_ses(relay)
    await asyncio.sleep(1.1)  # past a delay_warning of 1 s
    for stamp in ("2026-12-04T10:05:00.000Z", "2026-12-04T10:35:00.000Z"):
        event = delivery_delay(ses_id, stamp)
        sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(event))
    assert 0 == await await_empty(moto_server, queue)
    row = rows(spool)[queue_id]
    events = [e for e, _ in row["events"]]
    assert ("sent", 2, warnings) == (
        row["state"],
        events.count("ses_deliverydelay"),
        events.count("dsn_delayed"),
    )
    assert any("until=2026-12-05T10:00:01.000Z" in d for e, d in row["events"])
    notices = dsns_of(spool, queue_id)
    await await_rows(spool, notices, {"sent"})
    assert warnings == len(capture.messages)
    if not warnings:
        return
    report = message_from_bytes(capture.messages[0].content, policy=policy.default)
    recipient = report.get_payload()[1].get_payload()[1]
    assert (
        "Delayed Mail (still being retried)",
        f"rfc822; {GONE}",
        "delayed",
        "4.4.1",
        "smtp; 421 4.4.1 Unable to connect to remote host",
        datetime(2026, 12, 5, 10, 0, 1, tzinfo=UTC),
    ) == (
        report["Subject"],
        recipient["Final-Recipient"],
        recipient["Action"],
        recipient["Status"],
        recipient["Diagnostic-Code"],
        parsedate_to_datetime(recipient["Will-Retry-Until"]),
    )


async def test_a_recipient_that_bounced_gets_no_second_dsn_and_no_late_warning(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """SES reports a Transient bounce, then a Permanent one for the same recipient (two
    feedback IDs), then a DeliveryDelay that SQS delivers late: the sender gets one DSN.
    Each bounce sent a DSN of its own (Moodle counted two bounces for one mail), and the late
    delay a "still being retried" after "Undelivered" (`bounces.delay_warning` on)."""
    relay, queue, queue_id, ses_id = await sent_past_delay_warning(
        start_relay, capture, moto_server
    )
    spool = relay.settings.spool
    full = bounce(ses_id, kind="Transient", status="4.2.2", diagnostic="smtp; 452 4.2.2 full")
    for event in (full, bounce(ses_id), delivery_delay(ses_id, "2026-12-04T10:05:00.000Z")):
        sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(event))
        assert 0 == await await_empty(moto_server, queue)  # in this order
    row = rows(spool)[queue_id]
    events = [e for e, _ in row["events"]]
    assert ("bounced", 2, 1, 1, 0) == (
        row["state"],
        events.count("ses_bounce"),
        events.count("ses_deliverydelay"),
        events.count("dsn"),
        events.count("dsn_delayed"),
    ), events
    notices = dsns_of(spool, queue_id)
    await await_rows(spool, notices, {"sent"})
    assert [(VERP,)] == [m.rcpt_tos for m in capture.messages]


async def test_a_delay_whose_expiry_is_no_date_is_recorded_and_warned_of(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """A DeliveryDelay whose expirationTime is in the year 9999 (or before 1970) could not
    be written as Will-Retry-Until in the machine's zone: the warning raised, the event was
    never recorded nor deleted, and came back from SQS at every visibility timeout, for
    good. Now the warning goes without Will-Retry-Until and the queue empties."""
    relay, queue, queue_id, ses_id = await sent_past_delay_warning(
        start_relay, capture, moto_server
    )
    spool = relay.settings.spool
    event = delivery_delay(ses_id, STAMP)
    event["deliveryDelay"]["expirationTime"] = "9999-12-31T23:59:59-14:00"
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(event))
    assert 0 == await await_empty(moto_server, queue)
    [notice_id] = dsns_of(spool, queue_id)
    await await_rows(spool, [notice_id], {"sent"})
    report = message_from_bytes(capture.messages[0].content, policy=policy.default)
    recipient = report.get_payload()[1].get_payload()[1]
    assert ("delayed", None) == (recipient["Action"], recipient["Will-Retry-Until"])


async def test_an_event_that_keeps_failing_is_logged_whole_and_deleted(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An event relay fails to handle (here a bug is put into building its DSN) stays on
    the queue, and SQS shows it again after each visibility timeout: it used to for good,
    a log line every 30 s. At its GIVE_UP_AFTER'th receive (ApproximateReceiveCount; 3
    here, on a queue with no visibility timeout) it is logged whole, at ERROR, counted as
    dropped ("failed") and deleted."""

    def bug(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("relay.deliver.feedback.GIVE_UP_AFTER", 3)
    monkeypatch.setattr("relay.deliver.dsn.for_ses_event", bug)
    queue = new_queue(moto_server, visibility=0)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    before = dropped("failed")
    queue_id, ses_id = await sent_through_ses(relay)
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(bounce(ses_id)))
    assert 0 == await await_empty(moto_server, queue)
    given_up = [r for r in caplog.records if "ses_event_given_up" in r.getMessage()]
    bugs = [r for r in caplog.records if "ses_feedback_bug" in r.getMessage()]
    assert (1, "ERROR", 3) == (len(given_up), given_up[0].levelname, len(bugs))
    assert "receives=3" in given_up[0].getMessage() and ses_id in given_up[0].getMessage()
    assert 1 == dropped("failed") - before
    assert "sent" == rows(spool)[queue_id]["state"]


async def test_a_bounce_naming_an_address_the_mail_never_had_counts_for_nothing(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """Two bounces name an address the mail was never sent to (each with its own feedback
    ID): before, each queued a DSN to the Moodle sender about that stranger, and the mail
    could never become `bounced`. Now they are in the history only; the bounce of the
    mail's own recipient then brings its one DSN and makes the mail `bounced`."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    spool = relay.settings.spool
    queue_id, ses_id = await sent_through_ses(relay)
    for _ in range(2):
        stranger = sns_wrapped(bounce(ses_id, "stranger@elsewhere.example"))
        sqs(moto_server).send_message(QueueUrl=queue, MessageBody=stranger)
    assert 0 == await await_empty(moto_server, queue)
    row = rows(spool)[queue_id]
    assert ("sent", [], 2) == (
        row["state"],
        dsns_of(spool, queue_id),
        sum("stranger@elsewhere.example" in d for e, d in row["events"] if e == "ses_bounce"),
    )
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(bounce(ses_id)))
    await await_rows(spool, [queue_id], {"bounced"})
    assert 1 == len(dsns_of(spool, queue_id))


def test_an_event_of_10000_recipients_makes_a_history_line_of_bounded_size() -> None:
    """A bounce naming 10,000 recipients with long diagnostics made a history line of
    8 MB; it is cut at SUMMARY_MAX characters."""
    from relay.deliver.ses.events import SUMMARY_MAX

    event = bounce("ses-1", diagnostic="smtp; 550 5.1.1 " + "x" * 800)
    one = event["bounce"]["bouncedRecipients"][0]
    event["bounce"]["bouncedRecipients"] = [
        {**one, "emailAddress": f"r{n}@x.org"} for n in range(10_000)
    ]
    summary = parse(sns_wrapped(event)).summary()
    assert (SUMMARY_MAX, True) == (len(summary), summary.endswith("..."))


async def test_no_delay_warning_for_a_recipient_ses_said_it_delivered_to(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """SQS hands a DeliveryDelay over after the Delivery for the same recipient (standard
    queues keep no order): both are recorded, and the sender gets no "still being retried"
    for a mail that arrived (RFC 3464 2.3.3: delayed means not delivered yet)."""
    relay, queue, queue_id, ses_id = await sent_past_delay_warning(
        start_relay, capture, moto_server
    )
    late = delivery_delay(ses_id, "2026-12-04T10:05:00.000Z")
    for event in (delivery(ses_id, GONE), late):
        sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(event))
        assert 0 == await await_empty(moto_server, queue)  # in this order
    events = [e for e, _ in rows(relay.settings.spool)[queue_id]["events"]]
    assert (1, 1, 0) == (
        events.count("ses_delivery"),
        events.count("ses_deliverydelay"),
        events.count("dsn_delayed"),
    ), events
    assert [] == dsns_of(relay.settings.spool, queue_id)


async def test_a_bounce_under_the_final_recipient_reaches_the_sender(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """SES names a bounced recipient by the remote DSN's Final-Recipient when there is one:
    mail to an address that forwards bounces under another name. Matched to none of the
    mail's recipients, it was a history line only: no DSN, the mail `sent` for good, Moodle
    mailing the dead address on. With one destination, it is that one's bounce."""
    queue = new_queue(moto_server)
    relay = await start_with_queue(start_relay, capture, moto_server, queue)
    queue_id, ses_id = await sent_through_ses(relay)
    final = "ann.smith@mail.example.com"
    event = bounce(ses_id, recipient=final, diagnostic=f"smtp; 550 5.1.1 <{final}>: no such user")
    event["mail"]["destination"] = [GONE]  # SES says what relay sent to
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(event))
    await await_rows(relay.settings.spool, [queue_id], {"bounced"})
    [notice_id] = dsns_of(relay.settings.spool, queue_id)
    await await_rows(relay.settings.spool, [notice_id], {"sent"})
    [notice] = capture.messages
    block = message_from_bytes(notice.content, policy=policy.default).get_payload()[1]
    status = block.get_payload()[1]
    assert (f"rfc822; {GONE}", "5.1.1") == (status["Final-Recipient"], status["Status"])
    assert f"smtp; 550 5.1.1 <{final}>: no such user (as {final})" == status["Diagnostic-Code"]


async def test_an_event_that_comes_before_its_send_is_recorded_is_applied(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
    moto_server: str,
) -> None:
    """SES has the mail, and publishes a bounce for it, before relay has its answer (slow,
    here 3 s; in production also an outcome that waits for a spool that cannot commit).
    The bounce found no row and was deleted as unknown: the mail stayed `sent`, no DSN
    ever. It stays on the queue now, and is applied once the send is recorded."""
    queue = new_queue(moto_server, visibility=1)
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={
            "region": REGION,
            "endpoint_url": fake_ses.url,
            "max_send_rate": 50,
            "suppressed": "send",
            "events": {"queue_url": queue},
        },
    )
    fake_ses.latency = 3.0
    queue_id = await asend(relay.port, VERP, [GONE], RAW)
    for _ in range(100):
        if fake_ses.sent:
            break
        await asyncio.sleep(0.05)
    event = bounce(fake_ses.sent[0].message_id)
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=sns_wrapped(event))
    await await_rows(relay.settings.spool, [queue_id], {"bounced"}, within=20)
    assert 1 == len(dsns_of(relay.settings.spool, queue_id))


async def test_an_unknown_event_is_not_held_into_the_queues_dead_letter_queue(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    moto_server: str,
) -> None:
    """A queue with a dead-letter queue after 2 receives: an event for a MessageId relay
    does not know (another relay's, one queue per relay) was held for UNKNOWN_AFTER
    receives and moved there by SQS, with no line and no count. It is held one receive
    fewer than the redrive allows now (here: deleted at the first), logged and counted."""
    client = sqs(moto_server)
    dead = client.create_queue(QueueName=f"dead-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])
    redrive = {"deadLetterTargetArn": arn["Attributes"]["QueueArn"], "maxReceiveCount": "2"}
    queue = client.create_queue(
        QueueName=f"ses-events-{uuid.uuid4().hex[:8]}",
        Attributes={"VisibilityTimeout": "1", "RedrivePolicy": json.dumps(redrive)},
    )["QueueUrl"]
    await start_with_queue(start_relay, capture, moto_server, queue)
    before = dropped("unknown_message_id")
    client.send_message(QueueUrl=queue, MessageBody=sns_wrapped(bounce("0100018c-not-ours")))
    assert 0 == await await_empty(moto_server, queue)
    await asyncio.sleep(1.5)  # SQS would have moved it by now
    assert (1, 0) == (dropped("unknown_message_id") - before, queue_left(moto_server, dead))


async def test_the_dead_letter_limit_is_asked_again_until_the_queue_answers(
    moto_server: str,
) -> None:
    """The first GetQueueAttributes fails (here the queue is not there yet; at boot, the
    endpoint not up): the hold of five receives was kept for good, past a redrive of 3.
    It is asked again at the next receive."""
    name = f"ses-events-{uuid.uuid4().hex[:8]}"
    queue_url = f"{moto_server}/{ACCOUNT}/{name}"
    queue = await SqsQueue.open(queue_url, REGION)
    try:
        with pytest.raises(TemporaryFailure):
            await queue.receive()
        client = sqs(moto_server)
        dead = client.create_queue(QueueName=f"dead-{name}")["QueueUrl"]
        arn = client.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])
        redrive = {"deadLetterTargetArn": arn["Attributes"]["QueueArn"], "maxReceiveCount": "3"}
        client.create_queue(QueueName=name, Attributes={"RedrivePolicy": json.dumps(redrive)})
        client.send_message(QueueUrl=queue_url, MessageBody="{}")
        assert [2] == [m.unknown_after for m in await queue.receive()]
    finally:
        await queue.close()
