"""Recipients on the SES account suppression list (`ses.suppressed`): SES would accept them
and send nothing, so relay asks first (SESv2 GetSuppressedDestination, from the fake SES,
since moto lacks the suppression API) and sends them upstream, fails them with a DSN, or
leaves them to SES. Real SMTP in, the fake SES and a capture server out.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from relay import settings as settings_mod
from relay.deliver.ses import suppression
from relay.errors import ConfigError
from relay.settings import Ses
from tests.support.aws import REGION, new_queue, sqs
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.relays import ConfigWriter, Running
from tests.support.smtp import asend
from tests.support.spools import await_rows, rows

pytestmark = pytest.mark.usefixtures("aws_env")

VERP = "mdl+a1b2c3@moodle.example.org"
ORIGIN = "https://moodle.example.org => web01:mod/reengagement/lib.php:564"
GONE, ANN, BOB = "gone@students.example.org", "ann@students.example.org", "bob@example.org"
RAW = (
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b'To: "Ann Student" <ann@students.example.org>\r\n'
    b'From: "Moodle Support (via Example)" <noreply@moodle.example.org>\r\n'
    b"Subject: We miss you in BIO101\r\n"
    b"Message-ID: <5f1a2b3c4d5e63.12345678@moodle.example.org>\r\n"
    b"X-Moodle-Originating-Script: " + ORIGIN.encode() + b"\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Come back.\r\n"
)


async def start(
    start_relay: Callable[..., Awaitable[Running]],
    host: CaptureServer,
    ses: FakeSes,
    **extra: Any,
) -> Running:
    return await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": host.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": ses.url, "max_send_rate": 100, **extra},
    )


def children(spool: Any, queue_id: str) -> dict[str, dict[str, Any]]:
    found = rows(spool)
    return {
        q: r
        for q, r in found.items()
        if q != queue_id and any(queue_id in d for e, d in r["events"] if e == "received")
    }


async def test_a_suppressed_recipient_goes_upstream_and_the_others_through_ses(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Must-show 3. One mail to three recipients, one of them on the suppression list
    (BOUNCE): SES gets the mail for the other two, the original host gets the same bytes,
    same envelope sender, for the suppressed one. Two rows, both `sent`, each recording its
    route; the history links them (`split` on the mail, `received ... split from` on the
    part) and says why."""
    fake_ses.suppressed[GONE] = "BOUNCE"
    relay = await start(start_relay, capture, fake_ses)
    spool = relay.settings.spool
    queue_id = await asend(relay.port, VERP, [ANN, GONE, BOB], RAW)
    await await_rows(spool, [queue_id], {"sent"})
    [(part_id, _)] = children(spool, queue_id).items()
    done = await await_rows(spool, [queue_id, part_id], {"sent"})
    mail, part = done[queue_id], done[part_id]

    assert [(VERP, (ANN, BOB))] == [(m.source, m.destinations) for m in fake_ses.sent]
    assert fake_ses.sent[0].raw == mail["trace"] + RAW
    assert [(VERP, (GONE,), part["trace"] + RAW)] == [
        (m.mail_from, m.rcpt_tos, m.content) for m in capture.messages
    ]
    assert ("ses", (ANN, BOB), None) == (mail["route"], mail["recipients"], mail["fallback_reason"])
    assert ("upstream", (GONE,)) == (part["route"], part["recipients"])
    assert f"{GONE} (BOUNCE)" in part["fallback_reason"]
    assert "suppression list" in part["fallback_reason"]
    split = [d for e, d in mail["events"] if e == "split"]
    assert [f"{GONE} -> {part_id}"] == [d.split(":")[0] for d in split]


async def test_every_recipient_suppressed_means_no_split_and_no_ses_call(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """All recipients suppressed: one row, straight upstream, SES not called."""
    fake_ses.suppressed[GONE] = "COMPLAINT"
    relay = await start(start_relay, capture, fake_ses)
    queue_id = await asend(relay.port, VERP, [GONE], RAW)
    row = (await await_rows(relay.settings.spool, [queue_id], {"sent"}))[queue_id]
    assert ("upstream", 0, [queue_id]) == (
        row["route"],
        len(fake_ses.sent),
        list(rows(relay.settings.spool)),
    )
    assert f"{GONE} (COMPLAINT)" in row["fallback_reason"]


async def test_bounce_mode_fails_the_suppressed_recipient_with_a_dsn(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """`ses.suppressed: bounce`: the suppressed recipient's part is a dead letter at once and
    the sender gets a DSN for it (5.1.1); the others still go through SES."""
    fake_ses.suppressed[GONE] = "BOUNCE"
    relay = await start(start_relay, capture, fake_ses, suppressed="bounce")
    spool = relay.settings.spool
    queue_id = await asend(relay.port, VERP, [ANN, GONE], RAW)
    await await_rows(spool, [queue_id], {"sent"})
    [(part_id, _)] = children(spool, queue_id).items()
    part = (await await_rows(spool, [part_id], {"failed"}))[part_id]
    assert "suppression list" in part["reply"]
    [dsn_id] = [q for q, r in rows(spool).items() if r["reports_on"] == part_id]
    await await_rows(spool, [dsn_id], {"sent"})
    assert [("<>", (VERP,))] == [(m.mail_from, m.rcpt_tos) for m in capture.messages]
    assert b"Final-Recipient: rfc822; " + GONE.encode() in capture.messages[0].content
    assert [(ANN,)] == [m.destinations for m in fake_ses.sent]


async def test_send_mode_asks_nothing_and_answers_are_cached(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """`ses.suppressed: send` never looks up; by default each address is looked up once
    for many mails, a "not found" answer included."""
    fake_ses.suppressed[GONE] = "BOUNCE"
    relay = await start(start_relay, capture, fake_ses, suppressed="send")
    queue_id = await asend(relay.port, VERP, [ANN, GONE], RAW)
    await await_rows(relay.settings.spool, [queue_id], {"sent"})
    assert (0, [(ANN, GONE)]) == (
        fake_ses.suppression_lookups,
        [m.destinations for m in fake_ses.sent],
    )


async def test_lookups_are_cached(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Five mails to the same two recipients (one suppressed): two lookups in all."""
    fake_ses.suppressed[GONE] = "BOUNCE"
    relay = await start(start_relay, capture, fake_ses)
    ids = [await asend(relay.port, VERP, [ANN, GONE], RAW) for _ in range(5)]
    await await_rows(relay.settings.spool, ids, {"sent"})
    assert 2 == fake_ses.suppression_lookups


def test_suppressed_setting_is_validated(write_config: ConfigWriter) -> None:
    """`ses.suppressed` defaults to upstream; another word is a problem with file:line."""
    assert "upstream" == settings_mod.load(write_config("ok.yaml")).ses.suppressed.value
    path = write_config(ses={"suppressed": "drop"})
    with pytest.raises(ConfigError) as raised:
        settings_mod.load(path)
    assert f"{path}:" in str(raised.value) and "suppressed" in str(raised.value)


async def test_a_complaint_makes_the_next_mail_ask_the_suppression_list_again(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
    moto_server: str,
) -> None:
    """Ann complains about a CC copy: SES puts her on the suppression list and publishes a
    Complaint. relay had asked about her an hour's worth ago (not found); the event makes it
    forget that answer, so the next copy asks again and goes upstream. Before, it went to SES
    for the rest of the hour, and SES dropped it."""
    queue = new_queue(moto_server)
    relay = await start(start_relay, capture, fake_ses, events={"queue_url": queue})
    spool = relay.settings.spool
    first = await asend(relay.port, VERP, [ANN], RAW)
    sent = (await await_rows(spool, [first], {"sent"}))[first]
    assert "ses" == sent["route"]
    fake_ses.suppressed[ANN] = "COMPLAINT"
    complaint = {
        "eventType": "Complaint",
        "mail": {"messageId": sent["ses_message_id"], "destination": [ANN]},
        "complaint": {
            "complainedRecipients": [{"emailAddress": ANN}],
            "timestamp": "2026-12-04T10:00:05.000Z",
            "feedbackId": "0100017c-complaint-000000",
            "complaintFeedbackType": "abuse",
        },
    }
    sqs(moto_server).send_message(QueueUrl=queue, MessageBody=json.dumps(complaint))
    await wait_events(spool, first, "ses_complaint")
    second = await asend(relay.port, VERP, [ANN], RAW)
    assert "upstream" == (await await_rows(spool, [second], {"sent"}))[second]["route"]
    assert (1, [(VERP, (ANN,))]) == (
        len(fake_ses.sent),
        [(m.mail_from, m.rcpt_tos) for m in capture.messages],
    )


async def wait_events(spool: Any, queue_id: str, event: str, within: float = 20.0) -> None:
    """Until `event` is on the mail's history."""
    deadline = time.monotonic() + within
    while not any(e == event for e, _ in rows(spool)[queue_id]["events"]):
        assert time.monotonic() < deadline, f"no {event} on {queue_id}"
        await asyncio.sleep(0.05)


async def test_the_cache_of_answers_stays_bounded(
    fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site writing to ever new addresses (or a client with AUTH doing so at will): the
    answers, expired ones too, were kept for good, about 200 bytes an address for the
    months the delivery process runs. Past CACHE_MAX the expired ones go, then the oldest;
    the newest answers are still reused."""
    monkeypatch.setattr(suppression, "CACHE_MAX", 50)
    listed = await suppression.SuppressionList.open(Ses(region=REGION, endpoint_url=fake_ses.url))
    try:
        for n in range(200):
            await listed.reasons([f"s{n}@students.example.org"])
        size, asked = len(listed._cache), fake_ses.suppression_lookups
        await listed.reasons(["s199@students.example.org"])  # kept: no new lookup
    finally:
        await listed.close()
    assert (True, 200, 200) == (size <= 50, asked, fake_ses.suppression_lookups)
