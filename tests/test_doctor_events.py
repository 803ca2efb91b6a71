"""`relay doctor` with `ses.events.queue_url`: the SQS queue is reachable, every
configuration set relay sends with publishes Bounce, Complaint and Reject, and relay's
bounce and complaint rates are shown, with a warning at half of SES's review levels.
moto serves SES (configuration sets and event destinations) and SQS."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import boto3

from relay.spool import Spool
from tests.support.aws import REGION, VERIFIED_DOMAIN
from tests.support.processes import relay_cli
from tests.support.relays import ConfigWriter

TOPIC = "arn:aws:sns:eu-west-1:123456789012:relay-ses-events"


SNS = {"SNSDestination": {"TopicARN": TOPIC}}
CLOUDWATCH = {  # metrics only: no queue hears of it
    "CloudWatchDestination": {
        "DimensionConfigurations": [
            {
                "DimensionName": "rule",
                "DimensionValueSource": "messageTag",
                "DefaultDimensionValue": "none",
            }
        ]
    }
}


def event_set(client: object, name: str, types: list[str], kind: dict[str, object] = SNS) -> None:
    client.create_configuration_set(ConfigurationSet={"Name": name})  # type: ignore[attr-defined]
    client.create_configuration_set_event_destination(  # type: ignore[attr-defined]
        ConfigurationSetName=name,
        EventDestination={
            "Name": f"{name}-events",  # moto wants them unique across sets
            "Enabled": True,
            "MatchingEventTypes": types,
            **kind,
        },
    )


async def seed(directory: Path, sends: int, bounces: int) -> None:
    """`sends` mails sent through SES, `bounces` of them bounced for good (SES events)."""
    spool = await Spool.open(directory)
    try:
        for n in range(sends):
            qid = await spool.add(
                sender="noreply@moodle.example.org",
                recipients=[f"s{n}@example.net"],
                raw=b"Subject: x\r\n\r\nx\r\n",
                peer="127.0.0.1",
                trace=b"Received: x\r\n",
                message_id=f"<{n}@moodle.example.org>",
            )
            await spool.claim(1)
            await spool.sent(qid, rule="r", route="ses", reply="ok", ses_message_id=f"ses-{n}")
        for n in range(bounces):
            await spool.feedback(
                key=f"Bounce/ses-{n}/f{n}",
                ses_message_id=f"ses-{n}",
                event="ses_bounce",
                detail="bounce=Permanent/General",
                kind="bounce",
            )
    finally:
        await spool.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_doctor_checks_the_events_queue_destinations_and_rates(
    aws_env: None,
    moto_server: str,
    write_config: ConfigWriter,
    tmp_path: Path,
) -> None:
    """A reachable queue is ok; a configuration set publishing Bounce, Complaint and Reject
    is ok, one publishing only Bounce is a FAIL naming what is missing, and so is one
    publishing all three to CloudWatch only (before, it was ok); 1 bounce in 40 SES
    sends (2.5%) is a warning (half of SES's 5% review level), no complaints is ok. A queue
    that does not exist is a FAIL."""
    ses = boto3.client("ses", region_name=REGION, endpoint_url=moto_server)
    good, partial = f"good-{uuid.uuid4().hex[:6]}", f"partial-{uuid.uuid4().hex[:6]}"
    metrics = f"metrics-{uuid.uuid4().hex[:6]}"
    event_set(ses, good, ["bounce", "complaint", "reject", "delivery"])
    event_set(ses, partial, ["bounce"])
    event_set(ses, metrics, ["bounce", "complaint", "reject"], CLOUDWATCH)
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=moto_server)
    queue = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    (tmp_path / "rules.yaml").write_text(
        "default: upstream\nrules:\n  - name: r\n    route: ses\n"
        f"    ses: {{configuration_set: {partial}}}\n    match: {{subject: x}}\n"
        "  - name: m\n    route: ses\n"
        f"    ses: {{configuration_set: {metrics}}}\n    match: {{subject: y}}\n"
    )
    asyncio.run(seed(tmp_path / "spool", sends=40, bounces=1))
    ses_config = {"region": REGION, "endpoint_url": moto_server, "configuration_set": good}

    def doctor(queue_url: str, name: str) -> list[str]:
        config = write_config(
            name,
            rules="rules.yaml",
            upstream={"host": "127.0.0.1", "port": closed_port()},
            ses={**ses_config, "events": {"queue_url": queue_url}},
        )
        done = relay_cli("doctor", "--config", str(config), timeout=60)
        print(done.stdout, done.stderr)
        return [
            line for line in done.stdout.splitlines() if line[6:16].strip() in ("events", "rates")
        ]

    assert [
        f"ok    events    {queue}: reachable, 0 messages waiting",
        f"ok    events    {good}: publishes Bounce, Complaint, Reject ({good}-events)",
        f"FAIL  events    {partial}: no event destination for Complaint, Reject ({partial}-events)",
        f"FAIL  events    {metrics}: no event destination for Bounce, Complaint, Reject"
        " (none enabled to SNS or EventBridge)",
        "warn  rates     bounce rate 2.50% (1 of 40 SES sends, 7 days): half of SES's 5.0% review",
        "ok    rates     complaint rate 0.00% (0 of 40 SES sends, 7 days)",
    ] == doctor(queue, "relay.yaml")
    missing = queue.rsplit("/", 1)[0] + "/no-such-queue"
    [first, *_] = doctor(missing, "missing.yaml")
    assert first.startswith(f"FAIL  events    {missing}: not reachable: "), first


def test_doctor_warns_when_ses_would_forward_bounces_to_moodle_too(
    aws_env: None,
    moto_server: str,
    write_config: ConfigWriter,
    tmp_path: Path,
) -> None:
    """With relay's DSNs for SES bounces, SES's email feedback forwarding (on by default)
    mails each bounce to the Return-Path as well: Moodle's VERP address, so Moodle counts
    it twice. The doctor warns while it is on for the sending identity, and is content once
    it is off. With `ses.source` set, SES forwards to that address: no line."""
    ses = boto3.client("ses", region_name=REGION, endpoint_url=moto_server)
    name = f"set-{uuid.uuid4().hex[:6]}"
    event_set(ses, name, ["bounce", "complaint", "reject"])
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=moto_server)
    queue = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    ses_config = {
        "region": REGION,
        "endpoint_url": moto_server,
        "configuration_set": name,
        "events": {"queue_url": queue},
    }

    def feedback_lines(**more: str) -> list[str]:
        config = write_config(
            upstream={"host": "127.0.0.1", "port": closed_port()}, ses={**ses_config, **more}
        )
        done = relay_cli(
            "doctor", "--config", str(config), "--sender", f"mdl+x@{VERIFIED_DOMAIN}", timeout=60
        )
        return [line for line in done.stdout.splitlines() if line[6:16].strip() == "feedback"]

    [warned] = feedback_lines()
    assert warned.startswith(f"warn  feedback  {VERIFIED_DOMAIN}: SES also emails each bounce")
    assert [] == feedback_lines(source=f"relay@{VERIFIED_DOMAIN}")
    off = f"ok    feedback  {VERIFIED_DOMAIN}: email feedback forwarding off (relay's DSN tells"
    ses.set_identity_feedback_forwarding_enabled(Identity=VERIFIED_DOMAIN, ForwardingEnabled=False)
    try:
        assert [f"{off} Moodle)"] == feedback_lines()
    finally:  # the moto server is the session's
        ses.set_identity_feedback_forwarding_enabled(
            Identity=VERIFIED_DOMAIN, ForwardingEnabled=True
        )


def test_doctor_warns_when_retention_is_shorter_than_ses_reports_late(
    aws_env: None, moto_server: str, write_config: ConfigWriter
) -> None:
    """`retention: 3600` with SES events on: an event that comes later (a complaint, days
    after the send) finds its row purged and sends no DSN. The doctor says so."""
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=moto_server)
    queue = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    config = write_config(
        retention=3600,
        upstream={"host": "127.0.0.1", "port": closed_port()},
        ses={"region": REGION, "endpoint_url": moto_server, "events": {"queue_url": queue}},
    )
    done = relay_cli("doctor", "--config", str(config), timeout=60)
    [line] = [line for line in done.stdout.splitlines() if "retention" in line]
    assert line.startswith("warn  events    retention 3600 s: SES events that come later"), line
