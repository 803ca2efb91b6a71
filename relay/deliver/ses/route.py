"""The SES leg of delivery: may this message try SES, and what became of the try.

`deliver.Deliverer` asks `SesRoute.attempt(mail, decision, settings)` and gets
one verdict to record:

    Sent(message_id)        SES accepted it
    Retry(delay, reply)     temporary SES failure, younger than `fallback_after`
    Fallback(reason, ...)   go upstream: blocked (shadow, disabled, no SES client, null
                            sender, daily budget, open circuit), refused, account-wide,
                            too old, or unconfirmed (SES's answer lost: it may have sent
                            it, and another SES call could send another copy)

Pacing, the circuit breakers (the account's, and one per identity or configuration set
SES refused: `scopes`) and the SES metrics live here; the spool is not touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay import metrics
from relay.deliver.ses import scopes as _scopes
from relay.deliver.ses.circuit import Circuit, CircuitState
from relay.errors import (
    AccountFailure,
    NotSent,
    PermanentFailure,
    ScopedFailure,
    TemporaryFailure,
    Throttled,
    Unconfirmed,
)
from relay.mail import Mail
from relay.rules import RULE_TAG, Decision
from relay.settings import Mode, Settings

# The fallback reason of a mail whose SES call got no answer: it stays on the row, so no
# later try of that mail (after the original host deferred it) goes to SES again.
UNCONFIRMED = "SES may have sent it, its answer never came; not SES again"
SES_BACKOFF_MAX = 60.0  # seconds between SES retries of one message before fallback_after
THROTTLE_RETRY = 1.0  # seconds: SES counts per second, so the next window is free again


class SesSender(Protocol):
    async def send(
        self,
        mail: Mail,
        *,
        configuration_set: str | None,
        tags: Sequence[tuple[str, str]],
        identity_arn: str | None = None,
    ) -> str: ...


class Pacer(Protocol):
    @property
    def rate(self) -> float: ...
    async def acquire(self, recipients: int) -> None: ...
    def throttled(self) -> None: ...
    def succeeded(self, recipients: int = 1) -> None: ...
    def budget_left(self, recipients: int) -> bool: ...
    def spend(self, recipients: int) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    message_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    delay: float
    reply: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Fallback:
    """Why an SES-routed message goes upstream; `reason` is a short metric label."""

    reason: str
    detail: str


Verdict = Sent | Retry | Fallback


class SesRoute:
    def __init__(
        self,
        *,
        ses: SesSender | None,
        pace: Pacer | None,
        circuit: Circuit,
        scopes: _scopes.Scopes | None = None,
        wall_clock: Callable[[], float] = time.time,
        unusable: str = "",
    ) -> None:
        """`wall_clock` tells a message's age (for `fallback_after`); injected for tests.
        `scopes` None: circuits per identity with the account circuit's cooldown and clock.
        `unusable`: why no SES client could be made although SES is enabled."""
        self.ses = ses
        self.unusable = unusable
        self.pace = pace
        self.circuit = circuit
        self.scopes = scopes or _scopes.Scopes(circuit.cooldown, clock=circuit.clock)
        self._wall_clock = wall_clock

    def blocked(
        self, mail: Mail, settings: Settings, scopes: Sequence[str] = ()
    ) -> Fallback | None:
        """Why this message may not try SES now, or None when it may."""
        if settings.mode is Mode.SHADOW:
            return Fallback(
                reason="shadow", detail="shadow mode: classified for SES, sent upstream"
            )
        if self.ses is None and self.unusable and settings.ses.enabled:
            detail = f"no SES client, {self.unusable}; restart relay once that is mended"
            return Fallback(reason="unusable", detail=detail)
        if self.ses is None and settings.ses.enabled:  # turned on by a reload: no client yet
            detail = "ses.enabled was turned on by a reload: restart relay to use SES"
            return Fallback(reason="needs_restart", detail=detail)
        if self.ses is None or not settings.ses.enabled:
            return Fallback(reason="disabled", detail="ses.enabled is false")
        if not mail.sender:
            return Fallback(reason="null_sender", detail="SES cannot send with a null sender <>")
        if self.pace is not None and not self.pace.budget_left(len(mail.recipients)):
            return Fallback(reason="daily_quota", detail="SES daily sending quota spent")
        waiting = self.scopes.waiting(scopes)
        if waiting is not None:
            return Fallback(
                reason="identity",
                detail=f"SES circuit open for {waiting.scope}: {waiting.reason}",
            )
        if not self.circuit.allow():  # last: while open, it lets exactly one probe through
            return Fallback(
                reason="circuit_open", detail=f"SES circuit open: {self.circuit.reason}"
            )
        return None

    async def attempt(self, mail: Mail, decision: Decision, settings: Settings) -> Verdict:
        """Try SES once (paced) and say what to record."""
        config_set = decision.configuration_set or settings.ses.configuration_set
        source = settings.ses.source or mail.sender
        scopes = _scopes.keys(mail, source=source, configuration_set=config_set)
        blocked = self.blocked(mail, settings, scopes)
        if blocked is not None:
            return blocked
        assert self.ses is not None
        tags = ((RULE_TAG, decision.rule or "default"), *decision.tags)
        probe = self.circuit.state is CircuitState.PROBING  # allow() just let this one through
        probes = self.scopes.begin(scopes)  # this mail probes for these scopes
        try:
            verdict, failed = await self._send(mail, decision, settings, tags, config_set, probe)
        except BaseException:
            self.scopes.aborted(probes)
            raise
        if isinstance(verdict, Sent) or (
            isinstance(verdict, Fallback) and verdict.reason == "rejected"
        ):
            self.scopes.succeeded(probes)  # SES took the identity; it refused something else
        else:  # a scope that failed again is open again; the others learnt nothing
            self.scopes.aborted(p for p in probes if p != failed)
        return verdict

    async def _send(
        self,
        mail: Mail,
        decision: Decision,
        settings: Settings,
        tags: Sequence[tuple[str, str]],
        config_set: str | None,
        probe: bool,
    ) -> tuple[Verdict, str | None]:
        """One paced call; the verdict and the scope SES refused (if it did)."""
        assert self.ses is not None
        started: float | None = None  # set when the call to SES starts (after pacing)
        try:
            if self.pace is not None:  # inside the try: a probe cancelled here is aborted too
                await self.pace.acquire(len(mail.recipients))
            started = time.monotonic()
            message_id = await self.ses.send(
                mail, configuration_set=config_set, tags=tags, identity_arn=decision.identity_arn
            )
        except AccountFailure as exc:
            if self.circuit.failed(str(exc)):
                code = exc.reply.split(":", 1)[0].strip() or type(exc).__name__
                metrics.CIRCUIT_OPENINGS.labels(code[:64]).inc()
            metrics.CIRCUIT_OPEN.set(1)
            detail = f"SES account-wide failure: {exc.reply}"
            return Fallback(reason="account", detail=detail), None
        except ScopedFailure as exc:
            self._reached()  # the account works: it answered about one identity or set
            self.scopes.failed(exc.scope, reply=exc.reply, advice=exc.advice)
            detail = f"SES cannot send for {exc.scope}: {exc.reply}"
            return Fallback(reason="identity", detail=detail), exc.scope
        except NotSent as exc:  # SES was not asked: no word on the account (nor a probe)
            if probe:
                self.circuit.probe_aborted()
            detail = f"SES cannot take the message: {exc.reply}"
            return Fallback(reason="unsendable", detail=detail), None
        except PermanentFailure as exc:
            self._reached()
            detail = f"SES refused the message: {exc.reply}"
            return Fallback(reason="rejected", detail=detail), None
        except Unconfirmed as exc:
            # Another SES call could send another copy at each try (9 before fallback_after
            # in a test); upstream once, at most one copy more, never none.
            if self.circuit.state is CircuitState.PROBING:
                self.circuit.failed(f"probe failed: {exc.reply}")
            detail = f"{UNCONFIRMED}: {exc.reply}"
            return Fallback(reason="unconfirmed", detail=detail), None
        except TemporaryFailure as exc:
            return self._temporary(mail, exc, settings), None
        except BaseException:
            if probe:  # no verdict (a bug, or cancelled): the next mail probes, not never
                self.circuit.probe_aborted()
            raise
        finally:
            if started is not None:
                metrics.SES_LATENCY.observe(time.monotonic() - started)
        self._reached()
        if self.pace is not None:
            self.pace.succeeded(len(mail.recipients))
            self.pace.spend(len(mail.recipients))
            metrics.PACE.set(self.pace.rate)
        return Sent(message_id=message_id), None

    def _temporary(self, mail: Mail, exc: TemporaryFailure, settings: Settings) -> Verdict:
        if self.circuit.state is CircuitState.PROBING:
            self.circuit.failed(f"probe failed: {exc.reply}")
        throttled = isinstance(exc, Throttled)
        if throttled and self.pace is not None:
            metrics.SES_THROTTLES.inc()
            self.pace.throttled()
            metrics.PACE.set(self.pace.rate)
        age = self._wall_clock() - mail.since
        if age >= settings.ses.fallback_after:
            return Fallback(
                reason="temporary",
                detail=f"SES failing for {age:.0f}s (fallback_after): {exc.reply}",
            )
        delay = THROTTLE_RETRY if throttled else min(2.0 ** min(mail.attempts, 16), SES_BACKOFF_MAX)
        return Retry(delay=delay, reply=exc.reply)

    def _reached(self) -> None:
        """SES answered about the message itself: the account works (closes a probe)."""
        self.circuit.succeeded()
        metrics.CIRCUIT_OPEN.set(0 if self.circuit.state is CircuitState.CLOSED else 1)
