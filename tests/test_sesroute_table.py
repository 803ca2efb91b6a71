"""SesRoute verdicts (DESIGN 3.4) for every SES fault class, on a virtual clock.

The SES sender and the pacer are fakes of route.py's own Protocols (`SesSender`,
`Pacer`); the circuit is the real one on the same virtual clock. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay import metrics
from relay.deliver.ses.circuit import Circuit, CircuitState
from relay.deliver.ses.route import (
    SES_BACKOFF_MAX,
    THROTTLE_RETRY,
    Fallback,
    Retry,
    Sent,
    SesRoute,
    Verdict,
)
from relay.errors import (
    AccountFailure,
    DeliveryError,
    NotSent,
    PermanentFailure,
    ScopedFailure,
    TemporaryFailure,
    Throttled,
    Unconfirmed,
)
from relay.mail import Mail
from relay.rules import Decision, Route
from relay.settings import HostPort, Mode, Ses, Settings, Upstream

NOW = 1_800_000_000.0  # the wall clock of every test
COOLDOWN = 300.0
SES_DECISION = Decision(rule="reengagement", route=Route.SES, reasons=("test",))

Outcome = str | BaseException  # a MessageId, or what the send raises


class Clock:
    """One virtual clock serving as both wall and monotonic time."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeSes:
    """An SesSender: answers each send with the next scripted outcome (the last repeats)."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes) or ["ses-1"]
        self.calls: list[tuple[str, str | None, tuple[tuple[str, str], ...]]] = []
        self.arns: list[str | None] = []  # identity_arn of each send
        self.gate: asyncio.Event | None = None  # when set, the next send waits for it

    async def send(
        self,
        mail: Mail,
        *,
        configuration_set: str | None,
        tags: Any,
        identity_arn: str | None = None,
    ) -> str:
        self.calls.append((mail.id, configuration_set, tuple(tags)))
        self.arns.append(identity_arn)
        gate, self.gate = self.gate, None  # one send only: a second never hangs the test
        if gate is not None:
            await gate.wait()
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class FakePacer:
    """A Pacer that never waits and writes down what the route told it."""

    def __init__(self, *, budget: bool = True, acquire_raises: BaseException | None = None):
        self.rate = 14.0
        self.budget = budget
        self.acquire_raises = acquire_raises
        self.log: list[str] = []

    async def acquire(self, recipients: int) -> None:
        self.log.append(f"acquire {recipients}")
        if self.acquire_raises is not None:
            raise self.acquire_raises

    def throttled(self) -> None:
        self.log.append("throttled")

    def succeeded(self, recipients: int = 1) -> None:
        self.log.append(f"succeeded {recipients}")

    def budget_left(self, recipients: int) -> bool:
        return self.budget

    def spend(self, recipients: int) -> None:
        self.log.append(f"spend {recipients}")

    def stop(self) -> None:
        self.log.append("stop")


def make_settings(*, mode: Mode = Mode.LIVE, **ses: Any) -> Settings:
    """Settings with defaults except the SES keys given."""
    return Settings(
        source=Path("relay.yaml"),
        listen=HostPort(host="127.0.0.1", port=2525),
        spool=Path("spool"),
        rules=Path("rules.yaml"),
        upstream=Upstream(host="smtp.example.org"),
        hostname="relay.test",
        mode=mode,
        ses=Ses(circuit_cooldown=COOLDOWN, **ses),
    )


def make_mail(
    *, age: float = 10.0, attempts: int = 1, sender: str = "noreply@moodle.example.org"
) -> Mail:
    """A mail received `age` seconds before NOW, on its `attempts`-th claim."""
    return Mail(
        id="Q1",
        sender=sender,
        recipients=("student@example.org",),
        raw=b"Subject: reminder\r\n\r\nhello\r\n",
        received_at=NOW - age,
        attempts=attempts,
    )


class Rig:
    """A SesRoute with a fake SES and pacer and a real circuit, all on one virtual clock."""

    def __init__(self, *outcomes: Outcome, ses: bool = True, **pacer: Any) -> None:
        self.clock = Clock()
        self.ses = FakeSes(*outcomes)
        self.pace = FakePacer(**pacer)
        self.circuit = Circuit(COOLDOWN, clock=self.clock)
        self.route = SesRoute(
            ses=self.ses if ses else None,
            pace=self.pace,
            circuit=self.circuit,
            wall_clock=self.clock,
        )

    async def attempt(self, mail: Mail | None = None, **settings: Any) -> Verdict:
        """One attempt; the default mail arrived 10 s before the clock's now."""
        mail = mail or replace(make_mail(), received_at=self.clock.now - 10.0)
        return await self.route.attempt(mail, SES_DECISION, make_settings(**settings))


RATE = "Throttling: Maximum sending rate exceeded."
DAILY = "Throttling: Daily message quota exceeded."


def rejected(reply: str) -> Fallback:
    return Fallback(reason="rejected", detail=f"SES refused the message: {reply}")


def account(reply: str) -> Fallback:
    return Fallback(reason="account", detail=f"SES account-wide failure: {reply}")


FAULTS = [
    # (outcome of the one SES call, verdict, circuit after, what the pacer was told)
    pytest.param(
        "ses-1",
        Sent(message_id="ses-1"),
        "closed",
        ["acquire 1", "succeeded 1", "spend 1"],
        id="accepted",
    ),
    pytest.param(
        Throttled("x", reply=RATE),
        Retry(delay=THROTTLE_RETRY, reply=RATE),
        "closed",
        ["acquire 1", "throttled"],
        id="temporary-throttling-rate",
    ),
    pytest.param(
        TemporaryFailure("x", reply="ServiceUnavailable: Service is unavailable."),
        Retry(delay=2.0, reply="ServiceUnavailable: Service is unavailable."),
        "closed",
        ["acquire 1"],
        id="temporary-http-5xx",
    ),
    pytest.param(
        # SES may have sent it: SES again could send a copy at each try (9 before
        # fallback_after in a test); upstream once instead, at most one copy more.
        Unconfirmed("x", reply="ReadTimeoutError: Read timeout"),
        Fallback(
            reason="unconfirmed",
            detail="SES may have sent it, its answer never came; not SES again:"
            " ReadTimeoutError: Read timeout",
        ),
        "closed",
        ["acquire 1"],
        id="unconfirmed-read-timeout-goes-upstream-once",
    ),
    pytest.param(
        TemporaryFailure("x", reply="EndpointConnectionError: Could not connect"),
        Retry(delay=2.0, reply="EndpointConnectionError: Could not connect"),
        "closed",
        ["acquire 1"],
        id="temporary-connection-error",
    ),
    pytest.param(
        PermanentFailure("x", reply="MessageRejected: Email address is not verified."),
        rejected("MessageRejected: Email address is not verified."),
        "closed",
        ["acquire 1"],
        id="permanent-message-rejected",
    ),
    pytest.param(
        NotSent("x", reply="10485761 bytes, over the SES limit of 10485760"),
        Fallback(
            reason="unsendable",
            detail="SES cannot take the message: 10485761 bytes, over the SES limit of 10485760",
        ),
        "closed",
        ["acquire 1"],
        id="not-sent-over-size-limit",
    ),
    pytest.param(
        PermanentFailure("x", reply="InvalidParameterValue: Missing final '@domain'"),
        rejected("InvalidParameterValue: Missing final '@domain'"),
        "closed",
        ["acquire 1"],
        id="permanent-invalid-address",
    ),
    pytest.param(
        AccountFailure("x", reply=DAILY), account(DAILY), "open", ["acquire 1"], id="account-daily"
    ),
    pytest.param(
        AccountFailure("x", reply="AccountSendingPausedException: paused"),
        account("AccountSendingPausedException: paused"),
        "open",
        ["acquire 1"],
        id="account-sending-paused",
    ),
    pytest.param(
        AccountFailure("x", reply="ConfigurationSetDoesNotExist: no set"),
        account("ConfigurationSetDoesNotExist: no set"),
        "open",
        ["acquire 1"],
        id="account-configuration-set-missing",
    ),
    pytest.param(
        AccountFailure("x", reply="MailFromDomainNotVerifiedException: not verified"),
        account("MailFromDomainNotVerifiedException: not verified"),
        "open",
        ["acquire 1"],
        id="account-mail-from-not-verified",
    ),
    pytest.param(
        AccountFailure("x", reply="AccessDenied: not authorized"),
        account("AccessDenied: not authorized"),
        "open",
        ["acquire 1"],
        id="account-access-denied",
    ),
    pytest.param(
        AccountFailure("x", reply="NoCredentialsError"),
        account("NoCredentialsError"),
        "open",
        ["acquire 1"],
        id="account-no-credentials",
    ),
]


@pytest.mark.parametrize(("outcome", "verdict", "circuit", "pacer"), FAULTS)
async def test_verdict_per_fault_class(
    outcome: Outcome, verdict: Verdict, circuit: str, pacer: list[str]
) -> None:
    """A young message: temporary faults retry SES, permanent ones fall back at once,
    account-wide ones fall back at once and open the circuit; only a success is spent."""
    rig = Rig(outcome)
    actual = await rig.attempt()
    assert (verdict, circuit, pacer) == (actual, rig.circuit.state.value, rig.pace.log)


TEMPORARY = TemporaryFailure("x", reply="InternalFailure")
THROTTLED = Throttled("x", reply=RATE)


def retry(delay: float, reply: str = "InternalFailure") -> Retry:
    return Retry(delay=delay, reply=reply)


def too_old(seconds: int, reply: str = "InternalFailure") -> Fallback:
    return Fallback(
        reason="temporary", detail=f"SES failing for {seconds}s (fallback_after): {reply}"
    )


AGES = [
    # (fault, age in seconds, attempts, fallback_after, verdict)
    pytest.param(TEMPORARY, 10, 0, 300, retry(1.0), id="attempt-0"),
    pytest.param(TEMPORARY, 10, 1, 300, retry(2.0), id="attempt-1"),
    pytest.param(TEMPORARY, 10, 3, 300, retry(8.0), id="attempt-3"),
    pytest.param(TEMPORARY, 10, 6, 300, retry(SES_BACKOFF_MAX), id="backoff-capped"),
    pytest.param(TEMPORARY, 10, 200, 300, retry(SES_BACKOFF_MAX), id="many-attempts"),
    pytest.param(
        TEMPORARY,
        10,
        1100,
        3600,
        retry(SES_BACKOFF_MAX),
        id="attempts-past-1023",
    ),
    pytest.param(TEMPORARY, 299.9, 1, 300, retry(2.0), id="just-younger"),
    pytest.param(TEMPORARY, 300, 1, 300, too_old(300), id="at-fallback-after"),
    pytest.param(THROTTLED, 301, 1, 300, too_old(301, RATE), id="throttled-too-old"),
    pytest.param(THROTTLED, 299, 9, 300, retry(THROTTLE_RETRY, RATE), id="throttled-no-backoff"),
    pytest.param(TEMPORARY, 0, 1, 0, too_old(0), id="fallback-after-zero"),
    pytest.param(TEMPORARY, 61, 1, 60, too_old(61), id="short-fallback-after"),
]


@pytest.mark.parametrize(("fault", "age", "attempts", "fallback_after", "verdict"), AGES)
async def test_temporary_retries_until_fallback_after(
    fault: DeliveryError, age: float, attempts: int, fallback_after: float, verdict: Verdict
) -> None:
    """Temporary SES faults retry with exponential backoff (throttling: in a second) until
    the message is `fallback_after` old, then it goes upstream."""
    rig = Rig(fault)
    mail = make_mail(age=age, attempts=attempts)
    assert verdict == await rig.attempt(mail, fallback_after=fallback_after)


BLOCKED = [
    # (settings, mail sender, SES client present, budget left, circuit opened before, verdict)
    pytest.param(
        {"mode": Mode.SHADOW},
        "noreply@x.org",
        True,
        True,
        False,
        Fallback(reason="shadow", detail="shadow mode: classified for SES, sent upstream"),
        id="shadow-mode",
    ),
    pytest.param(
        {"enabled": False},
        "noreply@x.org",
        True,
        True,
        False,
        Fallback(reason="disabled", detail="ses.enabled is false"),
        id="ses-enabled-false",
    ),
    pytest.param(
        {},
        "noreply@x.org",
        False,
        True,
        False,
        # SES turned on by a reload: no client was made at start. It read "ses.enabled is
        # false", a reason the fallback alert leaves out: SES unused, and no alert.
        Fallback(
            reason="needs_restart",
            detail="ses.enabled was turned on by a reload: restart relay to use SES",
        ),
        id="no-ses-client",
    ),
    pytest.param(
        {},
        "",
        True,
        True,
        False,
        Fallback(reason="null_sender", detail="SES cannot send with a null sender <>"),
        id="null-sender",
    ),
    pytest.param(
        {},
        "noreply@x.org",
        True,
        False,
        False,
        Fallback(reason="daily_quota", detail="SES daily sending quota spent"),
        id="daily-budget-spent",
    ),
    pytest.param(
        {},
        "noreply@x.org",
        True,
        True,
        True,
        Fallback(reason="circuit_open", detail="SES circuit open: AccessDenied"),
        id="circuit-open",
    ),
    pytest.param(
        {"mode": Mode.SHADOW, "enabled": False},
        "",
        True,
        True,
        True,
        Fallback(reason="shadow", detail="shadow mode: classified for SES, sent upstream"),
        id="shadow-first",
    ),
]


@pytest.mark.parametrize(("settings", "sender", "ses", "budget", "opened", "verdict"), BLOCKED)
async def test_blocked_goes_upstream_without_calling_ses(
    settings: dict[str, Any],
    sender: str,
    ses: bool,
    budget: bool,
    opened: bool,
    verdict: Verdict,
) -> None:
    """Shadow mode, `ses.enabled: false`, a null sender, a spent daily budget and an open
    circuit each send the message upstream without an SES call or a pacing grant."""
    rig = Rig(ses=ses, budget=budget)
    if opened:
        rig.circuit.failed("AccessDenied")
    actual = await rig.attempt(make_mail(sender=sender), **settings)
    assert (verdict, [], []) == (actual, rig.ses.calls, rig.pace.log)


async def test_blocked_mail_does_not_use_up_the_probe() -> None:
    """A null-sender mail after the cooldown falls back for its own reason; the circuit
    stays open so that the next SES-able mail is the probe."""
    rig = Rig("ses-1")
    rig.circuit.failed("AccessDenied")
    rig.clock.now += COOLDOWN
    first = await rig.attempt(make_mail(sender=""))
    state = rig.circuit.state
    second = await rig.attempt()
    assert (
        Fallback(reason="null_sender", detail="SES cannot send with a null sender <>"),
        CircuitState.OPEN,
        Sent(message_id="ses-1"),
        CircuitState.CLOSED,
    ) == (first, state, second, rig.circuit.state)


def summary(verdict: Verdict) -> str:
    """A verdict in a word: sent, retry or the fallback reason."""
    if isinstance(verdict, Sent):
        return "sent"
    if isinstance(verdict, Retry):
        return "retry"
    return verdict.reason


PAUSED = AccountFailure(
    "SES account cannot send message Q1: AccountSendingPausedException: paused",
    reply="AccountSendingPausedException: paused",
)

CIRCUIT = [
    # (SES outcomes in order, steps "wait N" or "mail", "<verdict> <circuit>" per mail)
    pytest.param(
        [PAUSED, "ses-1"],
        ["mail", "mail", "wait 299", "mail"],
        ["account open", "circuit_open open", "circuit_open open"],
        1,
        id="open-sends-upstream-for-cooldown",
    ),
    pytest.param(
        [PAUSED, "ses-1"],
        ["mail", "wait 300", "mail", "mail"],
        ["account open", "sent closed", "sent closed"],
        3,
        id="probe-success-closes",
    ),
    pytest.param(
        [PAUSED, PermanentFailure("x", reply="MessageRejected: bad"), "ses-1"],
        ["mail", "wait 300", "mail", "mail"],
        ["account open", "rejected closed", "sent closed"],
        3,
        id="probe-rejected-message-still-closes",
    ),
    pytest.param(
        # A probe refused before any call (over the size limit) learnt nothing: it closed
        # the circuit, and the next mail hit the paused account (and alerted again).
        [PAUSED, NotSent("x", reply="10485761 bytes, over the SES limit"), PAUSED],
        ["mail", "wait 300", "mail", "mail"],
        ["account open", "unsendable open", "account open"],
        3,
        id="probe-not-sent-leaves-it-open-and-the-next-mail-probes",
    ),
    pytest.param(
        [PAUSED, Unconfirmed("x", reply="ReadTimeoutError"), "ses-1"],
        ["mail", "wait 300", "mail", "mail"],
        ["account open", "unconfirmed open", "circuit_open open"],
        2,
        id="probe-unconfirmed-reopens",
    ),
    pytest.param(
        [PAUSED, PAUSED, "ses-1"],
        ["mail", "wait 300", "mail", "mail", "wait 299", "mail", "wait 1", "mail"],
        ["account open", "account open", "circuit_open open", "circuit_open open", "sent closed"],
        3,
        id="probe-account-failure-reopens",
    ),
    pytest.param(
        [PAUSED, TemporaryFailure("x", reply="InternalFailure"), "ses-1"],
        ["mail", "wait 300", "mail", "mail", "wait 300", "mail"],
        ["account open", "retry open", "circuit_open open", "sent closed"],
        3,
        id="probe-temporary-failure-reopens",
    ),
    pytest.param(
        [PAUSED, Throttled("x", reply=RATE), "ses-1"],
        ["mail", "wait 300", "mail", "mail"],
        ["account open", "retry open", "circuit_open open"],
        2,
        id="probe-throttled-reopens",
    ),
]


@pytest.mark.parametrize(("outcomes", "steps", "expected", "calls"), CIRCUIT)
async def test_circuit_through_the_route(
    outcomes: list[Outcome], steps: list[str], expected: list[str], calls: int
) -> None:
    """An account-wide failure opens the circuit: SES-routed mail falls back without an SES
    call for the cooldown, then one probe closes it (SES answered) or reopens it."""
    rig = Rig(*outcomes)
    trace = []
    for step in steps:
        if step == "mail":
            verdict = await rig.attempt()
            trace.append(f"{summary(verdict)} {rig.circuit.state.value}")
        else:
            rig.clock.now += float(step.split()[1])
    assert (expected, calls) == (trace, len(rig.ses.calls))


async def test_only_one_probe_while_it_is_in_flight() -> None:
    """While the probe waits for SES, other SES-routed mail still falls back upstream."""
    rig = Rig(PAUSED, "ses-probe")
    await rig.attempt()
    rig.clock.now += COOLDOWN
    gate = rig.ses.gate = asyncio.Event()
    probe = asyncio.create_task(rig.attempt())
    await asyncio.sleep(0)  # the probe is now inside the SES call
    other = await rig.attempt()
    gate.set()
    assert (
        Fallback(reason="circuit_open", detail=f"SES circuit open: {PAUSED}"),
        Sent(message_id="ses-probe"),
        2,
    ) == (other, await probe, len(rig.ses.calls))


async def test_opening_alerts_once() -> None:
    """The alert counter goes up when the circuit opens, not again when a probe reopens it."""
    code = "AccountSendingPausedException"
    sample = ("relay_ses_circuit_openings_total", {"reason": code})
    before = metrics.REGISTRY.get_sample_value(*sample) or 0.0
    rig = Rig(PAUSED)
    await rig.attempt()
    rig.clock.now += COOLDOWN
    await rig.attempt()  # the probe fails the same way
    after = metrics.REGISTRY.get_sample_value(*sample) or 0.0
    assert (1.0, CircuitState.OPEN) == (after - before, rig.circuit.state)


async def test_probe_cancelled_in_the_ses_call_lets_the_next_mail_probe() -> None:
    """A probe that ends without a verdict (cancelled during the SES call) does not leave
    the circuit half-open for good: the next mail probes."""
    rig = Rig(PAUSED, asyncio.CancelledError(), "ses-2")
    await rig.attempt()
    rig.clock.now += COOLDOWN
    with pytest.raises(asyncio.CancelledError):
        await rig.attempt()
    assert (Sent(message_id="ses-2"), CircuitState.CLOSED) == (
        await rig.attempt(),
        rig.circuit.state,
    )


async def test_probe_cancelled_while_paced_lets_the_next_mail_probe() -> None:
    """A probe that ends while waiting for its pacing grant (cancelled) lets the next mail
    probe, as Circuit.probe_aborted() documents ("e.g. pacing")."""
    rig = Rig(PAUSED, "ses-2")
    await rig.attempt()
    rig.clock.now += COOLDOWN
    rig.pace.acquire_raises = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        await rig.attempt()
    rig.pace.acquire_raises = None
    assert (Sent(message_id="ses-2"), CircuitState.CLOSED) == (
        await rig.attempt(),
        rig.circuit.state,
    )


TAGS = [
    pytest.param(
        Decision(
            rule="reengagement-cc",
            route=Route.SES,
            reasons=(),
            configuration_set="moodle-reminders",
            tags=(("category", "cc"),),
        ),
        {"configuration_set": "site-set"},
        ("Q1", "moodle-reminders", (("rule", "reengagement-cc"), ("category", "cc"))),
        id="rule-set-and-tags",
    ),
    pytest.param(
        Decision(rule=None, route=Route.SES, reasons=()),
        {"configuration_set": "site-set"},
        ("Q1", "site-set", (("rule", "default"),)),
        id="default-rule-settings-set",
    ),
    pytest.param(
        Decision(rule="r", route=Route.SES, reasons=()),
        {},
        ("Q1", None, (("rule", "r"),)),
        id="no-configuration-set",
    ),
]


@pytest.mark.parametrize(("decision", "settings", "call"), TAGS)
async def test_configuration_set_and_tags(
    decision: Decision, settings: dict[str, Any], call: tuple[object, ...]
) -> None:
    """SES gets the rule's configuration set (else the settings'), the rule name as a tag
    ("default" for the default route) and the rule's own tags."""
    rig = Rig("ses-1")
    await rig.route.attempt(make_mail(), decision, make_settings(**settings))
    assert [call] == rig.ses.calls


@pytest.mark.parametrize(
    "arn",
    ["arn:aws:ses:eu-west-1:123456789012:identity/lms.example.edu", None],
    ids=["rule-arn", "no-rule-arn"],
)
async def test_rule_identity_arn_reaches_the_sender(arn: str | None) -> None:
    """The rule's identity_arn goes to the SES client (None: the client uses ses.identity_arn)."""
    rig = Rig("ses-1")
    decision = Decision(rule="r", route=Route.SES, reasons=(), identity_arn=arn)
    await rig.route.attempt(make_mail(), decision, make_settings())
    assert [arn] == rig.ses.arns


UNVERIFIED = ScopedFailure(
    "SES rejected message Q1: MessageRejected: Email address is not verified.",
    reply="MessageRejected: Email address is not verified.",
    scope="identity lms.example.edu",
    advice="verify domain lms.example.edu in eu-west-1, or set ses.source",
)
NO_SET = ScopedFailure(
    "SES rejected message Q1: ConfigurationSetDoesNotExist: Configuration set <cs> does not exist.",
    reply="ConfigurationSetDoesNotExist: Configuration set <cs> does not exist.",
    scope="configuration set cs",
    advice="create configuration set cs in eu-west-1",
)
LMS = "noreply@lms.example.edu"
OTHER = "noreply@moodle.example.org"

SCOPED = [
    # (SES outcomes in order, steps "SENDER [SET]" or "wait N", "<verdict> <scope circuit>")
    pytest.param(
        [UNVERIFIED, "ses-1"],
        [LMS, LMS, OTHER, "wait 299", LMS],
        ["identity open", "identity open", "sent open", "identity open"],
        2,
        id="unverified-identity-only-its-mail-goes-upstream",
    ),
    pytest.param(
        [UNVERIFIED, "ses-1"],
        [LMS, "wait 300", LMS, LMS],
        ["identity open", "sent closed", "sent closed"],
        3,
        id="probe-after-cooldown-closes",
    ),
    pytest.param(
        [UNVERIFIED, UNVERIFIED, "ses-1"],
        [LMS, "wait 300", LMS, LMS, OTHER, "wait 300", LMS],
        ["identity open", "identity open", "identity open", "sent open", "sent closed"],
        4,
        id="probe-failing-again-reopens-one-call-per-cooldown",
    ),
    pytest.param(
        [UNVERIFIED, TemporaryFailure("x", reply="InternalFailure"), "ses-1"],
        [LMS, "wait 300", LMS, LMS],
        ["identity open", "retry open", "sent closed"],
        3,
        id="probe-without-answer-lets-the-next-mail-probe",
    ),
    pytest.param(
        [NO_SET, "ses-1"],
        [f"{OTHER} cs", f"{LMS} cs", OTHER, f"{LMS} other-set"],
        ["identity open", "identity open", "sent open", "sent open"],
        3,
        id="missing-configuration-set-only-its-mail-goes-upstream",
    ),
]


@pytest.mark.parametrize(("outcomes", "steps", "expected", "calls"), SCOPED)
async def test_scoped_circuit_through_the_route(
    outcomes: list[Outcome], steps: list[str], expected: list[str], calls: int
) -> None:
    """SES refusing one identity (unverified, custom MAIL FROM) or one configuration set
    opens a circuit for that scope only: its mail goes upstream without an SES call for the
    cooldown, then one probe; mail of other identities and sets still goes to SES, and the
    account circuit stays closed."""
    rig = Rig(*outcomes)
    trace = []
    for step in steps:
        if step.startswith("wait"):
            rig.clock.now += float(step.split()[1])
            continue
        sender, _, config_set = step.partition(" ")
        mail = replace(make_mail(sender=sender), received_at=rig.clock.now - 10.0)
        decision = replace(SES_DECISION, configuration_set=config_set or None)
        verdict = await rig.route.attempt(mail, decision, make_settings())
        [circuit] = rig.route.scopes.circuits.values()
        trace.append(f"{summary(verdict)} {circuit.state.value}")
    assert (expected, calls, CircuitState.CLOSED) == (
        trace,
        len(rig.ses.calls),
        rig.circuit.state,
    )


async def test_scoped_opening_logs_one_error_and_counts_by_identity(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unverified identity: one ERROR line naming the identity and what to do, however
    often its probe fails; the opening is counted, and the open gauge set, labelled by
    identity."""
    caplog.set_level(logging.INFO, logger="relay")
    labels = {"kind": "identity", "identity": "lms.example.edu"}
    opened = ("relay_ses_identity_circuit_openings_total", {**labels, "code": "MessageRejected"})
    before = metrics.REGISTRY.get_sample_value(*opened) or 0.0
    rig = Rig(UNVERIFIED)
    mail = make_mail(sender=LMS)
    for _ in range(3):
        await rig.route.attempt(
            replace(mail, received_at=rig.clock.now), SES_DECISION, make_settings()
        )
        rig.clock.now += COOLDOWN
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [
        'event=circuit_open cooldown=300.0 reason="MessageRejected: Email address is not'
        ' verified." effect="SES-routed mail of identity lms.example.edu goes upstream"'
        ' scope="identity lms.example.edu" do="verify domain lms.example.edu in eu-west-1,'
        ' or set ses.source"'
    ] == errors
    assert (1.0, 1.0, 3) == (
        (metrics.REGISTRY.get_sample_value(*opened) or 0.0) - before,
        metrics.REGISTRY.get_sample_value("relay_ses_identity_circuit_open", labels),
        len(rig.ses.calls),
    )


async def test_unverified_from_domain_stops_only_mail_with_that_from() -> None:
    """SES names the From header's address as unverified: the circuit is for the From
    domain; mail with the same Source but another From still goes to SES, mail with that
    From from another Source does not."""
    refused = ScopedFailure(
        "SES rejected message Q1: MessageRejected: Email address is not verified.",
        reply="MessageRejected: Email address is not verified.",
        scope="identity staff.example.edu",
        advice="verify domain staff.example.edu in eu-west-1",
    )
    rig = Rig(refused, "ses-1")

    def mail_from(sender: str, from_: str) -> Mail:
        raw = f"From: Ada <{from_}>\r\nSubject: reminder\r\n\r\nhello\r\n".encode()
        return replace(make_mail(sender=sender), raw=raw, received_at=rig.clock.now)

    verdicts = [
        summary(await rig.route.attempt(mail_from(s, f), SES_DECISION, make_settings()))
        for s, f in (
            (LMS, "ada@staff.example.edu"),
            (LMS, "noreply@lms.example.edu"),
            (OTHER, "ada@staff.example.edu"),
        )
    ]
    assert (["identity", "sent", "identity"], 2) == (verdicts, len(rig.ses.calls))
