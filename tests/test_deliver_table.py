"""Deliverer outcomes (DESIGN 3.4) for every fault class, recorded on an in-memory spool.

The spool (`Store`), the original host (`UpstreamSender`, `UpstreamResultLike`) and
SES (`SesSender`) are fakes of the Protocols loop.py and route.py own; SesRoute and
Circuit are the real ones. One virtual clock serves as wall and monotonic time, and
the sleep between tries to record an outcome is virtual too: nothing waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from relay.deliver.loop import UPSTREAM_DOWN_FOR, Deliverer
from relay.deliver.ses.circuit import Circuit
from relay.deliver.ses.route import SesRoute
from relay.errors import (
    AccountFailure,
    HostUnreachable,
    NotSent,
    PermanentFailure,
    SpoolError,
    TemporaryFailure,
    Throttled,
)
from relay.mail import Mail
from relay.metrics import REGISTRY
from relay.rules import Route, Rule, RuleSet
from relay.rules.mimeview import MailView
from relay.settings import Bounces, HostPort, Mode, Retry, Ses, Settings, Upstream
from relay.spool.rows import Notice

NOW = 1_800_000_000.0
MAX_AGE = 432000.0
SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0)
RATE = "Throttling: Maximum sending rate exceeded."


class Clock:
    """One virtual clock serving as both wall and monotonic time."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """A Store that writes every outcome down as one line; `failures` SpoolErrors first."""

    def __init__(self, clock: Clock, *, failures: int = 0) -> None:
        self.clock = clock
        self.failures = failures
        self.log: list[str] = []
        self.notices: list[str] = []  # "QUEUE_ID kind to RECIPIENT": DSNs queued with an outcome
        self.batches: list[list[Mail]] = []
        self.stop = asyncio.Event()  # set when the last batch is claimed
        self.wakeup = asyncio.Event()  # set while more batches are due, as a commit would

    async def claim(self, limit: int, *, parked: int = 0) -> list[Mail]:
        batch = self.batches.pop(0) if self.batches else []
        (self.wakeup if self.batches else self.stop).set()  # run() never idles a full second
        return batch[:limit]

    async def park(self, queue_ids: Sequence[str], lane: str) -> int:
        for queue_id in queue_ids:
            self._write(f"parked {queue_id} lane={lane}")
        return len(queue_ids)

    def _write(self, line: str, notice: Notice | None = None) -> None:
        if self.failures:
            self.failures -= 1
            raise SpoolError("database or disk is full")
        self.log.append(line)
        if notice is not None:
            self.notices.append(f"{line.split()[1]} {notice.kind} to {notice.recipient}")

    async def sent(
        self,
        queue_id: str,
        *,
        rule: str | None,
        route: str,
        reply: str,
        ses_message_id: str | None = None,
        fallback_reason: str | None = None,
        notice: Notice | None = None,
    ) -> None:
        extra = f" ses_id={ses_message_id}" if ses_message_id else ""
        extra += f" [fallback: {fallback_reason}]" if fallback_reason else ""
        self._write(f"sent {queue_id} {rule} via {route}: {reply}{extra}", notice)

    async def defer(
        self,
        queue_id: str,
        *,
        due_at: float,
        rule: str | None,
        route: str,
        reply: str,
        fallback_reason: str | None = None,
        recipients: Sequence[str] | None = None,
        notice: Notice | None = None,
    ) -> None:
        extra = f" to={','.join(recipients)}" if recipients is not None else ""
        extra += f" [fallback: {fallback_reason}]" if fallback_reason else ""
        due = due_at - self.clock()
        self._write(f"defer {queue_id} {rule} via {route} in {due:g}s: {reply}{extra}", notice)

    async def fail(
        self,
        queue_id: str,
        *,
        rule: str | None,
        route: str,
        reply: str,
        fallback_reason: str | None = None,
        recipients: Sequence[str] | None = None,
        notice: Notice | None = None,
    ) -> None:
        extra = f" to={','.join(recipients)}" if recipients is not None else ""
        extra += f" [fallback: {fallback_reason}]" if fallback_reason else ""
        self._write(f"fail {queue_id} {rule} via {route}: {reply}{extra}", notice)

    async def event(self, queue_id: str, event: str, detail: str) -> None:
        self._write(f"event {queue_id} {event}: {detail}")

    async def split(
        self, queue_id: str, *, child: str, recipients: Sequence[str], reason: str
    ) -> None:
        """One line per row split off (the child's id is random: not in the line)."""
        self._write(f"split {queue_id} {recipients[0]}..{recipients[-1]}: {reason}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """An UpstreamResultLike: what the original host said per recipient."""

    accepted: tuple[str, ...] = ()
    temporary: tuple[tuple[str, str], ...] = ()
    permanent: tuple[tuple[str, str], ...] = ()
    reply: str = "250 2.0.0 Ok: queued as 4XyZ"


OK = Result(accepted=("a@x.org",))
Answer = Result | BaseException | str  # str: an SES MessageId


class FakeUpstream:
    """An UpstreamSender answering each mail with the next scripted answer (the last repeats)."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers) or [OK]
        self.sent: list[tuple[str, tuple[str, ...]]] = []
        self.closed = False

    async def send(self, mail: Mail) -> Result:
        self.sent.append((mail.id, mail.recipients))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, Result)
        return answer

    async def close(self) -> None:
        self.closed = True


class FakeSes:
    """An SesSender answering with the next scripted MessageId or error."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers) or ["ses-1"]
        self.calls = 0
        self.recipients: list[int] = []  # recipients of each call

    async def send(
        self,
        mail: Mail,
        *,
        configuration_set: str | None,
        tags: Any,
        identity_arn: str | None = None,
    ) -> str:
        self.calls += 1
        self.recipients.append(len(mail.recipients))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, str)
        return answer


class Always:
    """A rules condition that holds for every mail."""

    def test(self, view: MailView) -> tuple[str, ...]:
        return ("always",)

    def describe(self) -> str:
        return "always"


def make_settings(
    *, mode: Mode = Mode.LIVE, schedule: tuple[float, ...] = SCHEDULE, **ses: Any
) -> Settings:
    """Settings with the defaults of DESIGN 3.2 except what is given."""
    return Settings(
        source=Path("relay.yaml"),
        listen=HostPort(host="127.0.0.1", port=2525),
        spool=Path("spool"),
        rules=Path("rules.yaml"),
        upstream=Upstream(host="smtp.example.org"),
        hostname="relay.test",
        mode=mode,
        ses=Ses(**ses),
        retry=Retry(schedule=schedule, max_age=MAX_AGE),
    )


class Rig:
    """A Deliverer wired to the fakes; `route` picks what the one rule routes to."""

    def __init__(
        self,
        *,
        ses: Sequence[Answer] = (),
        upstream: Sequence[Answer] = (),
        route: Route = Route.SES,
        failures: int = 0,
        **settings: Any,
    ) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock, failures=failures)
        self.ses = FakeSes(*ses)
        self.upstream = FakeUpstream(*upstream)
        self.circuit = Circuit(300.0, clock=self.clock)
        self.sleeps: list[float] = []
        rule = Rule(name="moodle", route=route, match=Always())
        self.deliverer = Deliverer(
            settings=make_settings(**settings),
            spool=self.store,
            rules=RuleSet(source="rules.yaml", default=Route.UPSTREAM, rules=(rule,)),
            upstream=self.upstream,
            ses_route=SesRoute(
                ses=self.ses, pace=None, circuit=self.circuit, wall_clock=self.clock
            ),
            wakeup=self.store.wakeup,
            clock=self.clock,
            wall_clock=self.clock,
            sleep=self.sleep,
        )

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds

    async def deliver(self, **fields: Any) -> list[str]:
        """Deliver one mail (received 10 s ago, first attempt unless given); its lines."""
        before = len(self.store.log)
        await self.deliverer.deliver(make_mail(self.clock, **fields))
        return self.store.log[before:]


def make_mail(clock: Clock, *, age: float = 10.0, **fields: Any) -> Mail:
    values: dict[str, Any] = {
        "id": "Q1",
        "sender": "noreply@moodle.example.org",
        "recipients": ("a@x.org",),
        "raw": b"Subject: reminder\r\n\r\nhello\r\n",
        "received_at": clock() - age,
        "attempts": 1,
    }
    values.update(fields)
    return Mail(**values)


def via_upstream(reason: str) -> list[str]:
    """The lines of an SES-routed mail that fell back and was sent upstream."""
    return [
        f"event Q1 fallback: {reason}",
        f"sent Q1 moodle via upstream: 250 2.0.0 Ok: queued as 4XyZ [fallback: {reason}]",
    ]


def account(reply: str) -> AccountFailure:
    return AccountFailure(f"SES account cannot send: {reply}", reply=reply)


MAIL_FIELDS = {"age", "attempts", "sender", "recipients"}


def split(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A row's `given` as (mail fields, settings)."""
    mail = {k: v for k, v in given.items() if k in MAIL_FIELDS}
    return mail, {k: v for k, v in given.items() if k not in MAIL_FIELDS}


def ses_case(
    name: str,
    answer: Answer,
    lines: list[str],
    *,
    calls: int = 1,
    circuit: str = "closed",
    **given: Any,
) -> Any:
    """One row: SES's answer, the lines on the row, SES calls and the circuit after;
    `given` are mail fields (age, attempts, sender) and settings (mode, SES keys)."""
    return pytest.param(answer, given, lines, calls, circuit, id=name)


def rejected(reply: str) -> PermanentFailure:
    return PermanentFailure(f"SES rejected message Q1: {reply}", reply=reply)


SES_CASES = [
    ses_case("ses-accepted", "ses-1", ["sent Q1 moodle via ses: SES accepted ses_id=ses-1"]),
    ses_case(
        "throttled-retries-ses-in-1s",
        Throttled("x", reply=RATE),
        [f"defer Q1 moodle via ses in 1s: {RATE}"],
    ),
    ses_case(
        "http-5xx-retries-ses-with-backoff",
        TemporaryFailure("x", reply="ServiceUnavailable"),
        ["defer Q1 moodle via ses in 4s: ServiceUnavailable"],
        attempts=2,
    ),
    ses_case(
        "timeout-retries-ses",
        TemporaryFailure("x", reply="ReadTimeoutError"),
        ["defer Q1 moodle via ses in 2s: ReadTimeoutError"],
    ),
    ses_case(
        "connection-error-past-fallback-after-goes-upstream",
        TemporaryFailure("x", reply="EndpointConnectionError"),
        via_upstream("SES failing for 300s (fallback_after): EndpointConnectionError"),
        age=300,
    ),
    ses_case(
        "throttled-past-fallback-after-goes-upstream",
        Throttled("x", reply=RATE),
        via_upstream(f"SES failing for 31s (fallback_after): {RATE}"),
        age=31,
        fallback_after=30,
    ),
    ses_case(
        "message-rejected-upstream-at-once",
        rejected("MessageRejected: Email address is not verified."),
        via_upstream("SES refused the message: MessageRejected: Email address is not verified."),
    ),
    ses_case(
        "over-size-upstream-at-once",
        NotSent("x", reply="10485761 bytes, over the SES limit of 10485760"),
        via_upstream("SES cannot take the message: 10485761 bytes, over the SES limit of 10485760"),
    ),
    ses_case(
        "invalid-address-upstream-at-once",
        rejected("InvalidParameterValue: Missing final '@domain'"),
        via_upstream("SES refused the message: InvalidParameterValue: Missing final '@domain'"),
    ),
    ses_case(
        "null-sender-upstream-without-ses",
        "ses-1",
        via_upstream("SES cannot send with a null sender <>"),
        calls=0,
        sender="",
    ),
    ses_case(
        "daily-quota-upstream-and-circuit",
        account("Throttling: Daily message quota exceeded."),
        via_upstream("SES account-wide failure: Throttling: Daily message quota exceeded."),
        circuit="open",
    ),
    ses_case(
        "sending-paused-upstream-and-circuit",
        account("AccountSendingPausedException: paused"),
        via_upstream("SES account-wide failure: AccountSendingPausedException: paused"),
        circuit="open",
    ),
    ses_case(
        "configuration-set-missing-upstream-and-circuit",
        account("ConfigurationSetDoesNotExist: gone"),
        via_upstream("SES account-wide failure: ConfigurationSetDoesNotExist: gone"),
        circuit="open",
    ),
    ses_case(
        "mail-from-unverified-upstream-and-circuit",
        account("MailFromDomainNotVerifiedException: no"),
        via_upstream("SES account-wide failure: MailFromDomainNotVerifiedException: no"),
        circuit="open",
    ),
    ses_case(
        "access-denied-upstream-and-circuit",
        account("AccessDenied: not authorized"),
        via_upstream("SES account-wide failure: AccessDenied: not authorized"),
        circuit="open",
    ),
    ses_case(
        "shadow-mode-upstream",
        "ses-1",
        via_upstream("shadow mode: classified for SES, sent upstream"),
        calls=0,
        mode=Mode.SHADOW,
    ),
    ses_case(
        "ses-disabled-upstream",
        "ses-1",
        via_upstream("ses.enabled is false"),
        calls=0,
        enabled=False,
    ),
]


def rcpts(n: int) -> tuple[str, ...]:
    return tuple(f"r{i}@x.org" for i in range(n))


BATCH = "SES takes at most 50 recipients per call"
BATCHES = [
    pytest.param(
        {"recipients": rcpts(120)},
        [
            f"split Q1 r50@x.org..r99@x.org: {BATCH}: batch 2 of 3",
            f"split Q1 r100@x.org..r119@x.org: {BATCH}: batch 3 of 3",
            "sent Q1 moodle via ses: SES accepted ses_id=ses-1",
        ],
        [50],
        id="120-recipients-two-batches-split-off-first-50-sent",
    ),
    pytest.param(
        {"recipients": rcpts(51)},
        [
            f"split Q1 r50@x.org..r50@x.org: {BATCH}: batch 2 of 2",
            "sent Q1 moodle via ses: SES accepted ses_id=ses-1",
        ],
        [50],
        id="51-recipients-one-split-off",
    ),
    pytest.param(
        {"recipients": rcpts(50)},
        ["sent Q1 moodle via ses: SES accepted ses_id=ses-1"],
        [50],
        id="50-recipients-one-call-no-split",
    ),
    pytest.param(
        {"recipients": rcpts(120), "mode": Mode.SHADOW},
        via_upstream("shadow mode: classified for SES, sent upstream"),
        [],
        id="shadow-120-recipients-upstream-whole",
    ),
    pytest.param(
        {"recipients": rcpts(120), "sender": ""},
        via_upstream("SES cannot send with a null sender <>"),
        [],
        id="null-sender-120-recipients-upstream-whole",
    ),
]


@pytest.mark.parametrize(("given", "lines", "calls"), BATCHES)
async def test_recipients_past_fifty_are_split_into_rows(
    given: dict[str, Any], lines: list[str], calls: list[int]
) -> None:
    """SES takes 50 recipients per call: an SES-bound mail with more keeps its first 50 and
    the rest move to rows of their own, 50 each (each then sent, paced and recorded alone);
    mail that will not try SES goes upstream whole."""
    fields, settings = split(given)
    rig = Rig(**settings)
    actual = await rig.deliver(**fields)
    assert (lines, calls) == (actual, rig.ses.recipients)


@pytest.mark.parametrize(("answer", "given", "lines", "calls", "circuit"), SES_CASES)
async def test_ses_routed_mail(
    answer: Answer, given: dict[str, Any], lines: list[str], calls: int, circuit: str
) -> None:
    """SES-routed mail: sent by SES, retried on SES while temporary and young, else
    upstream (with the reason on the row); account-wide faults also open the circuit."""
    fields, settings = split(given)
    rig = Rig(ses=[answer], **settings)
    actual = await rig.deliver(**fields)
    assert (lines, calls, circuit) == (actual, rig.ses.calls, rig.circuit.state.value)


def gave_up(reply: str, age: float = MAX_AGE, to: str = "a@x.org") -> str:
    return f"fail Q1 moodle via upstream: gave up after {age:.0f}s (retry.max_age): {reply} to={to}"


def deferred(seconds: int, reply: str, to: str = "a@x.org") -> str:
    return f"defer Q1 moodle via upstream in {seconds}s: {reply} to={to}"


T451 = "451 4.7.1 Try again later"
P550 = "550 5.1.1 User unknown"
REFUSED = "ConnectionRefusedError(111, 'Connection refused')"
SENT = "sent Q1 moodle via upstream: 250 2.0.0 Ok: queued as 4XyZ"
TRY_LATER = TemporaryFailure("original host refused Q1 for now", reply=T451)
UNREACHABLE = HostUnreachable("original host unreachable for Q1", reply=REFUSED)
USER_UNKNOWN = PermanentFailure("original host refused Q1", reply=P550)
AB = ("a@x.org", "b@y.org")


def upstream_case(name: str, answer: Answer, lines: list[str], **given: Any) -> Any:
    """One row: the original host's answer, the lines on the row; `given` are mail
    fields (age, attempts, recipients) and settings (schedule)."""
    return pytest.param(answer, given, lines, id=name)


UPSTREAM_CASES = [
    upstream_case("2xx-sent", OK, [SENT]),
    upstream_case("4xx-deferred-first-step", TRY_LATER, [deferred(60, T451)]),
    upstream_case("connection-failure-deferred", UNREACHABLE, [deferred(60, REFUSED)]),
    upstream_case(
        "5xx-failed-dead-letter", USER_UNKNOWN, [f"fail Q1 moodle via upstream: {P550} to=a@x.org"]
    ),
    upstream_case("attempt-0-first-step", TRY_LATER, [deferred(60, T451)], attempts=0),
    upstream_case("attempt-3-third-step", TRY_LATER, [deferred(900, T451)], attempts=3, age=400),
    upstream_case("attempt-5-last-step", TRY_LATER, [deferred(3600, T451)], attempts=5, age=4000),
    upstream_case(
        "past-schedule-last-step", TRY_LATER, [deferred(3600, T451)], attempts=40, age=4000
    ),
    # The step is never further along than the mail's age reaches (60, 360, 1260, 3060 s):
    upstream_case(  # nine tries in SES's five minutes, then a first 4xx from the host
        "ses-attempts-step-by-age", TRY_LATER, [deferred(300, T451)], attempts=9, age=300
    ),
    upstream_case(  # `relay queue retry` of a failed mail: its age starts again
        "many-attempts-young-first-step", TRY_LATER, [deferred(60, T451)], attempts=12, age=10
    ),
    upstream_case(
        "age-at-a-step-reaches-it", TRY_LATER, [deferred(900, T451)], attempts=3, age=359.5
    ),
    upstream_case(
        "configured-schedule", TRY_LATER, [deferred(7, T451)], attempts=4, schedule=(5.0, 7.0)
    ),
    upstream_case("4xx-just-under-max-age", TRY_LATER, [deferred(60, T451)], age=MAX_AGE - 1),
    upstream_case("4xx-at-max-age-failed", TRY_LATER, [gave_up(T451)], age=MAX_AGE),
    upstream_case(
        "connection-failure-past-max-age-failed",
        UNREACHABLE,
        [gave_up(REFUSED, MAX_AGE + 1)],
        age=MAX_AGE + 1,
    ),
    upstream_case(
        "partial-2xx-4xx-defers-the-4xx-recipient",
        Result(accepted=("a@x.org",), temporary=(("b@y.org", T451),)),
        [
            f"event Q1 partial: accepted a@x.org; b@y.org: {T451}",
            deferred(60, f"b@y.org: {T451}", to="b@y.org"),
        ],
        recipients=AB,
    ),
    upstream_case(
        "partial-2xx-5xx-sent-with-record",
        Result(accepted=("a@x.org",), permanent=(("b@y.org", P550),)),
        [f"event Q1 partial: accepted a@x.org; b@y.org: {P550}", SENT],
        recipients=AB,
    ),
    upstream_case(
        "partial-5xx-4xx-defers-the-4xx-recipient",
        Result(permanent=(("a@x.org", P550),), temporary=(("b@y.org", T451),), reply="no DATA"),
        [
            f"event Q1 partial: a@x.org: {P550}; b@y.org: {T451}",
            deferred(60, f"b@y.org: {T451}", to="b@y.org"),
        ],
        recipients=AB,
    ),
    upstream_case(
        "every-recipient-5xx-failed",
        Result(permanent=(("a@x.org", P550),), reply="no DATA"),
        [f"fail Q1 moodle via upstream: a@x.org: {P550} to=a@x.org"],
    ),
    upstream_case(
        "partial-4xx-at-max-age-failed",
        Result(accepted=("a@x.org",), temporary=(("b@y.org", T451),)),
        [
            f"event Q1 partial: accepted a@x.org; b@y.org: {T451}",
            gave_up(f"b@y.org: {T451}", to="b@y.org"),  # a@x.org is not sent to again
        ],
        recipients=AB,
        age=MAX_AGE,
    ),
]


@pytest.mark.parametrize(("answer", "given", "lines"), UPSTREAM_CASES)
async def test_upstream_routed_mail(
    answer: Answer, given: dict[str, Any], lines: list[str]
) -> None:
    """Upstream: 2xx sent; 4xx or no connection deferred on the retry schedule until
    max_age, then failed; 5xx failed; mixed replies handled per recipient."""
    fields, settings = split(given)
    rig = Rig(upstream=[answer], route=Route.UPSTREAM, **settings)
    assert (lines, 0) == (await rig.deliver(**fields), rig.ses.calls)


FALLBACK_THEN_UPSTREAM = [
    pytest.param(
        TRY_LATER,
        [
            "event Q1 fallback: SES refused the message: MessageRejected: no",
            deferred(60, T451) + " [fallback: SES refused the message: MessageRejected: no]",
        ],
        id="fallback-then-4xx-deferred-keeps-reason",
    ),
    pytest.param(
        USER_UNKNOWN,
        [
            "event Q1 fallback: SES refused the message: MessageRejected: no",
            f"fail Q1 moodle via upstream: {P550} to=a@x.org"
            " [fallback: SES refused the message: MessageRejected: no]",
        ],
        id="fallback-then-5xx-failed-keeps-reason",
    ),
]


@pytest.mark.parametrize(("answer", "lines"), FALLBACK_THEN_UPSTREAM)
async def test_fallback_reason_stays_on_the_row(answer: Answer, lines: list[str]) -> None:
    """A message that fell back from SES keeps the reason on its row whatever upstream says."""
    rig = Rig(ses=[PermanentFailure("x", reply="MessageRejected: no")], upstream=[answer])
    assert lines == await rig.deliver()


async def test_open_circuit_sends_later_mail_upstream_without_ses() -> None:
    """After an account-wide failure the next SES-routed mail goes upstream with no SES call."""
    rig = Rig(ses=[account("AccessDenied: no"), "ses-1"])
    await rig.deliver(id="Q0")
    lines = await rig.deliver()
    reason = "SES circuit open: SES account cannot send: AccessDenied: no"
    assert (via_upstream(reason), 1) == (lines, rig.ses.calls)


DOWN_STEPS = [
    pytest.param(
        [0.0, UPSTREAM_DOWN_FOR - 0.001, 0.001],
        [
            deferred(60, REFUSED),
            deferred(60, f"not tried, the original host was unreachable moments ago: {REFUSED}"),
            SENT,
        ],
        2,
        id="not-tried-while-down-then-tried",
    ),
    pytest.param(
        [0.0, UPSTREAM_DOWN_FOR],
        [deferred(60, REFUSED), SENT],
        2,
        id="tried-again-after-down-for",
    ),
]


@pytest.mark.parametrize(("waits", "lines", "tries"), DOWN_STEPS)
async def test_dead_host_cache(waits: list[float], lines: list[str], tries: int) -> None:
    """After a failed connection, mail is deferred without a connection attempt for
    UPSTREAM_DOWN_FOR seconds (like Postfix's dead-host cache), then tried again."""
    rig = Rig(upstream=[UNREACHABLE, OK], route=Route.UPSTREAM)
    actual: list[str] = []
    for wait in waits:
        rig.clock.now += wait
        actual += await rig.deliver()
    assert (lines, tries) == (actual, len(rig.upstream.sent))


async def test_4xx_does_not_mark_the_host_down() -> None:
    """Only a failed connection skips later mail; a 4xx reply does not."""
    rig = Rig(upstream=[TRY_LATER, OK], route=Route.UPSTREAM)
    await rig.deliver()
    assert ([SENT], 2) == (await rig.deliver(), len(rig.upstream.sent))


RECORD_RETRIES = [
    pytest.param(1, [0.5], id="one-failure"),
    pytest.param(3, [0.5, 1.0, 2.0], id="doubling"),
    pytest.param(8, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0], id="capped-at-30s"),
]


@pytest.mark.parametrize(("failures", "sleeps"), RECORD_RETRIES)
async def test_outcome_recorded_after_spool_errors(failures: int, sleeps: list[float]) -> None:
    """A sent mail whose outcome cannot be committed (disk full) is recorded once the spool
    takes it, never mistaken for a failure; the tries back off up to 30 s apart."""
    rig = Rig(failures=failures)
    lines = await rig.deliver()
    assert (["sent Q1 moodle via ses: SES accepted ses_id=ses-1"], sleeps) == (lines, rig.sleeps)


async def test_bug_in_a_delivery_defers_the_mail_and_the_loop_goes_on() -> None:
    """An unexpected exception in one delivery defers that mail (never loses it); the loop
    delivers the next claimed mail and closes the upstream client when drained."""
    rig = Rig(upstream=[RuntimeError("boom"), OK], route=Route.UPSTREAM)
    rig.store.batches = [[make_mail(rig.clock, id="Q1")], [make_mail(rig.clock, id="Q2")]]
    await rig.deliverer.run(rig.store.stop)
    left = await rig.deliverer.drain(1.0)
    assert (
        [
            "defer Q1 None via upstream in 60s: internal error: RuntimeError('boom') to=a@x.org",
            "sent Q2 moodle via upstream: 250 2.0.0 Ok: queued as 4XyZ",
        ],
        0,
        True,
    ) == (sorted(rig.store.log), left, rig.upstream.closed)


async def test_a_delay_warning_that_cannot_be_dated_leaves_the_deferral_recorded() -> None:
    """`retry.max_age: 1e12` (retry for ever) with `bounces.delay_warning`: the warning's
    Will-Retry-Until is past the year 9999 and cannot be written. The deferral is recorded
    without it (logged as dsn_bug). It raised, in the delivery and again in the handler
    that defers after a bug, and the row stayed inflight for good: no retry, no DSN."""
    rig = Rig(upstream=[TemporaryFailure("x", reply="451 4.3.0 try later")], route=Route.UPSTREAM)
    rig.deliverer.settings = replace(
        rig.deliverer.settings,
        retry=Retry(schedule=SCHEDULE, max_age=1e12),
        bounces=Bounces(delay_warning=1.0),
    )
    # dsn.delay_warning reads the real clock: the mail arrived 10 s ago by it.
    rig.store.batches = [[make_mail(rig.clock, received_at=time.time() - 10)]]
    await rig.deliverer.run(rig.store.stop)
    await rig.deliverer.drain(1.0)
    [deferred] = rig.store.log
    assert (True, []) == ("451 4.3.0 try later" in deferred, rig.store.notices), deferred


async def run_with_a_bug(rig: Rig, method: str, mail: Mail, bug: str) -> list[str]:
    """Deliver `mail` with the rig's `outcomes.<method>` raising RuntimeError(`bug`); the
    store's log."""

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(bug)

    setattr(rig.deliverer.outcomes, method, broken)
    rig.store.batches = [[mail]]
    await rig.deliverer.run(rig.store.stop)
    await rig.deliverer.drain(1.0)
    return rig.store.log


async def test_a_bug_in_deferring_after_a_bug_still_defers_the_row() -> None:
    """The handler that defers a mail after a bug meets a bug itself: the row is deferred
    plainly (first step of the schedule, no DSN), not left inflight until a restart."""
    rig = Rig(upstream=[RuntimeError("boom")], route=Route.UPSTREAM)
    log = await run_with_a_bug(rig, "defer_or_fail", make_mail(rig.clock), "a bug in deferring")
    deferred = "defer Q1 None via upstream in 60s: internal error: RuntimeError('boom') to=a@x.org"
    assert [deferred] == log


async def test_a_bug_after_ses_accepted_records_the_send_not_a_retry() -> None:
    """SES accepted the mail, then recording its outcome met a bug: the row is recorded sent,
    with SES's message ID (its bounces still find it). It was deferred as an internal error,
    and SES sent every recipient a copy again at each retry."""
    rig = Rig()
    log = await run_with_a_bug(rig, "sent", make_mail(rig.clock), "a bug after the send")
    sent = (
        "sent Q1 None via ses: accepted, then internal error: RuntimeError('a bug after the send')"
    )
    assert [f"{sent} ses_id=ses-1"] == log


async def test_a_bug_after_the_host_took_some_recipients_defers_only_the_others() -> None:
    """The original host took a@x.org and answered 451 for b@x.org, then recording that met a
    bug: the row is deferred for b@x.org alone (a@x.org got it once)."""
    answer = Result(accepted=("a@x.org",), temporary=(("b@x.org", "451 4.2.1 later"),))
    rig = Rig(upstream=[answer], route=Route.UPSTREAM)
    mail = make_mail(rig.clock, recipients=("a@x.org", "b@x.org"))
    [deferred] = await run_with_a_bug(rig, "upstream_answer", mail, "a bug after the send")
    assert deferred.endswith("to=b@x.org"), deferred


async def test_a_bug_after_a_split_defers_only_the_recipients_left_on_the_row() -> None:
    """A bug after recipients were split off (SES's 50 per call): the mail is deferred with
    the recipients its row kept, not with those the new rows took (each would get a copy
    twice)."""
    rig = Rig(ses=[RuntimeError("boom")])
    recipients = tuple(f"r{n}@x.org" for n in range(60))
    rig.store.batches = [[make_mail(rig.clock, recipients=recipients)]]
    await rig.deliverer.run(rig.store.stop)
    await rig.deliverer.drain(1.0)
    [split_line, defer_line] = rig.store.log
    assert split_line.startswith("split Q1 r50@x.org..r59@x.org")
    assert defer_line.endswith(f"to={','.join(recipients[:50])}")


async def test_a_row_with_a_recipient_many_times_keeps_its_recipients_through_the_split() -> None:
    """A row naming one recipient 51 times and another once (spooled before receive kept
    one copy of a repeated RCPT): SES's 50 per call leave nothing to split off, and the
    mail goes out once to both. Split first, the copies past the 50th took every copy of
    the first batch with them, leaving a mail with no recipients."""
    rig = Rig()
    lines = await rig.deliver(recipients=("a@x.org",) * 51 + ("b@x.org",))
    assert ["sent Q1 moodle via ses: SES accepted ses_id=ses-1"] == lines
    assert [2] == rig.ses.recipients


class Listed:
    """Suppressions: these recipients are on the SES account suppression list."""

    def __init__(self, *listed: str) -> None:
        self.listed = listed

    async def reasons(self, recipients: Sequence[str]) -> dict[str, str]:
        return {r: "BOUNCE" for r in dict.fromkeys(recipients) if r in self.listed}


async def test_a_suppressed_recipient_twice_on_a_row_is_one_suppressed_mail() -> None:
    """A row naming a suppressed recipient twice (spooled before receive kept one copy): it
    goes upstream once, as any all-suppressed mail. Counted as two recipients, it was split
    off, and the row left with no recipient was deferred as it was, split again at each
    retry: a copy per retry until retry.max_age."""
    rig = Rig()
    rig.deliverer.suppressions = Listed("gone@x.org")
    lines = await rig.deliver(recipients=("gone@x.org", "gone@x.org"))
    reason = "on the SES account suppression list: gone@x.org (BOUNCE)"
    assert via_upstream(reason) == lines
    assert [("Q1", ("gone@x.org", "gone@x.org"))] == rig.upstream.sent


DSN_CASES = [
    pytest.param(
        Result(permanent=(("a@x.org", P550),), reply="no DATA"),
        {},
        ["Q1 failed to noreply@moodle.example.org"],
        id="5xx-dsn-to-sender",
    ),
    pytest.param(
        Result(accepted=("a@x.org",), permanent=(("b@y.org", P550),)),
        {"recipients": AB},
        ["Q1 failed to noreply@moodle.example.org"],
        id="partial-5xx-dsn-to-sender",
    ),
    pytest.param(
        TRY_LATER, {"age": MAX_AGE}, ["Q1 failed to noreply@moodle.example.org"], id="max-age"
    ),
    pytest.param(TRY_LATER, {}, [], id="4xx-deferred-no-dsn"),
    pytest.param(OK, {}, [], id="sent-no-dsn"),
    pytest.param(
        Result(permanent=(("a@x.org", P550),), reply="no DATA"),
        {"sender": ""},
        [],
        id="null-sender",
    ),
]


@pytest.mark.parametrize(("answer", "fields", "notices"), DSN_CASES)
async def test_a_mail_that_fails_for_good_queues_one_dsn_to_its_sender(
    answer: Answer, fields: dict[str, Any], notices: list[str]
) -> None:
    """RFC 3464 notices go with the outcome that makes a mail fail for good (5xx, partial
    5xx, max_age), to the envelope sender; none while it is only deferred, none when it is
    sent, and none for a null-sender mail (never a DSN about a DSN)."""
    rig = Rig(upstream=[answer], route=Route.UPSTREAM)
    await rig.deliver(**fields)
    assert notices == rig.store.notices


async def test_a_mail_is_counted_classified_once_whatever_its_tries() -> None:
    """relay_classified_messages_total counts a mail at its first try only: counted at every
    try, the fallback alert's ratio (fallbacks over SES-routed mails) stayed near 0.1 while
    every mail fell back after ten temporary SES failures, and it never fired."""
    rig = Rig(upstream=[TRY_LATER], route=Route.UPSTREAM)
    labels = {"rule": "moodle", "route": "upstream"}
    before = REGISTRY.get_sample_value("relay_classified_messages_total", labels) or 0.0
    for attempt in (1, 2, 3):
        await rig.deliver(attempts=attempt)
    after = REGISTRY.get_sample_value("relay_classified_messages_total", labels)
    assert 1.0 == after - before


def two_slots(rig: Rig) -> Rig:
    """`deliverers: 2`: SES's lane is one of them."""
    rig.deliverer.settings = replace(rig.deliverer.settings, deliverers=2)
    return rig


async def test_ses_mail_claimed_past_its_lane_is_set_aside_and_the_rest_goes_on() -> None:
    """Two slots, two SES mails in one claim: the first takes SES's lane, the second goes
    back to the queue set aside (park), not into the slot kept for the original host."""
    rig = two_slots(Rig())
    rig.store.batches = [[make_mail(rig.clock, id="Q1"), make_mail(rig.clock, id="Q2")]]
    await rig.deliverer.run(rig.store.stop)
    await rig.deliverer.drain(1.0)
    assert ["parked Q2 lane=ses", "sent Q1 moodle via ses: SES accepted ses_id=ses-1"] == sorted(
        rig.store.log
    )


async def test_mail_for_the_original_host_is_never_set_aside() -> None:
    rig = two_slots(Rig(route=Route.UPSTREAM))
    rig.store.batches = [[make_mail(rig.clock, id="Q1"), make_mail(rig.clock, id="Q2")]]
    await rig.deliverer.run(rig.store.stop)
    await rig.deliverer.drain(1.0)
    assert [SENT, SENT.replace("Q1", "Q2")] == sorted(rig.store.log)


async def test_ses_mail_the_spool_cannot_set_aside_is_delivered_not_left_in_flight() -> None:
    """The spool fails to set the second mail aside (disk full): it is delivered in its
    slot, as before the lane, rather than left `inflight` until the next start."""
    rig = two_slots(Rig(failures=1))  # the first write is the park
    rig.store.batches = [[make_mail(rig.clock, id="Q1"), make_mail(rig.clock, id="Q2")]]
    await rig.deliverer.run(rig.store.stop)
    await rig.deliverer.drain(1.0)
    assert [
        "sent Q1 moodle via ses: SES accepted ses_id=ses-1",
        "sent Q2 moodle via ses: SES accepted ses_id=ses-1",
    ] == sorted(rig.store.log)
