"""The delivery task: build the senders (SES, upstream), run the loop, keep the SES quota.

`delivery(ctx)` runs in the delivery process (relay.deliver.process), or on the
service's own loop for tests (`service.IN_PROCESS_TASKS`); `purge_sent` drops
delivered rows past `retention`.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from relay import logs, metrics
from relay.deliver.loop import Deliverer
from relay.deliver.ses.circuit import Circuit, CircuitState
from relay.deliver.ses.client import SesClient
from relay.deliver.ses.pace import Pace
from relay.deliver.ses.route import SesRoute
from relay.deliver.ses.suppression import SuppressionList
from relay.deliver.upstream import UpstreamClient
from relay.errors import DeliveryError, SpoolError
from relay.rules import RuleSet
from relay.runtime import Context, wait_any
from relay.settings import Settings, Suppressed

log = logging.getLogger("relay.service")

QUOTA_REFRESH = 300.0  # seconds between GetSendQuota calls
QUOTA_WARMUP = 5.0  # seconds delivery waits at start for the first GetSendQuota
PURGE_EVERY = 3600.0
UNKNOWN_QUOTA_RATE = 1.0  # recipients/s until GetSendQuota answers (the SES sandbox rate)


async def purge_sent(ctx: Context) -> None:
    """Drop dead letters past `failed_retention`, then delivered rows past `retention`
    (giving the pages of both back), hourly."""
    while not ctx.stop.is_set():
        keep = ctx.settings.failed_retention  # read each time: a reload may change it
        try:
            if keep is not None and (dropped := await ctx.spool.purge_failed(keep)):
                # Each was logged as failed, with its DSN, when it failed; an admin who
                # looks for one later learns here where it went.
                logs.event(
                    log,
                    "purged_dead_letters",
                    count=dropped,
                    failed_retention=round(keep),
                )
            purged = await ctx.spool.purge(ctx.settings.retention)
            if purged:
                logs.event(log, "purged", count=purged)
        except SpoolError as exc:
            logs.event(log, "purge_failed", level=logging.WARNING, error=str(exc))
        await wait_any(ctx.stop, seconds=PURGE_EVERY)


async def delivery(ctx: Context) -> None:
    """Build the senders and run the delivery loop until stop; then drain in-flight sends.

    It first takes back what an earlier delivery left inflight: it must be the
    spool's only delivery loop (in `relay serve`, the delivery process holds the lock).
    """
    await ctx.spool.reclaim()
    settings = ctx.settings
    async with AsyncExitStack() as stack:
        ses: SesClient | None = None
        pace: Pace | None = None
        unusable = ""
        if settings.ses.enabled:  # also in shadow mode: quota metrics, and reload to live
            try:
                ses = await SesClient.open(settings.ses)
            except Exception as exc:  # AWS_PROFILE names no profile, ~/.aws/config unreadable
                # Crashing here stopped all delivery, upstream mail too, at every restart.
                unusable = f"it could not be made: {exc!r}"
                logs.event(log, "ses_unusable", level=logging.ERROR, error=repr(exc))
        if ses is not None:
            stack.push_async_callback(ses.close)
            pace = Pace(settings.ses.max_send_rate or UNKNOWN_QUOTA_RATE)
            # The first GetSendQuota sets the ceiling (auto) and also warms up credentials
            # and the HTTPS connection, so the first paced sends are not late and bunched.
            # Bounded: an SES endpoint that does not answer must not hold up upstream mail.
            try:
                known = await asyncio.wait_for(_refresh_quota(ctx, ses, pace), QUOTA_WARMUP)
            except TimeoutError:
                known = False
                logs.event(log, "ses_quota_slow", level=logging.WARNING, waited=QUOTA_WARMUP)
            if known and not settings.ses.max_send_rate:
                pace = Pace(pace.ceiling)  # the quota as ceiling (slow start from a third of it)
                await _refresh_quota(ctx, ses, pace)
        circuit = Circuit(settings.ses.circuit_cooldown)
        suppressions: SuppressionList | None = None
        if ses is not None and settings.ses.suppressed is not Suppressed.SEND:
            suppressions = await SuppressionList.open(settings.ses)
            stack.push_async_callback(suppressions.close)
            ctx.on_suppressible.append(suppressions.forget)
            stack.callback(ctx.on_suppressible.remove, suppressions.forget)
        deliverer = Deliverer(
            settings=settings,
            spool=ctx.spool,
            rules=ctx.rules,
            upstream=UpstreamClient(settings.upstream, hostname=settings.hostname),
            ses_route=SesRoute(ses=ses, pace=pace, circuit=circuit, unusable=unusable),
            wakeup=ctx.spool.wakeup,
            suppressions=suppressions,
        )

        refreshing: set[asyncio.Task[bool]] = set()

        def reloaded(new_settings: Settings, new_rules: RuleSet) -> None:
            old = deliverer.settings
            deliverer.rules = new_rules
            deliverer.settings = new_settings
            if ses is not None:  # Source, configuration set, identity ARN: at the next send
                ses.use(new_settings.ses)
            rate = new_settings.ses.max_send_rate
            if ses is not None and pace is not None and rate != old.ses.max_send_rate:
                _ceiling_now(ctx, ses, pace, rate, refreshing)
            if (new_settings.upstream, new_settings.hostname) != (old.upstream, old.hostname):
                # Mail in flight finishes on the old client; its connections close when idle
                # (upstream.REUSE_IDLE) or, at the latest, when delivery stops.
                stack.push_async_callback(deliverer.upstream.close)
                deliverer.upstream = UpstreamClient(
                    new_settings.upstream, hostname=new_settings.hostname
                )

        ctx.on_reload.append(reloaded)
        if ctx.settings is not settings:  # a reload while SES warmed up: it passed us by
            reloaded(ctx.settings, ctx.rules)
        quota = None
        if ses is not None and pace is not None:
            quota = asyncio.create_task(_quota_loop(ctx, ses, pace, circuit), name="ses-quota")
        try:
            await deliverer.run(ctx.stop)
        finally:
            if quota is not None:
                quota.cancel()
            left = await deliverer.drain(ctx.drain)
            logs.event(log, "delivery_stopped", still_inflight=left)


def _ceiling_now(
    ctx: Context, ses: SesClient, pace: Pace, rate: float | None, tasks: set[asyncio.Task[bool]]
) -> None:
    """A reloaded `ses.max_send_rate` at once, not at the next quota refresh (QUOTA_REFRESH,
    5 minutes); `auto` (None): the quota's, asked now (the task kept in `tasks`)."""
    if rate:
        pace.set_ceiling(rate)
        metrics.PACE_CEILING.set(rate)
        return
    refresh = asyncio.create_task(_refresh_quota(ctx, ses, pace))
    tasks.add(refresh)
    refresh.add_done_callback(tasks.discard)


async def _quota_loop(ctx: Context, ses: SesClient, pace: Pace, circuit: Circuit) -> None:
    """GetSendQuota at start and every QUOTA_REFRESH: ceiling (auto) and daily budget."""
    while not ctx.stop.is_set():
        await wait_any(ctx.stop, seconds=QUOTA_REFRESH)
        await _refresh_quota(ctx, ses, pace)
        metrics.CIRCUIT_OPEN.set(0 if circuit.state is CircuitState.CLOSED else 1)


async def _refresh_quota(ctx: Context, ses: SesClient, pace: Pace) -> bool:
    """GetSendQuota -> pace ceiling (`max_send_rate: auto`: 90% of MaxSendRate) and budget."""
    try:
        quota = await ses.quota()
    except DeliveryError as exc:
        logs.event(log, "ses_quota_failed", level=logging.WARNING, error=exc.reply)
        return False
    ceiling = ctx.settings.ses.max_send_rate or max(quota.max_send_rate * 0.9, 0.1)
    pace.set_ceiling(ceiling)
    pace.set_budget(quota.max_24h, quota.sent_last_24h)
    metrics.QUOTA_RATE.set(quota.max_send_rate)
    metrics.QUOTA_24H.set(quota.max_24h)
    metrics.SENT_24H.set(quota.sent_last_24h)
    metrics.PACE_CEILING.set(ceiling)
    logs.event(
        log,
        "ses_quota",
        max_send_rate=quota.max_send_rate,
        max_24h=quota.max_24h,
        sent_last_24h=quota.sent_last_24h,
        pace_ceiling=ceiling,
    )
    return True
