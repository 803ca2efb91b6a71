"""The delivery loop: claim due messages, classify, send, fall back.

    spool.claim() -> rules.classify() -> route ses? -> ses.SesRoute.attempt():
                          |                 |   Sent / Retry (SES again later) / Fallback
                          |                 v
                          |               upstream -> sent / deferred / failed (dead letter)
                          +-> SES's lane full (relay.deliver.lane): spool.park(), set aside

Every outcome is recorded on the message's spool row by `outcome.Outcomes`. Nothing
here raises into the loop: a bug in one delivery leaves that message deferred, never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple, Protocol

from relay import logs, metrics
from relay.deliver.lane import Lane
from relay.deliver.outcome import Outcomes, UpstreamAnswer, Writes
from relay.deliver.report import UNREACHABLE, Failure, replied, status_of_reply
from relay.deliver.ses.client import MAX_DESTINATIONS
from relay.deliver.ses.route import UNCONFIRMED, Fallback, Retry, Sent, SesRoute
from relay.errors import (
    HostUnreachable,
    HostUnusable,
    PermanentFailure,
    SpoolError,
    TemporaryFailure,
)
from relay.mail import Mail
from relay.rules import Decision, Route, RuleSet
from relay.runtime import wait_any
from relay.settings import Mode, Settings, Suppressed
from relay.spool import new_id
from relay.spool.rows import SES_LANE

log = logging.getLogger("relay.deliver")

IDLE_POLL = 1.0  # seconds; deferred mail becomes due without a wake-up
# A claim waits until this share of the delivery slots is free (4: a quarter), so a busy
# queue is claimed in batches, not one row per transaction each time a send ends.
CLAIM_SHARE = 4
# After a failed connection to the original host, mail is deferred without trying for
# this long: a backlog against a dead host must not cost one connection per message.
UPSTREAM_DOWN_FOR = 5.0
# A DSN relay wrote goes to the original host, whatever the rules say (SES refuses `<>`).
DSN_DECISION = Decision(rule=None, route=Route.UPSTREAM, reasons=("delivery status notification",))


class UpstreamSender(Protocol):
    async def send(self, mail: Mail) -> UpstreamAnswer: ...
    async def close(self) -> None: ...


class Store(Writes, Protocol):
    """The spool, as the loop uses it: claims, and the outcome writes."""

    async def claim(self, limit: int, *, parked: int = 0) -> list[Mail]: ...
    async def park(self, queue_ids: Sequence[str], lane: str) -> int: ...
    async def split(
        self, queue_id: str, *, child: str, recipients: Sequence[str], reason: str
    ) -> None: ...


class Suppressions(Protocol):
    async def reasons(self, recipients: Sequence[str]) -> dict[str, str]: ...


class _Took(NamedTuple):
    """What a host accepted in a delivery, before its outcome is on disk."""

    route: Route
    recipients: tuple[str, ...]
    ses_message_id: str | None


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
        self.outcomes = Outcomes(
            spool=spool, settings=lambda: self.settings, wall_clock=wall_clock, sleep=sleep
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._upstream_down_until = 0.0  # monotonic; no connection attempts before it
        self._down_reply = ""
        self._down_status = UNREACHABLE
        # A claimed mail as its row stands after a split moved some of its recipients to a
        # row of their own: what `_guarded` defers if the rest of its delivery fails.
        self._narrowed: dict[str, Mail] = {}
        # Recipients SES or the original host took in the delivery in flight, per row, from
        # the answer until the outcome is on disk: what `_guarded` must not send again.
        self._accepted: dict[str, _Took] = {}
        self._lane = Lane(lambda: self.settings.deliverers)  # SES's share of the slots

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and deliver until `stop` is set; `drain()` then lets in-flight sends finish."""
        # Waited for beside the sends: drain() must cancel those waiting for SES's pace at
        # once, not after the next send ends.
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await self._claim_until(stop, stopping)
        finally:
            stopping.cancel()

    async def _claim_until(self, stop: asyncio.Event, stopping: asyncio.Task[bool]) -> None:
        while not stop.is_set():
            free = self.settings.deliverers - len(self._tasks)
            if free < max(1, self.settings.deliverers // CLAIM_SHARE):
                # Done callbacks run in order: _tasks.discard has run when wait() returns.
                waiting: set[asyncio.Future[Any]] = {*self._tasks, stopping}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                continue
            room = self._lane.room()
            self.wakeup.clear()  # before claiming, so a commit during the claim is not missed
            self._lane.freed.clear()
            try:
                batch = await self.spool.claim(free, parked=room)
            except SpoolError as exc:  # disk full, I/O error: keep the loop, try again later
                logs.event(log, "claim_failed", level=logging.WARNING, error=str(exc))
                await wait_any(stop, seconds=IDLE_POLL)
                continue
            self._lane.claimed(room, len(batch))
            await self._start(batch)
            if len(batch) < free:
                await wait_any(self.wakeup, stop, self._lane.freed, seconds=IDLE_POLL)

    async def _start(self, batch: Sequence[Mail]) -> None:
        """A delivery task for each claimed mail, but SES mail past the lane's size goes
        back to the queue, set aside (`park`)."""
        parking: list[Mail] = []
        for mail in batch:
            decision = self._decide(mail)
            paced = decision is not None and self._paced(mail, decision)
            if paced and self._lane.full():
                parking.append(mail)
                continue
            task = self._launch(mail, decision)
            if paced:
                self._lane.join(task)
        if parking and not await self._park(parking):
            for mail in parking:  # not set aside: delivered now, each holding its slot
                self._launch(mail, None)

    def _launch(self, mail: Mail, decision: Decision | None) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded(mail, decision), name=f"deliver-{mail.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _park(self, mails: Sequence[Mail]) -> bool:
        """Set `mails` aside for SES's lane; False when the spool could not."""
        try:
            await self.spool.park([m.id for m in mails], SES_LANE)
        except SpoolError as exc:
            logs.event(log, "park_failed", level=logging.WARNING, error=str(exc))
            return False
        self._lane.parked()
        return True

    def _decide(self, mail: Mail) -> Decision | None:
        """The mail's route; None when the rules fail on it (deliver() classifies it again,
        in the guard that defers it)."""
        try:
            return self._classify(mail)
        except Exception:
            return None

    def _classify(self, mail: Mail) -> Decision:
        return DSN_DECISION if mail.reports_on else self.rules.classify(mail)

    def _paced(self, mail: Mail, decision: Decision) -> bool:
        """True when this delivery will wait for SES's pace: it goes in SES's lane."""
        if decision.route is not Route.SES or mail.fallback_reason.startswith(UNCONFIRMED):
            return False
        return self._ses_may_try(mail)

    async def drain(self, deadline: float) -> int:
        """Wait for in-flight deliveries up to `deadline` seconds, then QUIT the upstream
        connections kept open between mails; return how many deliveries were left.

        Messages still in flight stay `inflight` on disk and are reclaimed at the next start:
        those still waiting for their turn at SES's pace are cancelled at once (`Pace.stop`).
        """
        if self.ses_route.pace is not None:
            self.ses_route.pace.stop()
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=deadline)
            for task in pending:
                task.cancel()
        await self.upstream.close()
        return len(pending)

    async def _guarded(self, mail: Mail, decision: Decision | None = None) -> None:
        try:
            await self.deliver(mail, decision)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never lose a message to a bug: defer it, keep the loop
            log.exception("event=deliver_bug id=%s", mail.id)
            # Not the recipients as claimed: those split off have rows of their own. Nor
            # those a host took already (the bug came after its answer): no second copy.
            left = self._narrowed.get(mail.id, mail)
            took = self._accepted.get(mail.id)
            if took is not None:
                rest = tuple(r for r in left.recipients if r not in took.recipients)
                left = replace(left, recipients=rest)
            reply = f"internal error: {exc!r}"
            try:
                if took is not None and not left.recipients:
                    await self.outcomes.record(
                        self.spool.sent,
                        mail.id,
                        rule=None,
                        route=took.route.value,
                        reply=f"accepted, then {reply}",
                        ses_message_id=took.ses_message_id,
                    )
                    return
                kept = left.fallback_reason or None  # an unconfirmed mail stays off SES
                await self.outcomes.defer_or_fail(left, None, Route.UPSTREAM, reply, kept)
            except Exception:  # the same bug again: the row must not stay inflight for good
                log.exception("event=deliver_bug id=%s", mail.id)
                await self.outcomes.record(
                    self.spool.defer,
                    left.id,
                    due_at=self._wall_clock() + self.settings.retry.schedule[0],
                    rule=None,
                    route=Route.UPSTREAM.value,
                    reply=reply,
                    fallback_reason=left.fallback_reason or None,
                    recipients=left.recipients,
                    notice=None,
                )
        finally:
            self._narrowed.pop(mail.id, None)
            self._accepted.pop(mail.id, None)

    async def deliver(self, mail: Mail, decision: Decision | None = None) -> None:
        """One attempt for one claimed message; records the outcome on its row. `decision`:
        its classification, when the claim loop made it."""
        if decision is None:
            decision = self._classify(mail)
        if mail.attempts <= 1:  # once a mail, not at every retry: the ratio of fallbacks to
            # it (RelaySesFallbackHigh) stayed near 0.1 while every mail fell back
            metrics.CLASSIFIED.labels(decision.rule or "(default)", decision.route.value).inc()
        # No line of its own: the outcome's line names the rule, the route and the reasons.
        fallback: Fallback | None = None
        if decision.route is Route.SES:
            through = await self._through_ses(mail, decision)
            if through is None:
                return  # recorded: sent, to be retried, or failed (suppressed)
            mail, fallback = through
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

    async def _through_ses(
        self, mail: Mail, decision: Decision
    ) -> tuple[Mail, Fallback | None] | None:
        """SES's part of a delivery: the mail and why it goes upstream instead; None when
        its outcome is recorded already."""
        if mail.fallback_reason.startswith(UNCONFIRMED):  # an earlier try's: SES may have it
            return mail, Fallback(reason="unconfirmed", detail=mail.fallback_reason)
        if self._ses_may_try(mail):
            mail = await self._batch(mail)
        checked = await self._suppression(mail, decision)
        if checked is None or checked[1] is not None:
            return checked  # all suppressed: failed (`bounce`), or upstream
        mail = checked[0]  # without the suppressed recipients split off
        verdict = await self.ses_route.attempt(mail, decision, self.settings)
        if isinstance(verdict, Sent):
            self._accepted[mail.id] = _Took(Route.SES, mail.recipients, verdict.message_id)
            reply, ses_id = "SES accepted", verdict.message_id
            await self.outcomes.sent(mail, decision, Route.SES, reply, ses_message_id=ses_id)
            return None
        if isinstance(verdict, Retry):
            await self.outcomes.deferred(
                mail, decision, Route.SES, verdict.reply, delay=verdict.delay
            )
            return None
        return mail, verdict

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
        # Once each: a row spooled before receive kept one copy of a repeated RCPT could
        # otherwise lose every recipient of its first batch to the split of a later one.
        mail = replace(mail, recipients=tuple(dict.fromkeys(mail.recipients)))
        batches = [mail.recipients[i : i + size] for i in range(0, len(mail.recipients), size)]
        for n, batch in enumerate(batches[1:], start=2):
            reason = f"SES takes at most {size} recipients per call: batch {n} of {len(batches)}"
            mail = await self._split(mail, batch, reason)
        return mail

    async def _split(self, mail: Mail, recipients: Sequence[str], reason: str) -> Mail:
        """Move `recipients` to a row of their own (the spool's split); `mail` without them,
        as its row now stands."""
        await self.outcomes.record(
            self.spool.split, mail.id, child=new_id(), recipients=list(recipients), reason=reason
        )
        narrowed = replace(
            mail, recipients=tuple(r for r in mail.recipients if r not in recipients)
        )
        self._narrowed[mail.id] = narrowed
        return narrowed

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
        if any(r not in held for r in mail.recipients):
            return await self._split(mail, list(held), detail), None
        if ses.suppressed is Suppressed.UPSTREAM:
            return mail, Fallback(reason="suppressed", detail=detail)
        failures = [
            Failure(
                recipient=rcpt,
                reply=f"550 5.1.1 <{rcpt}>: on the SES account suppression list ({why})",
            )
            for rcpt, why in held.items()
        ]
        reply = f"550 5.1.1 {detail}"
        await self.outcomes.fail(mail, decision, Route.SES, reply, failures)
        return None

    async def _upstream(self, mail: Mail, decision: Decision, fallback: Fallback | None) -> None:
        reason = fallback.detail if fallback else None
        if fallback is not None:
            await self.outcomes.record(self.spool.event, mail.id, "fallback", fallback.detail)
        if self._clock() < self._upstream_down_until:  # like Postfix's dead-host cache
            reply = f"not tried, the original host was unreachable moments ago: {self._down_reply}"
            await self.outcomes.defer_or_fail(
                mail, decision, Route.UPSTREAM, reply, reason, status=self._down_status
            )
            return
        try:
            answer = await self.upstream.send(mail)
        except PermanentFailure as exc:
            failures = [
                self.outcomes.refused(rcpt, exc.reply, status=exc.status)
                for rcpt in mail.recipients
            ]
            await self.outcomes.fail(
                mail, decision, Route.UPSTREAM, exc.reply, failures, reason=reason
            )
            return
        except TemporaryFailure as exc:
            # The host's reply (a 421 banner, a 451 to every recipient) is reported as its
            # (Remote-MTA, its status); relay's words with no reply at all as 4.4.1.
            said = dict.fromkeys(mail.recipients, exc.reply) if replied(exc.reply) else None
            status = exc.status or (
                UNREACHABLE if isinstance(exc, HostUnreachable) and not said else ""
            )
            if isinstance(exc, (HostUnreachable, HostUnusable)):
                if isinstance(exc, HostUnusable):  # relay's settings or the host's: not the mail's
                    logs.event(log, "upstream_unusable", level=logging.WARNING, error=str(exc))
                self._upstream_down_until = self._clock() + UPSTREAM_DOWN_FOR
                self._down_reply = exc.reply  # the mails not tried meanwhile get its status
                self._down_status = status or status_of_reply(exc.reply)
            await self.outcomes.defer_or_fail(
                mail, decision, Route.UPSTREAM, exc.reply, reason, replies=said, status=status
            )
            return
        self._accepted[mail.id] = _Took(Route.UPSTREAM, answer.accepted, None)
        await self.outcomes.upstream_answer(mail, decision, answer, reason)
