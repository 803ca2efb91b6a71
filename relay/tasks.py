"""The service's background tasks: delivery, SES quota, metrics, watchdog, reload, purge.

Each task is `async def task(ctx: Context) -> None` and returns when `ctx.stop`
is set; `service.serve()` starts them after the spool opens and stops them
after the listener closed.

Two task lists: `DEFAULT_TASKS` is what `relay serve` runs, with delivery in a
child process (`relay.supervisor.delivery_process` starts `relay.worker`, which
runs `delivery` and `purge_sent` there); `IN_PROCESS_TASKS` runs delivery on the
service's own event loop, for tests that want one process and one registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

from relay import logs, metrics, rules, sdnotify
from relay import settings as settings_mod
from relay.circuit import Circuit, CircuitState
from relay.deliver import Deliverer, wait_any
from relay.errors import ConfigError, DeliveryError, SpoolError
from relay.pace import Pace
from relay.rules import RuleSet
from relay.ses import SesClient
from relay.sesroute import SesRoute
from relay.session import Session
from relay.settings import Settings
from relay.spool import Spool
from relay.supervisor import delivery_process
from relay.upstream import UpstreamClient

log = logging.getLogger("relay.service")

DELIVERY_DRAIN = 30.0  # seconds in-flight sends get to finish at stop
TASK_DRAIN = 40.0  # seconds tasks get to return after stop (the delivery process: drain + exit)
QUOTA_REFRESH = 300.0  # seconds between GetSendQuota calls
QUOTA_WARMUP = 5.0  # seconds delivery waits at start for the first GetSendQuota
GAUGE_REFRESH = 5.0  # seconds between queue-depth updates
PURGE_EVERY = 3600.0
UNKNOWN_QUOTA_RATE = 1.0  # recipients/s until GetSendQuota answers (the SES sandbox rate)


@dataclass(slots=True, kw_only=True)
class Context:
    """What a background task gets: settings, rules, the open spool, the stop signal."""

    settings: Settings
    rules: RuleSet
    spool: Spool
    stop: asyncio.Event
    reload: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: set[Session] = field(default_factory=set)
    listening: bool = False
    port: int = 0  # the SMTP listener's bound port (useful with listen port 0)
    metrics_port: int | None = None
    on_reload: list[Callable[[Settings, RuleSet], None]] = field(default_factory=list)
    on_reload_signal: list[Callable[[], None]] = field(default_factory=list)  # every SIGHUP
    log_format: str = "text"  # `relay serve --log-format`, for the delivery process
    drain: float = DELIVERY_DRAIN  # seconds in-flight sends get at stop
    delivery_metrics: metrics.Scrape | None = None  # set while a delivery process runs


Task = Callable[[Context], Coroutine[Any, Any, None]]


def start(ctx: Context, tasks: Sequence[Task]) -> list[asyncio.Task[None]]:
    return [
        asyncio.create_task(task(ctx), name=getattr(task, "__name__", "task")) for task in tasks
    ]


async def wait_stop(stop: asyncio.Event, running: list[asyncio.Task[None]]) -> None:
    """Until `stop` is set; a task that raised ends the wait with its exception."""
    waiter = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            await asyncio.wait([waiter, *running], return_when=asyncio.FIRST_COMPLETED)
            for task in [t for t in running if t.done()]:
                running.remove(task)
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                if not stop.is_set():
                    log.warning("event=task_ended task=%s", task.get_name())
    finally:
        waiter.cancel()


async def stop_all(running: list[asyncio.Task[None]]) -> None:
    """Give the tasks (told to stop) TASK_DRAIN seconds to return, then cancel them."""
    if not running:
        return
    _, pending = await asyncio.wait(running, timeout=TASK_DRAIN)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)


async def purge_sent(ctx: Context) -> None:
    """Drop delivered rows past `retention`, hourly."""
    while not ctx.stop.is_set():
        try:
            purged = await ctx.spool.purge(ctx.settings.retention)
            if purged:
                logs.event(log, "purged", count=purged)
        except SpoolError as exc:
            logs.event(log, "purge_failed", level=logging.WARNING, error=str(exc))
        await wait_any(ctx.stop, seconds=PURGE_EVERY)


async def delivery(ctx: Context) -> None:
    """Build the senders and run the delivery loop until stop; then drain in-flight sends.

    It first takes back what an earlier delivery left inflight: it must be the
    spool's only delivery loop (in `relay serve`, relay.worker holds the lock).
    """
    await ctx.spool.reclaim()
    settings = ctx.settings
    async with AsyncExitStack() as stack:
        ses: SesClient | None = None
        pace: Pace | None = None
        if settings.ses.enabled:  # also in shadow mode: quota metrics, and reload to live
            ses = await SesClient.open(settings.ses)
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
                pace = Pace(pace.ceiling)  # start at the quota, not at the provisional rate
                await _refresh_quota(ctx, ses, pace)
        circuit = Circuit(settings.ses.circuit_cooldown)
        deliverer = Deliverer(
            settings=settings, spool=ctx.spool, rules=ctx.rules,
            upstream=UpstreamClient(settings.upstream, hostname=settings.hostname),
            ses_route=SesRoute(ses=ses, pace=pace, circuit=circuit), wakeup=ctx.spool.wakeup,
        )  # fmt: skip

        def reloaded(new_settings: Settings, new_rules: RuleSet) -> None:
            old = deliverer.settings
            deliverer.rules = new_rules
            deliverer.settings = new_settings
            if (new_settings.upstream, new_settings.hostname) != (old.upstream, old.hostname):
                # Mail in flight finishes on the old client; its connections close when idle
                # (upstream.REUSE_IDLE) or, at the latest, when delivery stops.
                stack.push_async_callback(deliverer.upstream.close)
                deliverer.upstream = UpstreamClient(
                    new_settings.upstream, hostname=new_settings.hostname
                )

        ctx.on_reload.append(reloaded)
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
    logs.event(log, "ses_quota", max_send_rate=quota.max_send_rate, max_24h=quota.max_24h,
               sent_last_24h=quota.sent_last_24h, pace_ceiling=ceiling)  # fmt: skip
    return True


async def observe(ctx: Context) -> None:
    """Serve /metrics, /healthz, /readyz (when configured) and keep the queue gauges fresh."""
    server = None
    if ctx.settings.metrics is not None:

        async def ready() -> bool:
            return ctx.listening and not ctx.stop.is_set() and await ctx.spool.writable()

        where = ctx.settings.metrics
        server = await metrics.serve_http(
            where.host, where.port, ready=ready,
            text=lambda: metrics.exposition(ctx.delivery_metrics),
        )  # fmt: skip
        ctx.metrics_port = server.sockets[0].getsockname()[1]
        logs.event(log, "metrics_listening", address=f"{where.host}:{ctx.metrics_port}")
    try:
        while not ctx.stop.is_set():
            try:
                for state, count in (await ctx.spool.counts()).items():
                    metrics.QUEUE_DEPTH.labels(state).set(count)
                metrics.OLDEST_AGE.set(await ctx.spool.oldest_age())
            except SpoolError as exc:
                logs.event(log, "gauges_failed", level=logging.WARNING, error=str(exc))
            await wait_any(ctx.stop, seconds=GAUGE_REFRESH)
    finally:
        if server is not None:
            server.close()
            with suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)


async def watchdog(ctx: Context) -> None:
    """WATCHDOG=1 to systemd at half of WatchdogSec, while the loop runs."""
    interval = sdnotify.watchdog_interval()
    if interval is None:  # not asked for: idle until stop, like every task
        await ctx.stop.wait()
        return
    while not ctx.stop.is_set():
        sdnotify.notify("WATCHDOG=1")
        await wait_any(ctx.stop, seconds=interval)


async def reload_on_signal(ctx: Context) -> None:
    """SIGHUP: re-read relay.yaml and its rules; an invalid file keeps the old ones."""
    while not ctx.stop.is_set():
        waiter = asyncio.ensure_future(ctx.reload.wait())
        stopper = asyncio.ensure_future(ctx.stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        if ctx.stop.is_set():
            return
        ctx.reload.clear()
        for forward in ctx.on_reload_signal:  # the delivery process reloads on its own
            forward()
        reload(ctx)


def reload(ctx: Context) -> bool:
    """Apply a new relay.yaml + rules.yaml, or keep the old and log every problem."""
    try:
        new_settings = settings_mod.load(ctx.settings.source)
        new_rules = rules.load(new_settings.rules)
    except ConfigError as exc:
        metrics.RULES_RELOADS.labels("error").inc()
        logs.event(log, "reload_failed", level=logging.ERROR, keeping="previous rules",
                   problems=" | ".join(str(p) for p in exc.problems))  # fmt: skip
        return False
    fixed = ("listen", "spool", "auth", "tls", "metrics", "allow_networks", "limits")
    changed = [name for name in fixed if getattr(new_settings, name) != getattr(ctx.settings, name)]
    if changed:
        logs.event(log, "reload_needs_restart", level=logging.WARNING, keys=",".join(changed))
    ctx.settings, ctx.rules = new_settings, new_rules
    for callback in ctx.on_reload:
        callback(new_settings, new_rules)
    metrics.RULES_RELOADS.labels("ok").inc()
    logs.event(log, "reloaded", rules=str(new_settings.rules), count=len(new_rules.rules))
    return True


DEFAULT_TASKS: list[Task] = [delivery_process, observe, watchdog, reload_on_signal]
IN_PROCESS_TASKS: list[Task] = [delivery, observe, watchdog, reload_on_signal, purge_sent]
