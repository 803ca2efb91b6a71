"""Restart in the middle of delivery (DESIGN 3.4, at least once).

`relay serve` delivers to a slow fake SES (0.2 s per call, so sends are in flight)
and to the capture server; it is SIGKILLed mid-delivery and started again on the
same spool. Every 250'd mail must end delivered (or dead-lettered), and the only
duplicates allowed are the messages that were in flight at the kill: at most
`deliverers` of them.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.aws import REGION
from tests.support.capture import CaptureServer, trace_queue_id
from tests.support.fakeses import FakeSes
from tests.support.mails import ORIGIN
from tests.support.processes import RelayProcess
from tests.support.relays import ConfigWriter
from tests.support.smtp import send
from tests.support.spools import DONE, rows, wait_rows

# system: SIGKILLs `relay serve` mid-delivery and starts it again.
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("aws_env")]

DELIVERERS = 4
MAILS = 100


def moodle_mail(n: int) -> tuple[str, bytes, str]:
    """Mail n: (recipient, bytes, expected route); two in three are re-engagement mail."""
    ses = n % 3 != 2
    rcpt = f"student{n}@students.example.org"
    script = f"X-Moodle-Originating-Script: {ORIGIN}\r\n" if ses else ""
    raw = (
        f'Date: Tue, 4 Mar 2025 09:05:02 +0000\r\nTo: "Student {n}" <{rcpt}>\r\n'
        f'From: "Moodle Support (via Example Moodle)" <noreply@moodle.example.org>\r\n'
        f"Subject: {'We miss you' if ses else 'New forum post'} ({n})\r\n"
        f"Message-ID: <67c6e0{n:08x}.{n:08d}@moodle.example.org>\r\n"
        f"X-Mailer: PHPMailer 6.9.1 (https://github.com/PHPMailer/PHPMailer)\r\n{script}"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\n"
        f"Dear student {n},\r\n.come back\r\n"
    ).encode()
    return rcpt, raw, "ses" if ses else "upstream"


def test_sigkill_mid_delivery_then_restart_delivers_each_mail_at_least_once(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """100 mails (2/3 to SES, 1/3 upstream), SIGKILL while SES sends are in flight, restart:
    every 250'd mail reaches its destination; the mails delivered twice are among those
    the spool still had in flight at the kill, and those are at most `deliverers`."""
    fake_ses.latency = 0.2
    config = write_config(
        deliverers=DELIVERERS,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 10},
        ses={
            "region": REGION,
            "endpoint_url": fake_ses.url,
            "max_send_rate": 100,
            "fallback_after": 300,
            "timeout": 10,
        },
        retry={"schedule": [1], "max_age": 600},
    )
    spool = config.parent / "spool"
    relay = relay_process(config).start()
    acked: dict[str, str] = {}  # queue id -> expected route
    for n in range(MAILS):
        rcpt, raw, route = moodle_mail(n)
        acked[send(relay.port, "noreply@moodle.example.org", [rcpt], raw)] = route

    deadline = time.monotonic() + 30
    while len(fake_ses.sent) + len(capture.messages) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert -signal.SIGKILL == relay.stop(signal.SIGKILL)
    at_kill = rows(spool)
    inflight = {q for q, row in at_kill.items() if row["state"] == "inflight"}
    pending = [q for q, row in at_kill.items() if row["state"] not in DONE]
    delivered_before = len(fake_ses.sent) + len(capture.messages)
    assert pending, "the kill came after the last delivery: nothing was tested"

    restarted = relay_process(config).start()
    final = wait_rows(spool, acked, DONE, timeout=45)
    assert 0 == restarted.stop()
    assert {q: ("sent", route) for q, route in acked.items()} == {
        q: (row["state"], row["route"]) for q, row in final.items()
    }
    copies = Counter(
        [trace_queue_id(s.raw) for s in fake_ses.sent] + [m.queue_id for m in capture.messages]
    )
    lost = sorted(set(acked) - set(copies))
    duplicated = {q for q, count in copies.items() if count > 1}
    duplicates = sum(copies.values()) - len(copies)
    print(
        f"restart: sent {MAILS}, 250s {len(acked)}, delivered before the kill "
        f"{delivered_before}, in flight at the kill {len(inflight)}, pending {len(pending)}; "
        f"finally SES {len(fake_ses.sent)}, original host {len(capture.messages)}, "
        f"duplicates {duplicates}, lost {len(lost)}"
    )
    assert ([], set()) == (lost, set(copies) - set(acked))
    assert set() == duplicated - inflight
    assert duplicates <= len(inflight) <= DELIVERERS


def test_sigterm_sends_nothing_new_to_ses_and_restart_sends_each_mail_once(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Five SES mails of 8 recipients each behind a pace of 2 recipients/s (a grant every
    4 s), every delivery slot taken; SIGTERM a second after the first send: the service
    stops without another SES call (the sends waiting for their turn are cancelled, their
    mail stays in flight), and after a restart each mail reaches SES exactly once. The
    waiting sends were made during the stop's drain, for up to 30 s, and a stop cut short
    (Docker's 10 s) caught calls under way, whose mail went again after the restart (41
    sends for 40 mails in the review); with every slot busy the loop saw the stop only
    at the next send."""
    config = write_config(
        deliverers=4,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 10},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 2, "timeout": 10},
        retry={"schedule": [1], "max_age": 600},
    )
    relay = relay_process(config).start()
    raw = moodle_mail(0)[1]
    sender = "noreply@moodle.example.org"
    acked = [
        send(relay.port, sender, [f"s{n}.{r}@students.example.org" for r in range(8)], raw)
        for n in range(5)
    ]
    deadline = time.monotonic() + 30
    while not fake_ses.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)
    stopped_at = time.monotonic()
    assert 0 == relay.stop(signal.SIGTERM)
    took = time.monotonic() - stopped_at
    started_after = [at - stopped_at for at, _, _ in fake_ses.requests if at > stopped_at]
    assert [] == started_after, took
    restarted = relay_process(config).start()
    wait_rows(config.parent / "spool", acked, DONE, timeout=60)
    assert 0 == restarted.stop()
    copies = Counter(trace_queue_id(s.raw) for s in fake_ses.sent)
    assert dict.fromkeys(acked, 1) == dict(copies)
