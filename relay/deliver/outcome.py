"""A delivery's outcome, written on its spool row: sent, deferred on the retry schedule, or
failed with a DSN to the sender. Each is counted and logged as one line.

    Deliverer (loop) -> Outcomes.sent / deferred / fail / defer_or_fail / upstream_answer
                          -> spool row (retried while the spool cannot commit)
                          -> relay_deliveries_total{route,outcome} and one log line

A send that succeeded must not be mistaken for a failed one because the bookkeeping
failed: `record` retries a write until it commits. If the process stops first, the row
stays `inflight` and is delivered again after restart (at least once).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from relay import logs, metrics
from relay.deliver import dsn
from relay.deliver.report import Failure
from relay.errors import SpoolError
from relay.mail import Mail
from relay.rules import Decision, Route
from relay.settings import Settings
from relay.spool import Notice

log = logging.getLogger("relay.deliver")

RECORD_BACKOFF_MAX = 30.0  # seconds between tries to record an outcome on a full spool


class Writes(Protocol):
    """The spool's outcome writes."""

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
    ) -> None: ...
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
    ) -> None: ...
    async def fail(
        self,
        queue_id: str,
        *,
        rule: str | None,
        route: str,
        reply: str,
        fallback_reason: str | None = None,
        notice: Notice | None = None,
    ) -> None: ...
    async def event(self, queue_id: str, event: str, detail: str) -> None: ...


class UpstreamAnswer(Protocol):
    """What the original host answered, recipient by recipient."""

    @property
    def accepted(self) -> tuple[str, ...]: ...
    @property
    def temporary(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def permanent(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def reply(self) -> str: ...


class Outcomes:
    """Records outcomes for the delivery loop. `settings` is called at each outcome: a reload
    swaps the loop's settings (retry schedule, DSN sender) while deliveries are in flight."""

    def __init__(
        self,
        *,
        spool: Writes,
        settings: Callable[[], Settings],
        wall_clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[object]],
    ) -> None:
        self.spool = spool
        self._settings = settings
        self._wall_clock = wall_clock
        self._sleep = sleep

    async def record(self, write: Callable[..., Awaitable[None]], *args: Any, **kw: Any) -> None:
        """Write to the spool, retrying with backoff while it cannot commit (disk full)."""
        delay = 0.5
        while True:
            try:
                await write(*args, **kw)
                return
            except SpoolError as exc:
                logs.event(
                    log,
                    "record_failed",
                    level=logging.WARNING,
                    id=args[0] if args else "?",
                    retry_in=delay,
                    error=str(exc),
                )
                await self._sleep(delay)
                delay = min(delay * 2, RECORD_BACKOFF_MAX)

    async def sent(
        self,
        mail: Mail,
        decision: Decision,
        route: Route,
        reply: str,
        *,
        ses_message_id: str | None = None,
        reason: str | None = None,
        refused: Sequence[Failure] = (),
    ) -> None:
        """Sent; `refused`: recipients the host refused for good (a partial send), in a DSN."""
        await self.record(
            self.spool.sent,
            mail.id,
            rule=decision.rule,
            route=route.value,
            reply=reply,
            ses_message_id=ses_message_id,
            fallback_reason=reason,
            notice=self._notice(mail, refused),
        )
        fields: dict[str, object] = {"ses_id": ses_message_id} if ses_message_id else {}
        if route is Route.UPSTREAM:
            fields["reply"] = reply
        if reason:
            fields["fallback"] = reason
        log_outcome("sent", mail, decision, route, **fields)

    async def deferred(
        self, mail: Mail, decision: Decision, route: Route, reply: str, *, delay: float
    ) -> None:
        """Deferred for `delay` seconds, whatever the retry schedule says (SES's own backoff)."""
        await self.record(
            self.spool.defer,
            mail.id,
            due_at=self._wall_clock() + delay,
            rule=decision.rule,
            route=route.value,
            reply=reply,
        )
        log_outcome("deferred", mail, decision, route, retry_in=round(delay, 1), reply=reply)

    async def fail(
        self,
        mail: Mail,
        decision: Decision | None,
        route: Route,
        reply: str,
        failures: Sequence[Failure],
        *,
        reason: str | None = None,
        why: str | None = None,
    ) -> None:
        """Failed for good: a DSN to the sender for `failures`; `why` is logged (max_age)."""
        await self.record(
            self.spool.fail,
            mail.id,
            rule=decision.rule if decision else None,
            route=route.value,
            reply=reply,
            fallback_reason=reason,
            recipients=mail.recipients,
            notice=self._notice(mail, failures),
        )
        fields = {"reason": why} if why else {}
        if unsaid := dsn.none_because(mail, self._settings()):
            fields["dsn"] = unsaid  # the sender hears nothing: this line is all there is
        log_outcome("failed", mail, decision, route, **fields, reply=reply)

    async def defer_or_fail(
        self,
        mail: Mail,
        decision: Decision | None,
        route: Route,
        reply: str,
        reason: str | None,
        *,
        refused: Sequence[Failure] = (),
        replies: Mapping[str, str] | None = None,
        status: str = "",
    ) -> None:
        """Defer on the retry schedule, or fail past `retry.max_age`; `refused`: recipients
        already refused for good (a partial send), in the DSN either way. `replies`: what
        the host said to each recipient, when it answered each; `status`: the RFC 3463 code
        when `reply` is relay's words (4.4.1: the host did not answer)."""
        settings = self._settings()
        age = self._wall_clock() - mail.since
        retry = settings.retry
        if replies:  # each recipient its own reply in a DSN, as Postfix reports them
            pending = [dsn.refused(settings, r, replies.get(r, reply)) for r in mail.recipients]
        else:
            pending = [Failure(recipient=r, reply=reply, status=status) for r in mail.recipients]
        if age >= retry.max_age:
            note = f"gave up after {age:.0f}s (retry.max_age)"
            expired = [replace(f, note=note) for f in pending]
            failures = [*refused, *expired]
            reply = f"{note}: {reply}"
            await self.fail(mail, decision, route, reply, failures, reason=reason, why="max_age")
            return
        delay = retry.step(mail.attempts, age)
        await self.record(
            self.spool.defer,
            mail.id,
            due_at=self._wall_clock() + delay,
            rule=decision.rule if decision else None,
            route=route.value,
            reply=reply,
            fallback_reason=reason,
            recipients=mail.recipients,
            notice=self._notice(mail, refused) or self._warning(mail, pending),
        )
        log_outcome("deferred", mail, decision, route, retry_in=delay, reply=reply)

    async def upstream_answer(
        self, mail: Mail, decision: Decision, answer: UpstreamAnswer, reason: str | None
    ) -> None:
        """What the original host answered for each recipient: all accepted -> sent; some
        refused for good -> sent, with a DSN for those; some refused for now -> those
        deferred; none accepted -> failed."""
        refused = [self.refused(rcpt, reply) for rcpt, reply in answer.permanent]
        if answer.temporary:
            remaining = [rcpt for rcpt, _ in answer.temporary]
            replies = "; ".join(f"{r}: {reply}" for r, reply in answer.temporary)
            if answer.accepted or answer.permanent:
                await self.record(self.spool.event, mail.id, "partial", _summary(answer))
            await self.defer_or_fail(
                replace(mail, recipients=tuple(remaining)),
                decision,
                Route.UPSTREAM,
                replies,
                reason,
                refused=refused,
                replies=dict(answer.temporary),
            )
            return
        if not answer.accepted:
            await self.fail(
                mail, decision, Route.UPSTREAM, _summary(answer), refused, reason=reason
            )
            return
        if answer.permanent:
            await self.record(self.spool.event, mail.id, "partial", _summary(answer))
        await self.sent(
            mail, decision, Route.UPSTREAM, answer.reply, reason=reason, refused=refused
        )

    def refused(self, recipient: str, reply: str, *, status: str = "") -> Failure:
        """One recipient refused for good, as the DSN reports it."""
        return dsn.refused(self._settings(), recipient, reply, status=status)

    def _notice(self, mail: Mail, failures: Sequence[Failure]) -> Notice | None:
        """The DSN for `failures`, if one is due. One that cannot be built (a bug) is logged
        and left out: the outcome must still be recorded, or the delivery loop defers the
        whole mail and the recipients the host already took get it again at every retry."""
        try:
            return dsn.for_outcome(mail, failures, self._settings())
        except Exception:
            log.exception("event=dsn_bug id=%s", mail.id)
            return None

    def _warning(self, mail: Mail, delayed: Sequence[Failure]) -> Notice | None:
        """The "still trying" DSN, if one is due; as `_notice`, left out if it cannot be built
        (a `retry.max_age` past the year 9999 cannot be dated), so the deferral is recorded."""
        try:
            return dsn.delay_warning(mail, delayed, self._settings())
        except Exception:
            log.exception("event=dsn_bug id=%s", mail.id)
            return None


def log_outcome(
    outcome: str, mail: Mail, decision: Decision | None, route: Route, **fields: object
) -> None:
    """Count and log one delivery outcome: one line with id, Message-ID, rule, route, and
    why the rules chose that route."""
    metrics.DELIVERIES.labels(route.value, outcome).inc()
    level = logging.WARNING if outcome == "failed" else logging.INFO
    if decision is not None and decision.reasons:
        fields["reasons"] = "; ".join(decision.reasons)
    logs.event(
        log,
        outcome,
        level=level,
        id=mail.id,
        message_id=mail.message_id,
        rule=decision.rule if decision else None,
        route=route.value,
        **fields,
    )


def _summary(answer: UpstreamAnswer) -> str:
    parts = [f"accepted {', '.join(answer.accepted)}"] if answer.accepted else []
    parts += [f"{rcpt}: {reply}" for rcpt, reply in (*answer.permanent, *answer.temporary)]
    return "; ".join(parts) or answer.reply
