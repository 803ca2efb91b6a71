"""The delivery loop: claim due messages, classify, send, fall back, record.

    spool.claim() -> rules.classify() -> route ses?  -> pace -> SES SendRawEmail
                                            |  failure: temporary -> retry SES until
                                            |  fallback_after; permanent / account-wide
                                            v  (circuit) -> upstream at once
                                          upstream -> sent / deferred / failed (dead letter)

Every outcome is recorded on the message's spool row. Nothing here raises into
the loop: a bug in one delivery leaves that message deferred, never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from relay import metrics
from relay.circuit import Circuit, CircuitState
from relay.errors import (
    AccountFailure,
    PermanentFailure,
    SpoolError,
    TemporaryFailure,
    Throttled,
)
from relay.mail import Mail
from relay.rules import Decision, Route, RuleSet
from relay.settings import Mode, Settings

log = logging.getLogger("relay.deliver")

SES_BACKOFF_MAX = 60.0  # seconds between SES retries of one message before fallback_after
IDLE_POLL = 1.0  # seconds; deferred mail becomes due without a wake-up
RECORD_BACKOFF_MAX = 30.0  # seconds between tries to record an outcome on a full spool


class SesSender(Protocol):
    async def send(
        self, mail: Mail, *, configuration_set: str | None, tags: Sequence[tuple[str, str]]
    ) -> str: ...


class UpstreamResultLike(Protocol):
    @property
    def accepted(self) -> tuple[str, ...]: ...
    @property
    def temporary(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def permanent(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def reply(self) -> str: ...


class UpstreamSender(Protocol):
    async def send(self, mail: Mail) -> UpstreamResultLike: ...


class Pacer(Protocol):
    @property
    def rate(self) -> float: ...
    async def acquire(self, recipients: int) -> None: ...
    def throttled(self) -> None: ...
    def succeeded(self, recipients: int = 1) -> None: ...
    def budget_left(self, recipients: int) -> bool: ...
    def spend(self, recipients: int) -> None: ...


class Store(Protocol):
    async def claim(self, limit: int) -> list[Mail]: ...
    async def sent(self, queue_id: str, *, rule: str | None, route: str, reply: str,
                   ses_message_id: str | None = None,
                   fallback_reason: str | None = None) -> None: ...  # fmt: skip
    async def defer(self, queue_id: str, *, due_at: float, rule: str | None, route: str,
                    reply: str, fallback_reason: str | None = None,
                    recipients: Sequence[str] | None = None) -> None: ...  # fmt: skip
    async def fail(self, queue_id: str, *, rule: str | None, route: str, reply: str,
                   fallback_reason: str | None = None) -> None: ...  # fmt: skip
    async def event(self, queue_id: str, event: str, detail: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Fallback:
    """Why an SES-routed message goes upstream; `reason` is a short metric label."""

    reason: str
    detail: str


class Deliverer:
    """Runs delivery tasks until told to stop; `rules` may be swapped at any time (reload)."""

    def __init__(
        self,
        *,
        settings: Settings,
        spool: Store,
        rules: RuleSet,
        upstream: UpstreamSender,
        ses: SesSender | None,
        pace: Pacer | None,
        circuit: Circuit,
        wakeup: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.rules = rules
        self.upstream = upstream
        self.ses = ses
        self.pace = pace
        self.circuit = circuit
        self.wakeup = wakeup
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and deliver until `stop` is set; `drain()` then lets in-flight sends finish."""
        while not stop.is_set():
            free = self.settings.deliverers - len(self._tasks)
            if free <= 0:
                # Done callbacks run in order: _tasks.discard has run when wait() returns.
                await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                continue
            self.wakeup.clear()  # before claiming, so a commit during the claim is not missed
            try:
                batch = await self.spool.claim(free)
            except SpoolError as exc:  # disk full, I/O error: keep the loop, try again later
                log.warning("event=claim_failed error=%r", str(exc))
                await _first(stop, seconds=IDLE_POLL)
                continue
            for mail in batch:
                task = asyncio.create_task(self._guarded(mail), name=f"deliver-{mail.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(batch) < free:
                await _first(self.wakeup, stop, seconds=IDLE_POLL)

    async def drain(self, deadline: float) -> int:
        """Wait for in-flight deliveries up to `deadline` seconds; return how many were left.

        Messages still in flight stay `inflight` on disk and are reclaimed at the next start.
        """
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=deadline)
            for task in pending:
                task.cancel()
        return len(pending)

    async def _record(self, write: Callable[..., Awaitable[None]], *args: Any, **kw: Any) -> None:
        """Write an outcome to the spool, retrying while it cannot commit (disk full).

        A send that succeeded must not be mistaken for a failed one because the
        bookkeeping failed: the write is retried until it commits. If the process
        stops first, the row stays `inflight` and is delivered again after restart
        (at least once).
        """
        delay = 0.5
        while True:
            try:
                await write(*args, **kw)
                return
            except SpoolError as exc:
                log.warning("event=record_failed id=%s retry_in=%.1fs error=%r",
                            args[0] if args else "?", delay, str(exc))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_BACKOFF_MAX)

    async def _guarded(self, mail: Mail) -> None:
        try:
            await self.deliver(mail)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never lose a message to a bug: defer it, keep the loop
            log.exception("event=deliver_bug id=%s", mail.id)
            await self._defer_or_fail(mail, None, Route.UPSTREAM, f"internal error: {exc!r}", None)

    async def deliver(self, mail: Mail) -> None:
        """One attempt for one claimed message; records the outcome on its row."""
        decision = self.rules.classify(mail)
        metrics.CLASSIFIED.labels(decision.rule or "(default)", decision.route.value).inc()
        fallback: Fallback | None = None
        if decision.route is Route.SES:
            blocked = self._ses_blocked(mail)
            if blocked is None:
                fallback = await self._try_ses(mail, decision)
                if fallback is None:
                    return  # sent, or deferred for another SES try
            else:
                fallback = blocked
            metrics.FALLBACKS.labels(fallback.reason).inc()
        await self._upstream(mail, decision, fallback)

    def _ses_blocked(self, mail: Mail) -> Fallback | None:
        if self.settings.mode is Mode.SHADOW:
            return Fallback(
                reason="shadow", detail="shadow mode: classified for SES, sent upstream"
            )
        if self.ses is None or not self.settings.ses.enabled:
            return Fallback(reason="disabled", detail="ses.enabled is false")
        if not mail.sender:
            return Fallback(reason="null_sender", detail="SES cannot send with a null sender <>")
        if self.pace is not None and not self.pace.budget_left(len(mail.recipients)):
            return Fallback(reason="daily_quota", detail="SES daily sending quota spent")
        if not self.circuit.allow():
            return Fallback(
                reason="circuit_open", detail=f"SES circuit open: {self.circuit.reason}"
            )
        return None

    async def _try_ses(self, mail: Mail, decision: Decision) -> Fallback | None:
        """Send through SES; None when the message is settled (sent or deferred for SES)."""
        assert self.ses is not None
        rule = decision.rule or "default"
        tags = (("rule", rule), *decision.tags)
        config_set = decision.configuration_set or self.settings.ses.configuration_set
        probe = self.circuit.state is CircuitState.PROBING  # allow() just let this one through
        if self.pace is not None:
            await self.pace.acquire(len(mail.recipients))
        started = time.monotonic()
        try:
            message_id = await self.ses.send(mail, configuration_set=config_set, tags=tags)
        except AccountFailure as exc:
            if self.circuit.failed(str(exc)):
                code = exc.reply.split(":", 1)[0].strip() or type(exc).__name__
                metrics.CIRCUIT_OPENINGS.labels(code[:64]).inc()
            metrics.CIRCUIT_OPEN.set(1)
            return Fallback(reason="account", detail=f"SES account-wide failure: {exc.reply}")
        except PermanentFailure as exc:
            self._ses_reached()
            return Fallback(reason="rejected", detail=f"SES refused the message: {exc.reply}")
        except TemporaryFailure as exc:
            if self.circuit.state is CircuitState.PROBING:
                self.circuit.failed(f"probe failed: {exc.reply}")
            if isinstance(exc, Throttled) and self.pace is not None:
                metrics.SES_THROTTLES.inc()
                self.pace.throttled()
                metrics.PACE.set(self.pace.rate)
            age = time.time() - mail.received_at
            if age >= self.settings.ses.fallback_after:
                return Fallback(
                    reason="temporary",
                    detail=f"SES failing for {age:.0f}s (fallback_after): {exc.reply}",
                )
            delay = 1.0 if isinstance(exc, Throttled) else min(2.0**mail.attempts, SES_BACKOFF_MAX)
            await self._record(self.spool.defer,
                mail.id, due_at=time.time() + delay, rule=decision.rule, route=Route.SES.value,
                reply=exc.reply,
            )  # fmt: skip
            metrics.DELIVERIES.labels("ses", "deferred").inc()
            log.info("event=deferred id=%s route=ses retry_in=%.0fs reply=%r",
                     mail.id, delay, exc.reply)  # fmt: skip
            return None
        except BaseException:
            if probe:  # no verdict (a bug, or cancelled): the next mail probes, not never
                self.circuit.probe_aborted()
            raise
        finally:
            metrics.SES_LATENCY.observe(time.monotonic() - started)
        self._ses_reached()
        if self.pace is not None:
            self.pace.succeeded(len(mail.recipients))
            self.pace.spend(len(mail.recipients))
            metrics.PACE.set(self.pace.rate)
        await self._record(self.spool.sent,
            mail.id, rule=decision.rule, route=Route.SES.value, reply="SES accepted",
            ses_message_id=message_id,
        )  # fmt: skip
        metrics.DELIVERIES.labels("ses", "sent").inc()
        log.info("event=sent id=%s message_id=%s rule=%s route=ses ses_id=%s",
                 mail.id, mail.message_id, decision.rule, message_id)  # fmt: skip
        return None

    def _ses_reached(self) -> None:
        self.circuit.succeeded()
        metrics.CIRCUIT_OPEN.set(0 if self.circuit.state is CircuitState.CLOSED else 1)

    async def _upstream(self, mail: Mail, decision: Decision, fallback: Fallback | None) -> None:
        reason = fallback.detail if fallback else None
        if fallback is not None:
            await self._record(self.spool.event, mail.id, "fallback", fallback.detail)
        try:
            result = await self.upstream.send(mail)
        except PermanentFailure as exc:
            await self._fail(mail, decision, exc.reply, reason)
            return
        except TemporaryFailure as exc:
            await self._defer_or_fail(mail, decision, Route.UPSTREAM, exc.reply, reason)
            return
        if result.temporary:
            remaining = [rcpt for rcpt, _ in result.temporary]
            replies = "; ".join(f"{r}: {reply}" for r, reply in result.temporary)
            if result.accepted or result.permanent:
                await self._record(self.spool.event, mail.id, "partial", _summary(result))
            await self._defer_or_fail(
                replace(mail, recipients=tuple(remaining)), decision, Route.UPSTREAM, replies,
                reason,
            )  # fmt: skip
            return
        if not result.accepted:
            await self._fail(mail, decision, _summary(result), reason)
            return
        if result.permanent:
            await self._record(self.spool.event, mail.id, "partial", _summary(result))
        await self._record(self.spool.sent,
            mail.id, rule=decision.rule, route=Route.UPSTREAM.value, reply=result.reply,
            fallback_reason=reason,
        )  # fmt: skip
        metrics.DELIVERIES.labels("upstream", "sent").inc()
        log.info("event=sent id=%s message_id=%s rule=%s route=upstream reply=%r%s",
                 mail.id, mail.message_id, decision.rule, result.reply,
                 f" fallback={reason!r}" if reason else "")  # fmt: skip

    async def _fail(self, mail: Mail, decision: Decision, reply: str, reason: str | None) -> None:
        await self._record(self.spool.fail,
            mail.id, rule=decision.rule, route=Route.UPSTREAM.value, reply=reply,
            fallback_reason=reason,
        )  # fmt: skip
        metrics.DELIVERIES.labels("upstream", "failed").inc()
        log.warning("event=failed id=%s message_id=%s rule=%s route=upstream reply=%r",
                    mail.id, mail.message_id, decision.rule, reply)  # fmt: skip

    async def _defer_or_fail(
        self, mail: Mail, decision: Decision | None, route: Route, reply: str, reason: str | None
    ) -> None:
        rule = decision.rule if decision else None
        age = time.time() - mail.received_at
        retry = self.settings.retry
        if age >= retry.max_age:
            await self._record(self.spool.fail,
                mail.id, rule=rule, route=route.value,
                reply=f"gave up after {age:.0f}s (retry.max_age): {reply}", fallback_reason=reason,
            )  # fmt: skip
            metrics.DELIVERIES.labels(route.value, "failed").inc()
            log.warning(
                "event=failed id=%s route=%s reason=max_age reply=%r", mail.id, route, reply
            )
            return
        delay = retry.schedule[min(max(mail.attempts, 1), len(retry.schedule)) - 1]
        await self._record(self.spool.defer,
            mail.id, due_at=time.time() + delay, rule=rule, route=route.value, reply=reply,
            fallback_reason=reason, recipients=mail.recipients,
        )  # fmt: skip
        metrics.DELIVERIES.labels(route.value, "deferred").inc()
        log.info("event=deferred id=%s route=%s retry_in=%.0fs reply=%r",
                 mail.id, route, delay, reply)  # fmt: skip


async def _first(*events: asyncio.Event, seconds: float) -> None:
    """Return when any of `events` is set, or after `seconds`."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _summary(result: UpstreamResultLike) -> str:
    parts = [f"accepted {', '.join(result.accepted)}"] if result.accepted else []
    parts += [f"{rcpt}: {reply}" for rcpt, reply in (*result.permanent, *result.temporary)]
    return "; ".join(parts) or result.reply
