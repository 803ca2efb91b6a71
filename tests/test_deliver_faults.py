"""Delivery when things fail: SES faults fall back to the original host, the circuit
opens once and probes after its cooldown, and the original host's own faults defer,
dead-letter, expire and are retried (DESIGN 3.4).

The service runs in the test's event loop (`start_relay(deliver=True)`), SES is the
fake SES of tests/support/fakeses/ (moto cannot fail on demand), the original host is a
capture server. Mails are corpus mails with their Moodle envelopes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import pytest

from relay import runtime
from relay.metrics import REGISTRY
from tests.support.aws import REGION
from tests.support.capture import Captured, CaptureServer
from tests.support.corpus import Expected, expectations
from tests.support.fakeses import DAILY_EXCEEDED, HTTP_500, V2_ERRORS, FakeSes, Fault
from tests.support.ports import free_port
from tests.support.processes import relay_cli
from tests.support.relays import ConfigWriter, Start
from tests.support.smtp import asend
from tests.support.spools import await_rows, rows

pytestmark = pytest.mark.usefixtures("aws_env")

CORPUS = {e.name: e for e in expectations()}
RAW = {name: e.path.read_bytes() for name, e in CORPUS.items()}
# Three re-engagement mails (SES route) and one look-alike that always goes upstream.
SES_MAILS = (
    "reengagement/student-text-564.eml",
    "reengagement/cc-546.eml",
    "reengagement/student-html-546.eml",
)
CONTROL = "lookalike/forum-post.eml"
FALLBACK_AFTER = 2.0  # seconds; at 1.0 a loaded CI machine reached it before the first try failed
PAUSED = Fault(code="AccountSendingPausedException", message="Sending is paused for this account.")


def config(host: CaptureServer, ses_url: str, **ses: Any) -> dict[str, Any]:
    """relay.yaml overrides: upstream = the capture server `host`, SES at `ses_url`, short
    timers."""
    return {
        "upstream": {"host": "127.0.0.1", "port": host.port, "timeout": 5},
        "ses": {
            "region": REGION,
            "endpoint_url": ses_url,
            "max_send_rate": 100,
            "fallback_after": FALLBACK_AFTER,
            "circuit_cooldown": 30,
            "timeout": 2,
            **ses,
        },
        "retry": {"schedule": [1], "max_age": 60},
    }


async def send_corpus(port: int, *names: str) -> dict[str, Expected]:
    """Send corpus mails with their envelopes; {queue id: expectation}."""
    sent = {}
    for name in names:
        e = CORPUS[name]
        sent[await asend(port, e.sender, e.recipients, RAW[name])] = e
    return sent


def openings() -> float:
    """relay_ses_circuit_openings_total summed over its reason labels."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "relay_ses_circuit_openings"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def log_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event}" in r.getMessage()]


def copies(host: CaptureServer) -> dict[str, list[Captured]]:
    """What the original host got, by the queue id in relay's Received: line."""
    by_id: dict[str, list[Captured]] = {}
    for message in host.messages:
        by_id.setdefault(message.queue_id or "?", []).append(message)
    return by_id


def assert_at_original_host_once(
    host: CaptureServer, sent: dict[str, Expected], found: dict[str, dict[str, Any]]
) -> None:
    """Each mail reached the original host once: envelope unchanged, trace + bytes as sent."""
    got = copies(host)
    expected = {
        q: [(e.sender, e.recipients, found[q]["trace"] + RAW[e.name])] for q, e in sent.items()
    }
    actual = {q: [(m.mail_from, m.rcpt_tos, m.content) for m in got.get(q, [])] for q in sent}
    assert expected == actual


@dataclass(frozen=True)
class SesFault:
    """One row of the fault table: what SES does and what relay must make of it."""

    fault: Fault | None  # None: nothing listens at the SES endpoint
    kind: str  # temporary | permanent | account
    reason: str  # in the row's fallback_reason


FAULTS = {
    "unreachable": SesFault(None, "temporary", "EndpointConnectionError"),
    "http-500": SesFault(HTTP_500, "temporary", "SES failing for"),
    "message-rejected": SesFault(  # an unverified identity: its own test below
        Fault(code="MessageRejected", message="Illegal header."),
        "permanent",
        "SES refused the message: MessageRejected: Illegal header.",
    ),
    "account-paused": SesFault(
        PAUSED, "account", "SES account-wide failure: AccountSendingPausedException"
    ),
    "daily-quota": SesFault(
        Fault(code="Throttling", message=DAILY_EXCEEDED),
        "account",
        f"SES account-wide failure: Throttling: {DAILY_EXCEEDED}",
    ),
}


@pytest.mark.system
@pytest.mark.parametrize("case", FAULTS.values(), ids=FAULTS.keys())
@pytest.mark.parametrize("api", ["v1", "v2"], ids=["api-v1", "api-v2"])
async def test_ses_fault_sends_mail_to_original_host(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
    caplog: pytest.LogCaptureFixture,
    case: SesFault,
    api: str,
) -> None:
    """Every SES-routed mail SES fails reaches the original host exactly once, bytes intact:
    temporary faults only after `fallback_after` (a second attempt), permanent and
    account-wide ones at once; account-wide ones open the circuit once (one log line, one
    count of the alert metric), however many mails fail; the reason is on the row. The
    same under `ses.api: v2`, where the fake answers the SESv2 error of the same meaning."""
    caplog.set_level(logging.INFO, logger="relay")
    if api == "v2" and case.fault is not None and case.fault.code in V2_ERRORS:
        v2_code = V2_ERRORS[case.fault.code][0]
        case = replace(case, reason=case.reason.replace(case.fault.code, v2_code))
    fake_ses.error, fake_ses.latency = case.fault, 0.2  # sends overlap: several fail at once
    url = fake_ses.url if case.fault else f"http://127.0.0.1:{free_port()}"
    before = openings()
    relay = await start_relay(deliver=True, **config(capture, url, api=api))
    sent = await send_corpus(relay.port, *SES_MAILS, CONTROL)
    found = await await_rows(relay.settings.spool, sent, {"sent"})

    assert_at_original_host_once(capture, sent, found)
    ses_ids = [q for q, e in sent.items() if e.route == "ses"]
    [control] = [q for q, e in sent.items() if e.route == "upstream"]
    assert {q: (sent[q].rule, "upstream") for q in sent} == {
        q: (found[q]["rule"], found[q]["route"]) for q in sent
    }
    assert (None, 1) == (found[control]["fallback_reason"], found[control]["attempts"])
    reasons = [found[q]["fallback_reason"] for q in ses_ids]
    if case.kind == "account":  # the first fails at SES; later ones may find the circuit open
        assert case.reason in reasons[0]
        assert [] == [r for r in reasons if case.reason not in r and "circuit open" not in r]
    else:
        assert [True] * 3 == [case.reason in r for r in reasons], reasons
    waited = {q: copies(capture)[q][0].at - found[q]["received_at"] for q in ses_ids}
    if case.kind == "temporary":
        assert [True] * 3 == [found[q]["attempts"] >= 2 for q in ses_ids]
        assert [True] * 3 == [w >= FALLBACK_AFTER for w in waited.values()], waited
    else:
        assert [1, 1, 1] == [found[q]["attempts"] for q in ses_ids]
        assert [] == [e for q in ses_ids for e, _ in found[q]["events"] if e == "deferred"]
    opened = 1 if case.kind == "account" else 0
    assert (opened, opened) == (openings() - before, len(log_lines(caplog, "circuit_open")))
    print(
        f"{case.kind} {case.reason!r}: sent 4 (250 x4), original host got 4, SES calls "
        f"{fake_ses.calls}, attempts {[found[q]['attempts'] for q in ses_ids]}, fell back "
        f"after {', '.join(f'{w:.1f}s' for w in waited.values())}, circuit openings "
        f"{opened}, lost 0, duplicates 0"
    )


@pytest.mark.system
async def test_circuit_probes_once_after_cooldown_then_ses_again(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sending paused: the first mail opens the circuit; during the cooldown SES sees no
    call; after it exactly one probe (the other mails of that moment go upstream); the probe
    fails and the circuit stays open without a second alert; once SES is healthy, the next
    probe succeeds, the circuit closes and re-engagement mail goes to SES again."""
    caplog.set_level(logging.INFO, logger="relay")
    cooldown = 2.0
    fake_ses.error = PAUSED
    before = openings()
    relay = await start_relay(
        deliver=True, **config(capture, fake_ses.url, circuit_cooldown=cooldown)
    )
    spool = relay.settings.spool
    student, cc, html = SES_MAILS

    first = await send_corpus(relay.port, student)  # opens the circuit
    await await_rows(spool, first, {"sent"})
    during = await send_corpus(relay.port, cc, html, student)  # within the cooldown
    found = await await_rows(spool, during, {"sent"})
    assert (1, [True] * 3) == (
        fake_ses.calls,
        ["SES circuit open" in found[q]["fallback_reason"] for q in during],
    )

    await asyncio.sleep(cooldown + 0.2)
    fake_ses.latency = 0.3  # the probe is still in flight while the others are classified
    at_once = [CORPUS[name] for name in (student, cc, html)]
    probing = await asyncio.gather(
        *(asend(relay.port, e.sender, e.recipients, RAW[e.name]) for e in at_once)
    )
    found = await await_rows(spool, probing, {"sent"})
    assert (2, "upstream") == (fake_ses.calls, {found[q]["route"] for q in probing}.pop())
    assert (1, 1) == (openings() - before, len(log_lines(caplog, "circuit_open")))
    assert 1 == len(log_lines(caplog, "circuit_probe"))

    fake_ses.error, fake_ses.latency = None, 0.0
    await asyncio.sleep(cooldown + 0.2)
    after: dict[str, Expected] = {}
    for name in (student, cc, html):  # one by one: the first is the probe, then closed
        sent = await send_corpus(relay.port, name)
        found = await await_rows(spool, sent, {"sent"})
        after |= sent
    found = rows(spool)
    assert (["ses"] * 3, 3) == ([found[q]["route"] for q in after], len(fake_ses.sent))
    assert [found[q]["ses_message_id"] for q in after] == [s.message_id for s in fake_ses.sent]
    assert (1, 1, 1) == (
        openings() - before,
        len(log_lines(caplog, "circuit_open")),
        len(log_lines(caplog, "circuit_closed")),
    )
    print(
        f"circuit: 1 opening, SES calls during cooldown 0, probes {fake_ses.calls - 1 - 3} "
        f"failed + 1 ok, then {len(fake_ses.sent)} mails to SES; original host got "
        f"{len(capture.messages)}, lost 0"
    )


class SlowFirstSes(FakeSes):
    """The first SendRawEmail succeeds but answers late; from then on sending is paused."""

    def send_raw_email(self, form: dict[str, str]) -> tuple[int, str] | Fault:
        outcome = super().send_raw_email(form)
        if not isinstance(outcome, Fault) and len(self.sent) == 1:
            self.error = PAUSED
            time.sleep(1.0)
        return outcome


async def test_success_in_flight_when_circuit_opened_does_not_close_it(
    start_relay: Start,
    capture: CaptureServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A send that was already in flight when another one opened the circuit (the daily
    quota ran out between them) succeeds afterwards: that is not a probe, the circuit stays
    open for its cooldown, so the next mail goes upstream and there is no second alert."""
    caplog.set_level(logging.INFO, logger="relay")
    before = openings()
    with SlowFirstSes() as fake:
        relay = await start_relay(deliver=True, **config(capture, fake.url))
        spool = relay.settings.spool
        slow = await send_corpus(relay.port, SES_MAILS[0])
        for _ in range(500):  # until its SendRawEmail is in flight
            if fake.calls:
                break
            await asyncio.sleep(0.01)
        opener = await send_corpus(relay.port, SES_MAILS[1])  # paused: opens the circuit
        found = await await_rows(spool, [*slow, *opener], {"sent"})
        later = await send_corpus(relay.port, SES_MAILS[2])
        found |= await await_rows(spool, later, {"sent"})
    routes = {
        name: found[q]["route"]
        for q, name in [
            *((q, "slow") for q in slow),
            *((q, "opener") for q in opener),
            *((q, "later") for q in later),
        ]
    }
    assert {"slow": "ses", "opener": "upstream", "later": "upstream"} == routes
    [later_id] = later
    assert "SES circuit open" in found[later_id]["fallback_reason"]
    assert (2, 1, 1) == (fake.calls, openings() - before, len(log_lines(caplog, "circuit_open")))
    print(
        f"straddling success: SES calls {fake.calls}, circuit openings 1, later mail went "
        f"upstream ({found[later_id]['fallback_reason']!r})"
    )


# The original host's own faults


@pytest.mark.system
async def test_original_host_down_defers_then_delivers(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Original host down: upstream mail is deferred with the connection error on the row;
    when the host is back (same port) it is delivered once, on the retry schedule."""
    capture.stop()
    relay = await start_relay(deliver=True, **config(capture, fake_ses.url))
    spool = relay.settings.spool
    sent = await send_corpus(relay.port, CONTROL, "lookalike/password-reset.eml")
    deferred = await await_rows(spool, sent, {"deferred"})
    replies = {q: row["reply"] for q, row in deferred.items()}
    assert [] == [r for r in replies.values() if "Connect" not in r and "refused" not in r]
    capture.start()
    found = await await_rows(spool, sent, {"sent"})
    assert_at_original_host_once(capture, sent, found)
    assert [True, True] == [row["attempts"] >= 2 for row in found.values()]
    print(
        f"host down: 2 sent, 2 deferred ({next(iter(replies.values()))!r}), host back: "
        f"2 delivered, attempts {[r['attempts'] for r in found.values()]}, lost 0, dup 0"
    )


async def test_5xx_dead_letter_then_queue_retry_delivers(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """A 5xx at DATA makes a dead letter (failed, reply kept, body kept); `relay queue retry
    ID` queues it again and it is delivered once the host accepts."""
    capture.data_reply = "554 5.7.1 Message refused by policy"
    relay = await start_relay(deliver=True, **config(capture, fake_ses.url))
    spool = relay.settings.spool
    sent = await send_corpus(relay.port, CONTROL)
    [queue_id] = sent
    failed = await await_rows(spool, sent, {"failed"})
    assert ("failed", "554 5.7.1 Message refused by policy", 0) == (
        failed[queue_id]["state"],
        failed[queue_id]["reply"],
        len(capture.messages),
    )
    capture.data_reply = None
    config_file = relay.settings.source
    retried = await asyncio.to_thread(
        relay_cli, "queue", "--config", str(config_file), "retry", queue_id
    )
    assert (0, f"{queue_id}: queued for delivery") == (retried.returncode, retried.stdout.strip())
    found = await await_rows(spool, sent, {"sent"})
    assert_at_original_host_once(capture, sent, found)
    assert ["failed", "retry", "sent"] == [
        e for e, _ in found[queue_id]["events"] if e in ("failed", "retry", "sent")
    ]
    print(
        f"5xx: 1 sent, dead letter ({failed[queue_id]['reply']!r}), relay queue retry, "
        f"delivered once; DATA attempts at host {capture.data_attempts}"
    )


@pytest.mark.system
async def test_max_age_expiry_fails_the_message(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Original host down past `retry.max_age`: the message becomes a dead letter saying so."""
    capture.stop()
    overrides = config(capture, fake_ses.url) | {"retry": {"schedule": [1], "max_age": 2}}
    relay = await start_relay(deliver=True, **overrides)
    sent = await send_corpus(relay.port, CONTROL)
    [queue_id] = sent
    found = await await_rows(relay.settings.spool, sent, {"failed"})
    reply = found[queue_id]["reply"]
    assert (True, True) == ("(retry.max_age)" in reply, found[queue_id]["attempts"] >= 2), reply
    print(f"max_age 2s: failed after {found[queue_id]['attempts']} attempts: {reply[:60]!r}")


@pytest.mark.system
async def test_a_dead_letter_queued_again_gets_a_fresh_max_age(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Original host down past `retry.max_age` (3 s): a dead letter. The host comes back
    answering 451, and `relay queue retry ID` queues the mail again: its first attempt
    fails for now (the 451, or the dead-host cache), and it is deferred, its max_age
    counted from the retry (not failed again at once with a second DSN, as when it was
    counted from its arrival, long past); it is sent once the host takes it."""
    capture.stop()
    overrides = config(capture, fake_ses.url) | {"retry": {"schedule": [1], "max_age": 3}}
    relay = await start_relay(deliver=True, **overrides)
    spool = relay.settings.spool
    sent = await send_corpus(relay.port, CONTROL)
    [queue_id] = sent
    await await_rows(spool, sent, {"failed"})
    capture.data_reply = "451 4.3.0 Try again later"
    capture.start()
    retried = await asyncio.to_thread(
        relay_cli, "queue", "--config", str(relay.settings.source), "retry", queue_id
    )
    assert 0 == retried.returncode, retried.stderr
    deferred = (await await_rows(spool, sent, {"deferred"}))[queue_id]
    capture.data_reply = None
    found = (await await_rows(spool, sent, {"sent"}))[queue_id]
    events = [e for e, _ in found["events"] if e in ("failed", "retry", "deferred", "sent")]
    after = events[events.index("retry") :]
    print(f"dead letter retried: {deferred['reply']!r}; history after the retry: {after}")
    assert (1, "deferred", "sent") == (events.count("failed"), after[1], after[-1])


@pytest.mark.system
async def test_a_dead_letter_keeps_only_the_recipients_it_failed_for(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Two recipients; the host answers 451 to MAIL FROM, so the mail is deferred (for 3 s,
    past `retry.max_age`, 2 s). At the next try it takes one recipient and answers 451 for
    the other: past max_age, the mail is a dead letter, and it names only the recipient it
    failed for, so `relay queue retry` sends to that one alone: one copy each."""
    capture.mail_reply = "451 4.3.0 Try again later"
    overrides = config(capture, fake_ses.url) | {"retry": {"schedule": [3], "max_age": 2}}
    relay = await start_relay(deliver=True, **overrides)
    spool = relay.settings.spool
    raw = RAW[CONTROL]
    queue_id = await asend(
        relay.port, CORPUS[CONTROL].sender, ["a@example.org", "b@example.org"], raw
    )
    await await_rows(spool, [queue_id], {"deferred"})
    capture.mail_reply = None
    capture.refuse_rcpt("b@example.org", "451 4.2.1 Mailbox busy, try later")
    failed = (await await_rows(spool, [queue_id], {"failed"}))[queue_id]
    capture.accept_rcpt("b@example.org")
    retried = await asyncio.to_thread(
        relay_cli, "queue", "--config", str(relay.settings.source), "retry", queue_id
    )
    assert 0 == retried.returncode, retried.stderr
    await await_rows(spool, [queue_id], {"sent"})
    copies = [m.rcpt_tos for m in capture.messages if m.mail_from != "<>"]
    print(f"dead letter of a partial send: recipients {failed['recipients']}; copies {copies}")
    assert ("b@example.org",) == failed["recipients"]
    assert [("a@example.org",), ("b@example.org",)] == copies


@pytest.mark.parametrize(
    ("refusal", "times", "attempts"),
    [("550 5.1.1 No such user", None, 1), ("451 4.2.1 Mailbox busy, try later", 1, 2)],
    ids=["5xx-one-recipient", "4xx-one-recipient"],
)
async def test_partial_upstream_result_sends_each_recipient_once(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
    refusal: str,
    times: int | None,
    attempts: int,
) -> None:
    """One recipient refused, one accepted: a `partial` event is recorded and the accepted
    recipient gets the mail once; a 4xx refusal is retried for that recipient alone."""
    capture.refuse_rcpt("b@example.org", refusal, times=times)
    relay = await start_relay(deliver=True, **config(capture, fake_ses.url))
    raw = RAW[CONTROL]
    queue_id = await asend(
        relay.port, CORPUS[CONTROL].sender, ["a@example.org", "b@example.org"], raw
    )
    found = await await_rows(relay.settings.spool, [queue_id], {"sent"})
    row = found[queue_id]
    # Not the DSN to the sender about the 550 (tests/test_dsn.py): it has the null sender.
    got = [(m.rcpt_tos, m.content) for m in capture.messages if m.mail_from != "<>"]
    expected_rcpts = [("a@example.org",)] + ([("b@example.org",)] if times else [])
    assert [(r, row["trace"] + raw) for r in expected_rcpts] == got
    partial = [detail for event, detail in row["events"] if event == "partial"]
    assert (1, attempts) == (len(partial), row["attempts"])
    assert refusal in partial[0]
    print(
        f"partial ({refusal[:3]}): copies {[m.rcpt_tos for m in capture.messages]}, "
        f"partial event {partial[0]!r}, attempts {row['attempts']}"
    )


NO_MESSAGE_ID = Fault(
    status=200,
    body='<SendRawEmailResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/">'
    "<SendRawEmailResult/></SendRawEmailResponse>",
)


@pytest.mark.system
async def test_a_probe_answered_without_a_message_id_goes_upstream_and_the_next_probes(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """The probe after the cooldown gets 200 without a MessageId: SES may have sent it, so
    it goes upstream (once, not to SES again) and the circuit stays open, not half-open
    for good; after the next cooldown the next mail probes and, SES healthy, goes to SES.
    (Before, that answer deferred the probe and SES was called for it again.)"""
    cooldown = 1.0
    fake_ses.error = PAUSED
    relay = await start_relay(
        deliver=True, **config(capture, fake_ses.url, circuit_cooldown=cooldown)
    )
    spool = relay.settings.spool
    await await_rows(spool, await send_corpus(relay.port, SES_MAILS[0]), {"sent"})  # opens
    await asyncio.sleep(cooldown + 0.2)
    fake_ses.error = None
    fake_ses.fail_next(NO_MESSAGE_ID)
    probe = await send_corpus(relay.port, SES_MAILS[1])
    [probed] = (await await_rows(spool, probe, {"sent"})).values()
    await asyncio.sleep(cooldown + 0.2)
    later = await send_corpus(relay.port, SES_MAILS[2])
    [sent] = (await await_rows(spool, later, {"sent"})).values()
    assert ("upstream", True) == (
        probed["route"],
        "SES may have sent it, its answer never came" in probed["fallback_reason"],
    )
    assert ("ses", 1, 3) == (sent["route"], len(fake_ses.sent), fake_ses.calls)


@pytest.mark.parametrize("api", ["v1", "v2"], ids=["api-v1", "api-v2"])
async def test_120_recipients_go_out_in_three_paced_calls_and_a_refused_batch_upstream(
    start_relay: Start, capture: CaptureServer, fake_ses: FakeSes, api: str
) -> None:
    """A re-engagement mail to 120 recipients: three SES calls of at most 50 (50, 50, 20),
    each paced on its recipients (the gap after a call of n recipients is at least about
    n / max_send_rate) and each recorded on its own row; SES refuses the first call for
    good, and exactly that call's recipients reach the original host, once; the others went
    through SES, once each."""
    rate = 100.0
    fake_ses.fail_next(Fault(code="MessageRejected", message="Illegal header."))
    relay = await start_relay(
        deliver=True,
        limits={"max_recipients": 200},
        **config(capture, fake_ses.url, max_send_rate=rate, suppressed="send", api=api),
    )
    e = CORPUS[SES_MAILS[0]]
    recipients = tuple(f"student{i}@students.example.org" for i in range(120))
    first = await asend(relay.port, e.sender, recipients, RAW[e.name])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = rows(relay.settings.spool)
        if len(found) == 3 and all(r["state"] == "sent" for r in found.values()):
            break
        await asyncio.sleep(0.05)
    assert 3 == len(found) and {"sent"} == {r["state"] for r in found.values()}, found

    calls = sorted((at, d) for at, _, d in fake_ses.requests)
    assert [20, 50, 50] == sorted(len(d) for _, d in calls)
    assert sorted(recipients) == sorted(r for _, d in calls for r in d)
    gaps = [(b - a, len(d) / rate) for (a, d), (b, _) in itertools.pairwise(calls)]
    assert [] == [(gap, need) for gap, need in gaps if gap < need * 0.8]
    refused = calls[0][1]
    [upstream] = capture.messages
    assert (e.sender, sorted(refused)) == (upstream.mail_from, sorted(upstream.rcpt_tos))
    assert sorted(set(recipients) - set(refused)) == sorted(
        r for s in fake_ses.sent for r in s.destinations
    )
    by_route = sorted(
        (r["route"], len(r["recipients"]), r["fallback_reason"] or "") for r in found.values()
    )
    assert [
        ("ses", 50 if len(refused) == 20 else 20, ""),
        ("ses", 50, ""),
        ("upstream", len(refused), "SES refused the message: MessageRejected: Illegal header."),
    ] == sorted(by_route)
    assert first in found
    print(
        f"120 recipients: SES calls {[len(d) for _, d in calls]}, gaps "
        f"{', '.join(f'{g:.2f}s' for g, _ in gaps)}, refused batch of {len(refused)} upstream"
    )


@pytest.mark.system
@pytest.mark.parametrize("api", ["v1", "v2"], ids=["api-v1", "api-v2"])
async def test_unverified_identity_opens_its_own_circuit_verified_mail_keeps_flowing(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
    caplog: pytest.LogCaptureFixture,
    api: str,
) -> None:
    """Moodle's VERP senders at lms.example.edu, a domain SES has not verified, next to mail
    from the verified moodle.example.org: the first unverified mail costs one SES call and
    opens a circuit for identity lms.example.edu only (one ERROR line naming it and what to
    do, one count of the metric labelled by identity); during the cooldown its mail goes
    upstream without an SES call while verified mail still goes through SES; after the
    cooldown one mail probes (one call), the rest go upstream."""
    caplog.set_level(logging.INFO, logger="relay")
    cooldown = 2.0
    fake_ses.check_identities, fake_ses.verified = True, {"moodle.example.org"}
    labels = {"kind": "identity", "identity": "lms.example.edu", "code": "MessageRejected"}
    opened = ("relay_ses_identity_circuit_openings_total", labels)
    before = REGISTRY.get_sample_value(*opened) or 0.0
    relay = await start_relay(
        deliver=True, **config(capture, fake_ses.url, circuit_cooldown=cooldown, api=api)
    )
    spool = relay.settings.spool
    e = CORPUS[SES_MAILS[0]]
    assert e.sender.endswith("@moodle.example.org")

    async def send_as(*senders: str) -> list[str]:
        """Send the mail with these envelope senders at once; how each went, in order."""
        queued = await asyncio.gather(
            *(asend(relay.port, s, e.recipients, RAW[e.name]) for s in senders)
        )
        found = await await_rows(spool, queued, {"sent"})
        return [went(found[q]["route"], found[q]["fallback_reason"] or "") for q in queued]

    def went(route: str, reason: str) -> str:
        if reason.startswith("SES cannot send for identity lms.example.edu: MessageRejected"):
            return f"{route}: refused"
        if reason.startswith("SES circuit open for identity lms.example.edu: MessageRejected"):
            return f"{route}: circuit open"
        return f"{route}: {reason}"

    def lms_calls() -> int:
        return sum(source.endswith("@lms.example.edu") for _, source, _ in fake_ses.requests)

    first = await send_as("bounce+1a@lms.example.edu")
    during = await send_as(
        "bounce+2b@lms.example.edu", e.sender, "bounce+3c@lms.example.edu", e.sender
    )
    calls_in_cooldown = lms_calls()
    await asyncio.sleep(cooldown + 0.2)
    fake_ses.latency = 0.3  # the probe is in flight while the other two are classified
    after = await send_as(*(f"bounce+{n}@lms.example.edu" for n in ("4d", "5e", "6f")))

    waiting = "upstream: circuit open"
    assert ["upstream: refused"] == first
    assert [waiting, "ses: ", waiting, "ses: "] == during
    assert ["upstream: refused", waiting, waiting] == sorted(after, reverse=True)
    assert (1, 2) == (calls_in_cooldown, lms_calls())
    assert ["moodle.example.org"] * 2 == [s.source.rpartition("@")[2] for s in fake_ses.sent]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 == len(errors), errors
    assert "identity lms.example.edu" in errors[0]
    assert "verify domain lms.example.edu in eu-west-1, or set ses.source" in errors[0]
    assert 1.0 == (REGISTRY.get_sample_value(*opened) or 0.0) - before
    print(
        f"unverified identity: SES calls for lms.example.edu {lms_calls()} (the first mail and"
        f" the probe; {calls_in_cooldown - 1} during the cooldown),"
        f" verified mail via SES {len(fake_ses.sent)}, upstream {len(capture.messages)},"
        f" ERROR lines {len(errors)}"
    )


async def test_a_reloaded_ses_source_is_the_next_sends_source(
    start_relay: Start, capture: CaptureServer, fake_ses: FakeSes, write_config: ConfigWriter
) -> None:
    """`ses.source` changed and reloaded (as relay's own advice says, for an unverified
    domain): the next mail goes out with the new Source. The SES client kept the settings it
    was made with, and no line said the change waited for a restart: every mail went on
    with the refused Source, and upstream."""
    settings = config(capture, fake_ses.url)
    relay = await start_relay(deliver=True, **settings)
    sent = await send_corpus(relay.port, SES_MAILS[0])
    await await_rows(relay.settings.spool, sent, {"sent"})
    new = "bounces@verified.example.org"
    write_config("relay0.yaml", **{**settings, "ses": {**settings["ses"], "source": new}})
    assert runtime.reload(relay.ctx)
    sent = await send_corpus(relay.port, SES_MAILS[1])
    await await_rows(relay.settings.spool, sent, {"sent"})
    assert [CORPUS[SES_MAILS[0]].sender, new] == [m.source for m in fake_ses.sent]


def pace_ceiling() -> float | None:
    return REGISTRY.get_sample_value("relay_ses_pace_ceiling")


async def test_a_reloaded_max_send_rate_paces_at_once(
    start_relay: Start, capture: CaptureServer, fake_ses: FakeSes, write_config: ConfigWriter
) -> None:
    """`ses.max_send_rate` changed and reloaded: the pace's ceiling is the new rate at once,
    and back to `auto` it is 90% of the quota's, asked at once. Both waited for the next
    quota refresh, up to five minutes, and no line said so."""
    settings = config(capture, fake_ses.url, max_send_rate=5)
    relay = await start_relay(deliver=True, **settings)
    seen = [await ceiling_becomes(5)]
    for rate, expected in ((40, 40.0), ("auto", 0.9 * fake_ses.max_send_rate)):
        changed = {**settings, "ses": {**settings["ses"], "max_send_rate": rate}}
        write_config("relay0.yaml", **changed)
        assert runtime.reload(relay.ctx)
        seen.append(await ceiling_becomes(expected))
    assert pytest.approx([5, 40, 0.9 * fake_ses.max_send_rate]) == seen


async def ceiling_becomes(expected: float, within: float = 3.0) -> float | None:
    """The pace ceiling once it is `expected`, or what it is after `within` seconds."""
    for _ in range(int(within / 0.02)):
        if pace_ceiling() == pytest.approx(expected):
            break
        await asyncio.sleep(0.02)
    return pace_ceiling()


async def test_a_reload_while_delivery_warms_up_is_not_missed(
    start_relay: Start, capture: CaptureServer, fake_ses: FakeSes, write_config: ConfigWriter
) -> None:
    """A reload that moves the original host while the delivery task still waits for SES's
    first GetSendQuota (up to 5 s): mail goes to the new host. The task took the settings
    before that wait and listened for reloads after it: it kept the old host until the next
    reload."""
    fake_ses.latency = 1.0  # GetSendQuota answers after a second
    settings = config(capture, fake_ses.url)
    relay = await start_relay(deliver=True, **settings)
    with CaptureServer() as new:
        moved = {**settings, "upstream": {**settings["upstream"], "port": new.port}}
        write_config("relay0.yaml", **moved)
        assert runtime.reload(relay.ctx)
        fake_ses.latency = 0.0
        sent = await send_corpus(relay.port, CONTROL)
        await await_rows(relay.settings.spool, sent, {"sent"})
        assert ([], list(sent)) == (
            [m.queue_id for m in capture.messages],
            [m.queue_id for m in new.messages],
        )


async def test_an_ses_answer_that_never_comes_sends_the_mail_upstream_once(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """SES takes 1.5 s to answer, relay waits 1 s (`ses.timeout`): SES got the mail and may
    have sent it, its answer is lost. Retried through SES, each try could send another copy
    (9 of one mail before `fallback_after` in a review, then a 10th upstream). Now the
    mail goes upstream at once, and SES is not called again: at most one copy more."""
    fake_ses.latency = 1.5
    relay = await start_relay(
        deliver=True, **config(capture, fake_ses.url, timeout=1, fallback_after=300)
    )
    [student] = SES_MAILS[:1]
    sent = await send_corpus(relay.port, student)
    found = await await_rows(relay.settings.spool, sent, {"sent"}, within=15)
    [row] = found.values()
    await asyncio.sleep(2.0)  # SES's answer, late; no second call
    assert ("upstream", 1, 1) == (row["route"], fake_ses.calls, len(capture.messages))
    assert "SES may have sent it, its answer never came" in row["fallback_reason"]


async def test_an_unconfirmed_mail_the_original_host_defers_is_not_sent_to_ses_again(
    start_relay: Start,
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """As above, and the original host defers the mail (451): its next try went to SES
    again (its rule says SES), a second copy there. The row keeps why it went upstream,
    and every later try of it goes upstream too."""
    fake_ses.latency = 1.5
    capture.data_reply = "451 4.3.0 greylisted, try later"
    relay = await start_relay(
        deliver=True, **config(capture, fake_ses.url, timeout=1, fallback_after=300)
    )
    sent = await send_corpus(relay.port, SES_MAILS[0])
    [deferred] = (await await_rows(relay.settings.spool, sent, {"deferred"}, within=15)).values()
    capture.data_reply, fake_ses.latency = None, 0.0
    [row] = (await await_rows(relay.settings.spool, sent, {"sent"}, within=15)).values()
    assert ("upstream", 1, 1) == (row["route"], fake_ses.calls, len(capture.messages))
    assert deferred["fallback_reason"] == row["fallback_reason"]


async def test_mail_for_the_original_host_does_not_wait_behind_a_paced_ses_backlog(
    start_relay: Start, capture: CaptureServer, fake_ses: FakeSes
) -> None:
    """A re-engagement burst paced at 4 recipients/s, then a forum post for the original
    host. SES mail holds at most SES's lane (12 of the 16 slots); the reminders claimed
    past it go back to the queue, set aside, and the forum post behind them is claimed and
    sent at once. Before the lane it waited 7 s, until 25 of the 40 were sent (behind 5,000
    reminders at SES's usual 14/s, six minutes, and a password reset with it)."""
    relay = await start_relay(deliver=True, **config(capture, fake_ses.url, max_send_rate=4))
    for _ in range(40):
        await send_corpus(relay.port, SES_MAILS[0])
    forum = await send_corpus(relay.port, CONTROL)
    await await_rows(relay.settings.spool, forum, {"sent"}, within=3)
    assert fake_ses.calls < 25


async def test_ses_mail_set_aside_for_its_lane_is_sent_once_each(
    start_relay: Start, capture: CaptureServer, fake_ses: FakeSes
) -> None:
    """4 slots (SES's lane 3), 20 reminders paced at 10/s, then a forum post: each reminder
    past the lane is set aside and claimed again; SES gets each once, each row's attempts
    stay 1 (the claim that set it aside is undone), and the forum post went out before the
    tenth reminder (with one queue in due order it went after the last)."""
    settings = config(capture, fake_ses.url, max_send_rate=10)
    relay = await start_relay(deliver=True, deliverers=4, **settings)
    ses_ids = [q for _ in range(20) for q in await send_corpus(relay.port, SES_MAILS[0])]
    forum = list(await send_corpus(relay.port, CONTROL))
    found = await await_rows(relay.settings.spool, [*ses_ids, *forum], {"sent"}, within=20)
    assert (20, [1] * 20) == (fake_ses.calls, [found[q]["attempts"] for q in ses_ids])
    sent_at = sorted(found[q]["updated_at"] for q in ses_ids)
    assert found[forum[0]]["updated_at"] < sent_at[9]
    assert [None] * 21 == [row["lane"] for row in found.values()]
