"""SES and the original host flapping at the same time, with `relay serve` running (DESIGN 3.4).

SES goes up -> HTTP 500s -> Throttling -> down (connections dropped, then refused)
-> up; the original host goes up -> 451 at DATA -> down (port closed) -> up, on
its own schedule, while clients keep sending. Short `fallback_after`, retry
schedule and `max_age` make some mail fall back and some end as dead letters.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakeses import DROP, HTTP_500, RATE_EXCEEDED, FakeSes, Fault
from tests.support.load import Senders, Tally, summary
from tests.support.mails import MailFactory
from tests.support.processes import RelayProcess, relay_cli
from tests.support.relays import ConfigWriter
from tests.support.spools import DONE, wait_rows

# system: a reliability scenario, `relay serve` as a process while its peers flap.
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("aws_env")]

DELIVERERS = 4
PHASE = 1.5  # seconds per phase
THROTTLING = Fault(code="Throttling", message=RATE_EXCEEDED)
UPSTREAM_4XX = "451 4.3.0 Try again later"
PHASES = [
    "ses 500",
    "ses throttling",
    "ses down",
    "ses up",
    "upstream 4xx",
    "upstream down",
    "upstream up",
]


def flap_ses(fake: FakeSes, log: list[str]) -> None:
    """up -> HTTP 500 -> Throttling -> down (drop, refuse) -> up."""
    time.sleep(PHASE)
    fake.error = HTTP_500
    log.append("ses 500")
    time.sleep(PHASE)
    fake.error = THROTTLING
    log.append("ses throttling")
    time.sleep(PHASE)
    fake.error = DROP  # pooled keep-alive connections get dropped...
    fake.stop()  # ...and new ones refused
    log.append("ses down")
    time.sleep(PHASE)
    fake.error = None
    fake.start()
    log.append("ses up")


def flap_upstream(capture: CaptureServer, log: list[str]) -> None:
    """up -> 451 at DATA -> down (connections refused) -> up."""
    time.sleep(PHASE * 1.5)
    capture.data_reply = UPSTREAM_4XX
    log.append("upstream 4xx")
    time.sleep(PHASE)
    capture.stop()
    capture.data_reply = None
    log.append("upstream down")
    time.sleep(PHASE)
    capture.start()
    log.append("upstream up")


def test_ses_and_original_host_flapping_lose_nothing(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Both destinations flap while mail keeps coming: every 250'd mail ends sent (at the
    destination its row names, by Message-ID) or dead-lettered with a reason recorded;
    nothing is lost, and SES-routed mail that went upstream says why."""
    fake_ses.latency = 0.02
    config = write_config(
        deliverers=DELIVERERS,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 2},
        ses={
            "region": REGION,
            "endpoint_url": fake_ses.url,
            "max_send_rate": 200,
            "fallback_after": 2,
            "timeout": 2,
            "circuit_cooldown": 1,
        },
        retry={"schedule": [1], "max_age": 2},
    )
    spool = config.parent / "spool"
    relay = relay_process(config).start()
    senders = Senders(relay.port, MailFactory("flap"), threads=2, pause=0.05).start()
    log: list[str] = []
    flappers = [
        threading.Thread(target=flap_ses, args=(fake_ses, log)),
        threading.Thread(target=flap_upstream, args=(capture, log)),
    ]
    try:
        for flapper in flappers:
            flapper.start()
        for flapper in flappers:
            flapper.join(30)
    finally:
        senders.stop()
    final = wait_rows(spool, senders.queue_ids(), DONE, timeout=30)
    assert 0 == relay.stop()

    tally = Tally.of(fake_ses, capture)
    message_ids = {qid: m for m, (qid, _) in senders.acked.items()}
    failed = {message_ids[q] for q, row in final.items() if row["state"] == "failed"}
    numbers = summary(
        "flapping",
        senders,
        tally,
        failed=failed,
        extra={
            "fallbacks": sum(1 for row in final.values() if row["fallback_reason"]),
            "ses calls": fake_ses.calls,
            "upstream DATA": capture.data_attempts,
        },
    )
    print(f"flapping: phases {', '.join(log)}")
    assert sorted(PHASES) == sorted(log)
    where = {
        q: ("sent", row["route"]) if row["state"] == "sent" else ("failed", "-")
        for q, row in final.items()
    }
    landed = {
        q: ("sent", "ses")
        if tally.ses[message_ids[q]] and row["state"] == "sent" and row["route"] == "ses"
        else ("sent", "upstream")
        if row["state"] == "sent" and tally.upstream[message_ids[q]]
        else ("failed", "-")
        if row["state"] == "failed"
        else ("nowhere", row["route"])
        for q, row in final.items()
    }
    assert where == landed
    reasons = {q: bool(row["reply"]) for q, row in final.items() if row["state"] == "failed"}
    assert {q: True for q in reasons} == reasons
    wrong_way = {
        q
        for q, row in final.items()
        if row["route"] == "upstream"
        and senders.acked[message_ids[q]][1].route == "ses"
        and row["state"] == "sent"
        and not row["fallback_reason"]
    }
    assert set() == wrong_way
    assert 0 == numbers["lost"]
    assert numbers["duplicates"] <= 2 * DELIVERERS  # only a drop mid-answer can duplicate
    assert numbers["fallbacks"] > 0 and numbers["delivered ses"] > 0
    if failed:  # the operator's view of one dead letter names its reason
        queue_id = next(q for q, row in final.items() if row["state"] == "failed")
        shown = relay_cli("queue", "--config", str(config), "show", queue_id, "--json")
        assert 0 == shown.returncode, shown.stderr
        record = json.loads(shown.stdout)
        assert ("failed", final[queue_id]["reply"]) == (record["state"], record["reply"])
        print(f"flapping: dead letter {queue_id}: {record['reply']}")
