"""SIGKILL of `relay serve` at random moments while it receives and delivers (DESIGN 3.4).

Several clients keep sending distinct Moodle mails (corpus, fresh Message-IDs);
re-engagement mail goes to a fake SES with 50 ms of latency (so sends are in
flight at a kill), the rest to a capture server standing in for the original
host. The relay is SIGKILLed ten times in a row on the same spool and restarted
on the same port; after the last restart it gets to finish.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from relay.spool import open_existing
from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.load import Senders, Tally, seeded, summary
from tests.support.mails import MailFactory
from tests.support.ports import free_port
from tests.support.processes import RelayProcess
from tests.support.relays import ConfigWriter
from tests.support.spools import DONE, rows, wait_rows

# system: SIGKILLs and restarts `relay serve` ten times.
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("aws_env")]

KILLS = 10


def await_inflight(spool: Path, within: float) -> None:
    """Until a row of `spool` is being delivered, or `within` seconds: on a busy machine
    ten kills at random moments once all fell between deliveries, and tested nothing."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with closing(open_existing(spool)) as conn:
            if conn.execute("SELECT 1 FROM messages WHERE state = 'inflight' LIMIT 1").fetchone():
                return
        time.sleep(0.005)


DELIVERERS = 4


def test_ten_sigkills_while_receiving_and_delivering_lose_nothing(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Ten SIGKILLs at random points (seeded) with mail coming in and going out, then a
    clean run: every 250'd mail is delivered where its route says (SES or the original
    host, by Message-ID), nothing is lost, and the only duplicates are mails that were in
    flight at a kill (at most kills x deliverers)."""
    rng = seeded("kill")
    fake_ses.latency = 0.05
    port = free_port()
    config = write_config(
        listen=f"127.0.0.1:{port}",
        deliverers=DELIVERERS,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={
            "region": REGION,
            "endpoint_url": fake_ses.url,
            "max_send_rate": 500,
            "fallback_after": 600,
            "timeout": 5,
        },
        retry={"schedule": [1], "max_age": 600},
    )
    spool = config.parent / "spool"
    senders = Senders(port, MailFactory("kill"), threads=3, pause=0.03)
    inflight_at_kill: set[str] = set()
    kills_with_inflight = 0
    relay = relay_process(config).start()
    senders.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.2, 1.2))
            await_inflight(spool, within=2.0)  # most kills land on a delivery
            assert -signal.SIGKILL == relay.stop(signal.SIGKILL)
            inflight = {q for q, row in rows(spool).items() if row["state"] == "inflight"}
            kills_with_inflight += bool(inflight)
            inflight_at_kill |= inflight
            time.sleep(rng.uniform(0.0, 0.3))  # clients meet a closed port meanwhile
            relay = relay_process(config).start()
    finally:
        senders.stop()
    final = wait_rows(spool, senders.queue_ids(), DONE, timeout=60)
    assert 0 == relay.stop()

    tally = Tally.of(fake_ses, capture)
    by_queue_id = {qid: message_id for message_id, (qid, _) in senders.acked.items()}
    numbers = summary(
        "kill",
        senders,
        tally,
        extra={
            "kills": KILLS,
            "kills with mail in flight": kills_with_inflight,
            "in flight at kills": len(inflight_at_kill),
        },
    )
    expected_routes = {m: mail.route for m, (_, mail) in senders.acked.items()}
    actual_routes = {
        m: "ses"
        if tally.ses[m] and not tally.upstream[m]
        else "upstream"
        if tally.upstream[m] and not tally.ses[m]
        else f"ses {tally.ses[m]}, upstream {tally.upstream[m]}"
        for m in senders.acked
    }
    assert expected_routes == actual_routes
    assert {q: "sent" for q in final} == {q: row["state"] for q, row in final.items()}
    assert 0 == numbers["lost"]
    duplicated = {q for q, m in by_queue_id.items() if tally.copies()[m] > 1}
    assert set() == duplicated - inflight_at_kill
    assert numbers["duplicates"] <= KILLS * DELIVERERS
    assert numbers["250s"] > 100, "too few mails for ten kills to mean anything"
    assert kills_with_inflight > 0, "no kill hit a delivery in flight: nothing was tested"
