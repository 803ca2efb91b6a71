"""The service lifecycle: open the spool, listen, run background tasks, stop cleanly.

    run() -> serve(): Spool.open -> listener (session.Session) -> background tasks
            SIGTERM/SIGINT set `stop` -> close listener -> idle sessions get 421,
            sessions in a transaction finish (deadline) -> tasks stop (deadline) -> spool closed

Background work (the delivery process, metrics, watchdog, reload) plugs in as
`relay.runtime` tasks: `serve(settings, background=[...])`; each gets a
`Context` and must return when `ctx.stop` is set. SIGHUP sets `ctx.reload`.
By default (`relay serve`, DEFAULT_TASKS) delivery runs in the delivery process
(relay.deliver.supervisor starts relay.deliver.process), which gets SIGTERM as
soon as `stop` is set and drains its sends while the sessions here drain;
IN_PROCESS_TASKS keeps delivery on this loop, for tests.

When the listen port is 0 the kernel picks one; the bound address is logged as
`listening on HOST:PORT` and, if $RELAY_PORT_FILE is set, written to that file
(the port number alone), which is how the tests find a subprocess's port.

`relay serve` runs on uvloop's event loop (libuv), not asyncio's own: about 10% more
mails accepted per second on two cores (bench/README.md, "uvloop"). relay's code
is the same on both; the tests that run the service in-process use asyncio's.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from functools import partial
from pathlib import Path

import uvloop

from relay import logs, metrics, rules, runtime, sdnotify
from relay.deliver.feedback import RATE_WINDOW, judge, ses_feedback
from relay.deliver.supervisor import delivery_process
from relay.deliver.task import delivery, purge_sent
from relay.errors import ConfigError, RelayError, SpoolError
from relay.metrics.http import serve_http
from relay.receive.budget import Budget
from relay.receive.caps import RESERVED_FILES, Caps, open_file_limit, sessions_problem
from relay.receive.handler import Handler
from relay.receive.passwords import Users
from relay.receive.session import Session, session_factory
from relay.runtime import Context, Task, wait_any
from relay.settings import (
    Settings,
    check_listen_env,
    check_secrets,
    exposed_secrets,
    tls_context,
)
from relay.spool import Spool

log = logging.getLogger("relay.service")

SESSION_DRAIN = 30.0  # seconds sessions in a transaction get to finish at stop
PORT_FILE_ENV = "RELAY_PORT_FILE"
GAUGE_REFRESH = 5.0  # seconds between queue-depth updates
RATES_REFRESH = 60.0  # seconds /readyz keeps the SES rates it read


class StartError(RelayError):
    """The service cannot start (unsafe listen address, missing file, port in use)."""


def run(settings: Settings, *, log_format: str = "text", early: Sequence[int] = ()) -> int:
    """Entry point of `relay serve`: 0 after a clean stop, 1 when it could not start.
    `early`: the signals to stop that came before the event loop could handle them."""
    logs.setup(log_format)
    try:
        settle = partial(runtime.settle, young_collect=runtime.YOUNG_COLLECT)
        uvloop.run(serve(settings, log_format=log_format, ready=lambda _: settle(), early=early))
    except (StartError, SpoolError) as exc:
        log.error("relay serve stopped: %s", exc)
        return 1
    return 0


def check_safe(settings: Settings) -> None:
    """Refuse an open relay: a non-loopback listen needs auth and TLS (defence in depth)."""
    if not settings.listen.is_loopback and (settings.auth is None or settings.tls is None):
        raise StartError(
            f"listen {settings.listen} is not a loopback address and auth and tls are not both "
            "configured: relay would be an open relay; listen on 127.0.0.1 or configure both"
        )
    problems = check_listen_env(settings) + check_secrets(settings)
    if problems:
        raise StartError("; ".join(problems))
    for warning in exposed_secrets(settings):
        logs.event(log, "secret_file_exposed", level=logging.WARNING, problem=warning)


def check_open_files(settings: Settings) -> int:
    """Raise the soft open-file limit to the hard one, log both, and refuse a
    `limits.max_sessions` that cannot fit under it (accept() would fail for everyone).
    Returns how many DATA spill files may be open at once: what the rest leaves."""
    soft, hard = open_file_limit()
    max_sessions = settings.limits.max_sessions
    spill_files = soft - max_sessions - RESERVED_FILES
    logs.event(
        log,
        "open_files",
        soft=soft,
        hard=hard,
        max_sessions=max_sessions,
        reserved=RESERVED_FILES,
        spill_files=spill_files,
    )
    problem = sessions_problem(max_sessions, soft)
    if problem is not None:
        raise StartError(f"{settings.source}: {problem}")
    return spill_files


def _give_back_big_buffers() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), for receive.data.Budget to call once hoarded DATA is gone
    (None where there is no glibc).

    glibc hands memory freed in the middle of its heap back to the system only when
    asked; without this, a heap that hoarders grew to hundreds of MiB stays that big
    after they leave. (Fixing the mmap threshold instead would cost every transaction
    a few mmap/munmap calls: asyncio reads into a 256 KiB buffer.)
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return lambda: malloc_trim(0)


_ACCEPT_FAILED = logs.Sampled(log, "accept_failed")


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """asyncio logs accept() running out of descriptors with a traceback on every try (a
    flood made 95 MB of them); relay logs it once per interval, with a count."""
    if context.get("message") == "socket.accept() out of system resource":
        _ACCEPT_FAILED(error=str(context.get("exception")))
        return
    loop.default_exception_handler(context)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls is None:
        return None
    try:
        return tls_context(tls)
    except (OSError, ssl.SSLError) as exc:
        raise StartError(f"tls: cannot load {tls.cert} / {tls.key}: {exc}") from exc


def _renew_certificate(context: ssl.SSLContext, settings: Settings, _: rules.RuleSet) -> None:
    """At a reload, the certificate and key read again into the context in use, for the
    handshakes to come: a certificate renewed at the same path (certbot's) was served only
    after a restart, and once the old one expired Moodle's STARTTLS failed. Changed paths
    wait for a restart (`reload_needs_restart`)."""
    tls = settings.tls
    if tls is None:
        return
    try:
        tls_context(tls)  # a throwaway first: a key that does not fit never reaches the live one
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        logs.event(
            log,
            "tls_reload_failed",
            level=logging.ERROR,
            keeping="the certificate in use",
            error=f"{tls.cert} / {tls.key}: {exc}",
        )


async def serve(
    settings: Settings,
    *,
    background: Sequence[Task] | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[Context], None] | None = None,
    drain: float = SESSION_DRAIN,
    log_format: str = "text",
    early: Sequence[int] = (),
) -> None:
    """Run until `stop` is set (by SIGTERM/SIGINT when not given, or already in `early`);
    every wait has a deadline.

    `background` defaults to `DEFAULT_TASKS`. `ready(ctx)` is called once the
    listener accepts connections; `drain` is how long sessions in a transaction get
    to finish at stop; `log_format` is passed on to the delivery process.
    """
    check_safe(settings)
    spill_files = check_open_files(settings)
    trim = _give_back_big_buffers()
    tls = _tls_context(settings)
    try:
        ruleset = rules.load(settings.rules, ses_region=settings.ses.region)
    except ConfigError as exc:
        raise StartError(f"rules cannot be used:\n{exc}") from exc
    rules.warn(ruleset)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    async with AsyncExitStack() as stack:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, stop.set)
                stack.callback(loop.remove_signal_handler, signum)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        if early:  # a SIGTERM while relay serve was starting (see relay.cli.serve)
            log.info("event=stop_requested_at_start signal=%s", early[0])
            stop.set()
        spool = await Spool.open(settings.spool)
        stack.push_async_callback(spool.close)
        ctx = Context(
            settings=settings, rules=ruleset, spool=spool, stop=stop, log_format=log_format
        )
        previous = loop.get_exception_handler()
        loop.set_exception_handler(_loop_exception)
        stack.callback(loop.set_exception_handler, previous)
        if tls is not None:
            ctx.on_reload.append(partial(_renew_certificate, tls))
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, ctx.reload.set)
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
        implicit = settings.tls is not None and settings.tls.implicit
        handler = Handler(
            spool=spool,
            settings=settings,
            implicit_tls=implicit,
            users=Users(settings.auth.users_file) if settings.auth else None,
        )
        # Tasks start before the listener so that, unwinding in reverse, the listener
        # closes first, then the tasks drain, then the spool closes.
        tasks = DEFAULT_TASKS if background is None else background
        running = runtime.start(ctx, tasks)
        stack.push_async_callback(runtime.stop_all, running)
        stack.callback(stop.set)  # runs first when unwinding: a failed start stops the tasks
        limits = settings.limits
        caps = Caps(max_sessions=limits.max_sessions, max_per_ip=limits.max_sessions_per_ip)
        metrics.SESSIONS_OPEN.set_function(lambda: caps.total)
        metrics.MAX_SESSIONS.set(limits.max_sessions)
        factory = session_factory(
            handler,
            settings,
            ctx.sessions,
            caps=caps,
            budget=Budget(
                limits.max_data_in_memory,
                trim=trim,
                max_files=spill_files,
            ),
            tls_context=None if implicit else tls,
            implicit_tls=tls if implicit else None,  # started per session, once admitted
        )
        try:
            server = await loop.create_server(
                factory, settings.listen.host, settings.listen.port, reuse_address=True
            )
        except OSError as exc:
            raise StartError(f"cannot listen on {settings.listen}: {exc}") from exc
        stack.push_async_callback(_close_listener, server, ctx.sessions, drain)
        host, port = server.sockets[0].getsockname()[:2]
        ctx.listening, ctx.port = True, port
        if settings.metrics is not None and observe in tasks:
            # Until `observe` has its listener: a metrics port already taken is a failed
            # start (its StartError), not a crash after READY=1 told systemd all was well.
            await runtime.wait_stop(ctx.metrics_bound, running)
        log.info("listening on %s:%d", host, port)
        logs.flush()  # the start's lines are in the log before anyone is told it is ready
        _write_port_file(port)
        if ready is not None:
            ready(ctx)
        await sdnotify.tell("READY=1")
        await runtime.wait_stop(stop, running)
        handler.stopping = True
        ctx.listening = False
        await sdnotify.tell("STOPPING=1")
        logs.event(log, "stopping", sessions=len(ctx.sessions))


async def _close_listener(server: asyncio.Server, sessions: set[Session], drain: float) -> None:
    """New connections refused; idle sessions 421; transactions get `drain` seconds."""
    server.close()
    deadline = time.monotonic() + drain
    while sessions and time.monotonic() < deadline:
        for session in list(sessions):
            if not session.busy:
                session.shut()
        await asyncio.sleep(0.05)
    for session in list(sessions):
        logs.event(
            log,
            "session_aborted",
            level=logging.WARNING,
            peer=session.peer_ip,
            reason="in a transaction at the shutdown deadline",
        )
        session.abort()
    await asyncio.wait_for(server.wait_closed(), 5)


def _write_port_file(port: int) -> None:
    path = os.environ.get(PORT_FILE_ENV)
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(f"{port}\n", encoding="ascii")
        tmp.replace(path)


async def observe(ctx: Context) -> None:
    """Serve /metrics, /healthz, /readyz (when configured) and keep the queue gauges fresh."""
    server = None
    if ctx.settings.metrics is not None:

        async def ready() -> bool:
            spool = ctx.spool
            return (
                ctx.listening
                and not ctx.stop.is_set()
                and not spool.damaged
                and (await spool.writable())
            )

        where = ctx.settings.metrics
        try:
            server = await serve_http(
                where.host,
                where.port,
                ready=ready,
                text=lambda: metrics.exposition(ctx.delivery_metrics),
                details=_rates_text(ctx) if ctx.settings.ses.events_queue_url else None,
            )
        except OSError as exc:
            raise StartError(f"cannot listen on metrics {where}: {exc}") from exc
        ctx.metrics_port = server.sockets[0].getsockname()[1]
        ctx.metrics_bound.set()
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


def _rates_text(ctx: Context) -> Callable[[], Awaitable[str]]:
    """/readyz details: SES bounce and complaint rates of relay's sends, re-read at most
    every RATES_REFRESH seconds (a probe every few seconds must not scan the spool)."""
    cache: list[tuple[float, str]] = []

    async def text() -> str:
        if cache and time.monotonic() - cache[0][0] < RATES_REFRESH:
            return cache[0][1]
        window = min(RATE_WINDOW, ctx.settings.retention)
        seen = await ctx.spool.reputation(time.time() - window)
        lines = "".join(f"ses {level}: {line}\n" for level, line in judge(seen, window))
        cache[:] = [(time.monotonic(), lines)]
        return lines

    return text


async def watchdog(ctx: Context) -> None:
    """WATCHDOG=1 to systemd at half of WatchdogSec, while the loop runs."""
    interval = sdnotify.watchdog_interval()
    if interval is None:  # not asked for: idle until stop, like every task
        await ctx.stop.wait()
        return
    while not ctx.stop.is_set():
        sdnotify.notify("WATCHDOG=1")
        await wait_any(ctx.stop, seconds=interval)


DEFAULT_TASKS: list[Task] = [delivery_process, observe, watchdog, runtime.reload_on_signal]
IN_PROCESS_TASKS: list[Task] = [
    delivery,
    observe,
    watchdog,
    runtime.reload_on_signal,
    purge_sent,
    ses_feedback,
]
