"""The delivery loop: claim due messages, classify, send, fall back, record.

    spool.claim() -> rules.classify() -> route ses? -> ses.SesRoute.attempt():
                                            |   Sent / Retry (SES again later) / Fallback
                                            v
                                          upstream -> sent / deferred / failed (dead letter)

Every outcome is recorded on the message's spool row. Nothing here raises into
the loop: a bug in one delivery leaves that message deferred, never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from relay import logs, metrics
from relay.deliver import dsn
from relay.deliver.ses.client import MAX_DESTINATIONS
from relay.deliver.ses.route import Fallback, Retry, Sent, SesRoute
from relay.errors import HostUnreachable, PermanentFailure, SpoolError, TemporaryFailure
from relay.mail import Mail
from relay.rules import Decision, Route, RuleSet
from relay.runtime import wait_any
from relay.settings import Mode, Settings, Suppressed
from relay.spool import Notice, new_id

log = logging.getLogger("relay.deliver")

IDLE_POLL = 1.0  # seconds; deferred mail becomes due without a wake-up
# A claim waits until this share of the delivery slots is free (4: a quarter), so a busy
# queue is claimed in batches, not one row per transaction each time a send ends.
CLAIM_SHARE = 4
# After a failed connection to the original host, mail is deferred without trying for
# this long: a backlog against a dead host must not cost one connection per message.
UPSTREAM_DOWN_FOR = 5.0
RECORD_BACKOFF_MAX = 30.0  # seconds between tries to record an outcome on a full spool
# A DSN relay wrote goes to the original host, whatever the rules say (SES refuses `<>`).
DSN_DECISION = Decision(rule=None, route=Route.UPSTREAM, reasons=("delivery status notification",))


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
    async def close(self) -> None: ...


class Store(Protocol):
    async def claim(self, limit: int) -> list[Mail]: ...
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
    async def split(
        self, queue_id: str, *, child: str, recipients: Sequence[str], reason: str
    ) -> None: ...


class Suppressions(Protocol):
    async def reasons(self, recipients: Sequence[str]) -> dict[str, str]: ...


class Deliverer:
    """Runs delivery tasks until told to stop; `rules` may be swapped at any time (reload)."""

    def __init__(
        self,
        *,
        settings: Settings,
        spool: Store,
        rules: RuleSet,
        upstream: UpstreamSender,
        ses_route: SesRoute,
        wakeup: asyncio.Event,
        suppressions: Suppressions | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """`clock` (monotonic), `wall_clock` (the spool's due_at and received_at) and
        `sleep` (between tries to record an outcome) are injected so tests run on virtual time."""
        self.settings = settings
        self.spool = spool
        self.rules = rules
        self.upstream = upstream
        self.ses_route = ses_route
        self.wakeup = wakeup
        self.suppressions = suppressions  # None: no lookups (as `ses.suppressed: send`)
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._tasks: set[asyncio.Task[None]] = set()
        self._upstream_down_until = 0.0  # monotonic; no connection attempts before it
        self._down_reply = ""

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and deliver until `stop` is set; `drain()` then lets in-flight sends finish."""
        while not stop.is_set():
            free = self.settings.deliverers - len(self._tasks)
            if free < max(1, self.settings.deliverers // CLAIM_SHARE):
                # Done callbacks run in order: _tasks.discard has run when wait() returns.
                await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                continue
            self.wakeup.clear()  # before claiming, so a commit during the claim is not missed
            try:
                batch = await self.spool.claim(free)
            except SpoolError as exc:  # disk full, I/O error: keep the loop, try again later
                logs.event(log, "claim_failed", level=logging.WARNING, error=str(exc))
                await wait_any(stop, seconds=IDLE_POLL)
                continue
            for mail in batch:
                task = asyncio.create_task(self._guarded(mail), name=f"deliver-{mail.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(batch) < free:
                await wait_any(self.wakeup, stop, seconds=IDLE_POLL)

    async def drain(self, deadline: float) -> int:
        """Wait for in-flight deliveries up to `deadline` seconds, then QUIT the upstream
        connections kept open between mails; return how many deliveries were left.

        Messages still in flight stay `inflight` on disk and are reclaimed at the next start.
        """
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=deadline)
            for task in pending:
                task.cancel()
        await self.upstream.close()
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
        decision = self.rules.classify(mail) if not mail.reports_on else DSN_DECISION
        metrics.CLASSIFIED.labels(decision.rule or "(default)", decision.route.value).inc()
        # No line of its own: the outcome's line names the rule, the route and the reasons.
        fallback: Fallback | None = None
        if decision.route is Route.SES and self._ses_may_try(mail):
            mail = await self._batch(mail)
        if decision.route is Route.SES:
            checked = await self._suppression(mail, decision)
            if checked is None:
                return  # all on the suppression list, failed (ses.suppressed: bounce)
            mail, fallback = checked
        if decision.route is Route.SES and fallback is None:
            verdict = await self.ses_route.attempt(mail, decision, self.settings)
            if isinstance(verdict, Sent):
                await self._record(
                    self.spool.sent,
                    mail.id,
                    rule=decision.rule,
                    route=Route.SES.value,
                    reply="SES accepted",
                    ses_message_id=verdict.message_id,
                )
                _outcome("sent", mail, decision, Route.SES, ses_id=verdict.message_id)
                return
            if isinstance(verdict, Retry):
                await self._record(
                    self.spool.defer,
                    mail.id,
                    due_at=self._wall_clock() + verdict.delay,
                    rule=decision.rule,
                    route=Route.SES.value,
                    reply=verdict.reply,
                )
                _outcome(
                    "deferred",
                    mail,
                    decision,
                    Route.SES,
                    retry_in=round(verdict.delay, 1),
                    reply=verdict.reply,
                )
                return
            fallback = verdict
        if fallback is not None:
            metrics.FALLBACKS.labels(fallback.reason).inc()
            logs.event(
                log,
                "fallback",
                id=mail.id,
                message_id=mail.message_id,
                rule=decision.rule,
                reason=fallback.reason,
                detail=fallback.detail,
            )
        await self._upstream(mail, decision, fallback)

    def _ses_may_try(self, mail: Mail) -> bool:
        """False when SES is out of the question for this mail whatever else happens."""
        settings = self.settings
        live = settings.mode is Mode.LIVE and settings.ses.enabled
        return live and self.ses_route.ses is not None and bool(mail.sender)

    async def _batch(self, mail: Mail) -> Mail:
        """SES takes at most MAX_DESTINATIONS recipients per call: the recipients past the
        first batch move to rows of their own (the spool's split, as for suppressed
        recipients), so each batch is paced, sent and recorded on its own, and a batch SES
        refuses goes upstream alone. Each row is classified again when it is claimed."""
        size = MAX_DESTINATIONS
        if len(mail.recipients) <= size:
            return mail
        batches = [mail.recipients[i : i + size] for i in range(0, len(mail.recipients), size)]
        for n, batch in enumerate(batches[1:], start=2):
            reason = f"SES takes at most {size} recipients per call: batch {n} of {len(batches)}"
            await self._record(
                self.spool.split, mail.id, child=new_id(), recipients=list(batch), reason=reason
            )
        return replace(mail, recipients=batches[0])

    async def _suppression(
        self, mail: Mail, decision: Decision
    ) -> tuple[Mail, Fallback | None] | None:
        """Recipients on the SES account suppression list (SES would drop them silently):
        some -> split off into a mail of their own (it comes back here, all suppressed);
        all -> upstream (`ses.suppressed: upstream`), or failed with a DSN (`bounce`).
        None when the outcome is recorded already."""
        ses = self.settings.ses
        if self.suppressions is None or ses.suppressed is Suppressed.SEND or not ses.enabled:
            return mail, None
        if self.settings.mode is not Mode.LIVE or not mail.sender:
            return mail, None  # SES is not tried anyway
        held = await self.suppressions.reasons(mail.recipients)
        if not held:
            return mail, None
        listed = ", ".join(f"{rcpt} ({why})" for rcpt, why in held.items())
        detail = f"on the SES account suppression list: {listed}"
        metrics.SUPPRESSED.labels(ses.suppressed.value).inc(len(held))
        if len(held) < len(mail.recipients):
            rest = tuple(r for r in mail.recipients if r not in held)
            await self._record(
                self.spool.split, mail.id, child=new_id(), recipients=list(held), reason=detail
            )
            return replace(mail, recipients=rest), None
        if ses.suppressed is Suppressed.UPSTREAM:
            return mail, Fallback(reason="suppressed", detail=detail)
        failures = [
            dsn.Failure(
                recipient=rcpt,
                reply=f"550 5.1.1 <{rcpt}>: on the SES account suppression list ({why})",
            )
            for rcpt, why in held.items()
        ]
        reply = f"550 5.1.1 {detail}"
        await self._record(
            self.spool.fail,
            mail.id,
            rule=decision.rule,
            route=Route.SES.value,
            reply=reply,
            notice=self._notice(mail, failures),
        )
        _outcome("failed", mail, decision, Route.SES, reply=reply)
        return None

    async def _upstream(self, mail: Mail, decision: Decision, fallback: Fallback | None) -> None:
        reason = fallback.detail if fallback else None
        if fallback is not None:
            await self._record(self.spool.event, mail.id, "fallback", fallback.detail)
        if self._clock() < self._upstream_down_until:  # like Postfix's dead-host cache
            reply = f"not tried, the original host was unreachable moments ago: {self._down_reply}"
            await self._defer_or_fail(mail, decision, Route.UPSTREAM, reply, reason)
            return
        try:
            result = await self.upstream.send(mail)
        except PermanentFailure as exc:
            failures = [self._refused(rcpt, exc.reply) for rcpt in mail.recipients]
            await self._fail(mail, decision, exc.reply, reason, failures)
            return
        except TemporaryFailure as exc:
            if isinstance(exc, HostUnreachable):
                self._upstream_down_until = self._clock() + UPSTREAM_DOWN_FOR
                self._down_reply = exc.reply
            await self._defer_or_fail(mail, decision, Route.UPSTREAM, exc.reply, reason)
            return
        refused = [self._refused(rcpt, reply) for rcpt, reply in result.permanent]
        if result.temporary:
            remaining = [rcpt for rcpt, _ in result.temporary]
            replies = "; ".join(f"{r}: {reply}" for r, reply in result.temporary)
            if result.accepted or result.permanent:
                await self._record(self.spool.event, mail.id, "partial", _summary(result))
            await self._defer_or_fail(
                replace(mail, recipients=tuple(remaining)),
                decision,
                Route.UPSTREAM,
                replies,
                reason,
                refused=refused,
            )
            return
        if not result.accepted:
            await self._fail(mail, decision, _summary(result), reason, refused)
            return
        if result.permanent:
            await self._record(self.spool.event, mail.id, "partial", _summary(result))
        await self._record(
            self.spool.sent,
            mail.id,
            rule=decision.rule,
            route=Route.UPSTREAM.value,
            reply=result.reply,
            fallback_reason=reason,
            notice=self._notice(mail, refused),
        )
        _outcome(
            "sent",
            mail,
            decision,
            Route.UPSTREAM,
            reply=result.reply,
            **({"fallback": reason} if reason else {}),
        )

    def _refused(self, recipient: str, reply: str) -> dsn.Failure:
        return dsn.refused(self.settings, recipient, reply)

    def _notice(self, mail: Mail, failures: Sequence[dsn.Failure]) -> Notice | None:
        return dsn.for_outcome(mail, failures, self.settings)

    async def _fail(
        self,
        mail: Mail,
        decision: Decision,
        reply: str,
        reason: str | None,
        failures: Sequence[dsn.Failure],
    ) -> None:
        await self._record(
            self.spool.fail,
            mail.id,
            rule=decision.rule,
            route=Route.UPSTREAM.value,
            reply=reply,
            fallback_reason=reason,
            notice=self._notice(mail, failures),
        )
        _outcome("failed", mail, decision, Route.UPSTREAM, reply=reply)

    async def _defer_or_fail(
        self,
        mail: Mail,
        decision: Decision | None,
        route: Route,
        reply: str,
        reason: str | None,
        *,
        refused: Sequence[dsn.Failure] = (),
    ) -> None:
        """Defer on the retry schedule, or fail past `retry.max_age`; `refused`: recipients
        already refused for good (a partial send), in the DSN either way."""
        rule = decision.rule if decision else None
        age = self._wall_clock() - mail.received_at
        retry = self.settings.retry
        if age >= retry.max_age:
            reply = f"gave up after {age:.0f}s (retry.max_age): {reply}"
            expired = [dsn.Failure(recipient=r, reply=reply) for r in mail.recipients]
            await self._record(
                self.spool.fail,
                mail.id,
                rule=rule,
                route=route.value,
                reply=reply,
                fallback_reason=reason,
                notice=self._notice(mail, [*refused, *expired]),
            )
            _outcome("failed", mail, decision, route, reason="max_age", reply=reply)
            return
        delay = retry.schedule[min(max(mail.attempts, 1), len(retry.schedule)) - 1]
        await self._record(
            self.spool.defer,
            mail.id,
            due_at=self._wall_clock() + delay,
            rule=rule,
            route=route.value,
            reply=reply,
            fallback_reason=reason,
            recipients=mail.recipients,
            notice=self._notice(mail, refused) or dsn.delay_warning(mail, reply, self.settings),
        )
        _outcome("deferred", mail, decision, route, retry_in=delay, reply=reply)


def _outcome(
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


def _summary(result: UpstreamResultLike) -> str:
    parts = [f"accepted {', '.join(result.accepted)}"] if result.accepted else []
    parts += [f"{rcpt}: {reply}" for rcpt, reply in (*result.permanent, *result.temporary)]
    return "; ".join(parts) or result.reply
