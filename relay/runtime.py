"""The task runner both processes share: a `Context`, tasks that run until stop, reload.

A task is `async def task(ctx: Context) -> None` and returns when `ctx.stop` is
set. `relay serve` (relay.service) and the delivery process (relay.deliver.process)
each build a Context, `start()` their tasks, `wait_stop()` and `stop_all()`.
SIGHUP sets `ctx.reload`; `reload_on_signal` applies the new relay.yaml and rules.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from relay import logs, metrics, rules
from relay import settings as settings_mod
from relay.errors import ConfigError
from relay.receive.session import Session
from relay.rules import RuleSet
from relay.settings import Settings, Suppressed
from relay.spool import Spool

log = logging.getLogger("relay.service")

DELIVERY_DRAIN = 30.0  # seconds in-flight sends get to finish at stop
TASK_DRAIN = 40.0  # seconds tasks get to return after stop (the delivery process: drain + exit)


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
    metrics_bound: asyncio.Event = field(default_factory=asyncio.Event)  # metrics_port is set
    on_reload: list[Callable[[Settings, RuleSet], None]] = field(default_factory=list)
    on_reload_signal: list[Callable[[], None]] = field(default_factory=list)  # every SIGHUP
    log_format: str = "text"  # `relay serve --log-format`, for the delivery process
    drain: float = DELIVERY_DRAIN  # seconds in-flight sends get at stop
    delivery_metrics: metrics.Scrape | None = None  # set while a delivery process runs
    # Addresses SES bounced for good or that complained (feedback): the suppression list may
    # hold them now, so the delivery loop's cache of it forgets them.
    on_suppressible: list[Callable[[Sequence[str]], None]] = field(default_factory=list)


Task = Callable[[Context], Coroutine[Any, Any, None]]


YOUNG_COLLECT = 20_000  # new tracked objects between young collections (Python's: 700)


def settle(*, young_collect: int | None = None) -> None:
    """Once a process has started: one collection, then `gc.freeze()`; with
    `young_collect` (relay serve: YOUNG_COLLECT), young collections every that many new
    objects instead of every 700.

    What the start built (modules, settings, rules, clients: a few hundred thousand
    objects) then stays out of the cycle collector's full collections, which otherwise
    walk all of it with the event loop stopped, every few thousand mails (bench/README.md,
    "A full collection in the middle of a transaction"). Reference counting still frees
    a frozen object; only a cycle among frozen objects would stay, and the start leaves
    none (the collection comes first).

    Twenty sessions at once keep thousands of young objects alive (streams, futures,
    bodies), and a young collection every 700 allocations walked them over and over: 3%
    of relay serve's CPU samples at 20 KB x 20 connections, where its one thread is the
    accept row's limit (bench/README.md, "The accept row, three rounds in turn, and profiled
    with perf"). Objects that die by reference count never wait for a collection; only
    cycles do, a few MB at most.
    The delivery process keeps Python's 700: nothing measured it gaining, and its pace
    against SES is timed to the millisecond.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    if young_collect is not None:
        gc.set_threshold(young_collect, *gc.get_threshold()[1:])
    logs.event(
        log,
        "settled",
        frozen_objects=gc.get_freeze_count(),
        young_collect=gc.get_threshold()[0],
        took_ms=round((time.perf_counter() - started) * 1000, 1),
    )


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


async def wait_any(*events: asyncio.Event, seconds: float) -> None:
    """Return when any of `events` is set, or after `seconds` (the sleep that a stop cuts
    short, for every loop of the service)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


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
        # Read and checked in a thread: PyYAML parses about 1 MB/s, and SMTP waited on the
        # event loop meanwhile (9.7 s for a relay.yaml grown to 20 MB).
        apply(ctx, await asyncio.to_thread(read_files, ctx.settings.source))


# Settings used only at start: a reload names them in `reload_needs_restart`.
_AT_START = ("listen", "spool", "auth", "tls", "metrics", "allow_networks", "limits", "hostname")
# The SES client, its circuit and the event queue's poller are made at start.
_SES_AT_START = (
    "region",
    "endpoint_url",
    "api",
    "timeout",
    "circuit_cooldown",
    "events_queue_url",
)


def reload(ctx: Context) -> bool:
    """Apply a new relay.yaml + rules.yaml, or keep the old and log every problem."""
    return apply(ctx, read_files(ctx.settings.source))


def read_files(source: Path) -> tuple[Settings, RuleSet] | list[str]:
    """relay.yaml at `source` and its rules, checked as `relay serve` checks them at start;
    else every problem. No change to anything: a thread may run it."""
    try:
        new_settings = settings_mod.load(source)
        new_rules = rules.load(new_settings.rules, ses_region=new_settings.ses.region)
        # What `relay serve` refuses at start: the upstream password's variable or file, a
        # users file it cannot read, TLS files it cannot load.
        secrets = settings_mod.check_secrets(new_settings)
        secrets += settings_mod.check_listen_env(new_settings)
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    except Exception as exc:  # anything else a file can cause: a reload never stops relay
        return [f"{source}: {exc!r}"]
    return secrets or (new_settings, new_rules)


def apply(ctx: Context, read: tuple[Settings, RuleSet] | list[str]) -> bool:
    """Make `read` (read_files) the settings and rules in effect, or log its problems and
    keep the old ones."""
    if isinstance(read, list):
        metrics.RULES_RELOADS.labels("error").inc()
        logs.event(
            log,
            "reload_failed",
            level=logging.ERROR,
            keeping="previous settings and rules",
            problems=" | ".join(read),
        )
        return False
    new_settings, new_rules = read
    rules.warn(new_rules)
    old = ctx.settings
    changed = [name for name in _AT_START if getattr(new_settings, name) != getattr(old, name)]
    changed += [
        f"ses.{name}"
        for name in _SES_AT_START
        if getattr(new_settings.ses, name) != getattr(old.ses, name)
    ]
    if new_settings.ses.enabled and not old.ses.enabled:
        changed.append("ses.enabled")  # no SES client was made at start (off works at once)
    if old.ses.suppressed is Suppressed.SEND and new_settings.ses.suppressed is not Suppressed.SEND:
        changed.append("ses.suppressed")  # no lookups were set up (the others switch at once)
    if changed:
        logs.event(log, "reload_needs_restart", level=logging.WARNING, keys=",".join(changed))
    # Until that restart the old values are the ones in effect, and what ctx.settings says:
    # a delivery process started meanwhile gets these (relay.deliver.supervisor).
    kept_ses = {name: getattr(old.ses, name) for name in _SES_AT_START}
    kept = {name: getattr(old, name) for name in _AT_START}
    new_settings = replace(new_settings, ses=replace(new_settings.ses, **kept_ses), **kept)
    ctx.settings, ctx.rules = new_settings, new_rules
    for callback in ctx.on_reload:
        callback(new_settings, new_rules)
    metrics.RULES_RELOADS.labels("ok").inc()
    logs.event(log, "reloaded", rules=str(new_settings.rules), count=len(new_rules.rules))
    return True
