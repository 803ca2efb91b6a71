"""The delivery process: `python -m relay.deliver.process`, started and watched by `relay serve`.

    lock SPOOL/delivery.lock (flock; waits while an older delivery process holds it)
      -> spool.reclaim() -> task.delivery, task.purge_sent, feedback.ses_feedback
    wake pipe (--wake-fd): a byte = new mail (spool.wakeup); EOF = relay serve is gone:
      stop, in-flight sends get PARENT_GONE_DRAIN seconds, the rest is reclaimed later
    metrics socket (--metrics-fd): b"SEQ" -> b"SEQ\\n" + this process's delivery metrics;
      b"reload" (handover.RELOAD, relay serve's SIGHUP) -> reload relay.yaml and the rules
    SIGHUP sent to this process itself: the same once its loop runs, ignored from main()'s
      first line until then (in the imports before it, it still ends the process)
    SIGTERM: stop, in-flight sends get DELIVERY_DRAIN seconds. SIGINT is ignored: a
      Ctrl-C reaches relay serve too, which stops this process when it is ready to.

It runs at nice 19 (NICE): when both want the same core, receiving, which
Moodle's cron waits on, goes first; delivery catches up when the burst is over
(measured in bench/README.md). Like relay serve it runs on uvloop's event loop:
about a tenth less CPU per mail than on asyncio's (bench/README.md, "Where relay
serve's time goes at one connection per mail").

Only the lock holder reclaims and claims, so a restarted `relay serve` cannot
take back mail that an old delivery process is still sending. The spool is
opened with synchronous=NORMAL (relay.spool): delivery's commits may be lost to
a power cut, which only means a mail goes out again. Deferred mail coming due
and mail queued by `relay queue retry` are found by the delivery loop's own poll.

It runs on the settings and rules relay serve hands it on stdin, those in effect there
(relay.deliver.handover), and reloads relay.yaml and the rules when relay serve asks, as
relay serve does on SIGHUP. Exit 0 after a stop; 1 when it cannot run (spool unusable, a
task failed): relay serve logs it and starts it again.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from relay import logs, metrics, runtime
from relay.deliver import handover, task
from relay.deliver.feedback import ses_feedback
from relay.errors import ConfigError, SpoolError
from relay.rules import RuleSet
from relay.runtime import Context, wait_any
from relay.settings import Settings
from relay.spool import Spool
from relay.spool.lock import DELIVERY_LOCK

log = logging.getLogger("relay.delivery_process")

LOCK_POLL = 0.2  # seconds between tries while another delivery process holds the lock
PARENT_GONE_DRAIN = 5.0  # seconds in-flight sends get when relay serve died
NICE = 19  # added to relay serve's nice value (see above)
TASKS: list[runtime.Task] = [
    task.delivery,
    task.purge_sent,
    ses_feedback,
    runtime.reload_on_signal,
]


def lower_priority() -> None:
    """nice NICE, or a warning and normal priority where that is refused (a seccomp filter
    that denies setpriority: systemd/relay.service allows it for this)."""
    try:
        os.nice(NICE)
    except OSError as exc:
        logs.event(log, "nice_refused", level=logging.WARNING, nice=NICE, error=str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relay.deliver.process",
        description="relay's delivery process, run by relay serve",
    )
    parser.add_argument("--wake-fd", type=int, required=True)
    parser.add_argument("--metrics-fd", type=int)
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's handler: not an exit
    logs.setup(args.log_format, level=args.log_level)
    lower_priority()
    try:  # what relay serve runs on (relay.deliver.handover); a reload reads the files
        settings, ruleset, read = handover.unpack(sys.stdin.buffer)
    except ConfigError as exc:  # other code on disk, and the files are unusable
        problems = " | ".join(str(p) for p in exc.problems)
        logs.event(log, "delivery_config_error", level=logging.ERROR, problems=problems)
        return 1
    except Exception as exc:  # nothing on stdin: relay serve died before it wrote
        logs.event(log, "delivery_no_settings", level=logging.ERROR, error=repr(exc))
        return 1
    if read:
        logs.event(log, "delivery_code_changed", level=logging.WARNING, read=str(settings.source))
    try:
        return uvloop.run(_run(settings, ruleset, args.wake_fd, args.metrics_fd))
    except SpoolError as exc:
        logs.event(log, "delivery_spool_error", level=logging.ERROR, error=str(exc))
        return 1


async def _run(settings: Settings, ruleset: RuleSet, wake_fd: int, metrics_fd: int | None) -> int:
    loop = asyncio.get_running_loop()
    spool = await Spool.open(settings.spool, full_sync=False)
    ctx = Context(settings=settings, rules=ruleset, spool=spool, stop=asyncio.Event())
    lock: int | None = None
    answering: asyncio.Task[None] | None = None
    try:
        loop.add_signal_handler(signal.SIGTERM, ctx.stop.set)
        loop.add_signal_handler(signal.SIGHUP, ctx.reload.set)
        _watch_parent(ctx, wake_fd)
        if metrics_fd is not None:
            channel = socket.socket(fileno=metrics_fd)
            answering = asyncio.create_task(_answer_requests(channel, ctx.reload))
        lock = await _lock(settings.spool / DELIVERY_LOCK, ctx.stop)
        if lock is None:
            return 0
        logs.event(
            log, "delivery_started", pid=os.getpid(), lock=str(settings.spool / DELIVERY_LOCK)
        )
        runtime.settle()
        return await _deliver(ctx)
    finally:
        if answering is not None:
            answering.cancel()
        await spool.close()
        if lock is not None:
            os.close(lock)  # after the spool closed: nothing of ours is written any more


async def _deliver(ctx: Context) -> int:
    running = runtime.start(ctx, TASKS)
    try:
        await runtime.wait_stop(ctx.stop, running)
    except Exception:
        log.exception("event=delivery_task_failed")
        return 1
    finally:
        ctx.stop.set()
        await runtime.stop_all(running)
    return 0


async def _lock(path: Path, stop: asyncio.Event) -> int | None:
    """The delivery lock, held (its fd), or None when told to stop while waiting for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    waiting = False
    while not stop.is_set():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not waiting:
                logs.event(
                    log,
                    "delivery_lock_busy",
                    level=logging.WARNING,
                    lock=str(path),
                    reason="another delivery process holds it; waiting",
                )
                waiting = True
        await wait_any(stop, seconds=LOCK_POLL)
    os.close(fd)
    return None


def _watch_parent(ctx: Context, fd: int) -> None:
    """Bytes on the wake pipe wake the delivery loop; EOF (relay serve gone) stops it."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            ctx.spool.wakeup.set()
            return
        loop.remove_reader(fd)
        os.close(fd)
        logs.event(log, "parent_gone", level=logging.WARNING, drain=PARENT_GONE_DRAIN)
        ctx.drain = min(ctx.drain, PARENT_GONE_DRAIN)
        ctx.stop.set()

    loop.add_reader(fd, readable)


async def _answer_requests(channel: socket.socket, reload: asyncio.Event) -> None:
    """relay serve's requests: a scrape (answered with its sequence number) or a reload."""
    loop = asyncio.get_running_loop()
    channel.setblocking(False)
    with channel:
        while request := await loop.sock_recv(channel, 64):
            if request == handover.RELOAD:
                reload.set()
                continue
            try:
                await loop.sock_sendall(channel, request + b"\n" + metrics.delivery_exposition())
            except OSError as exc:  # e.g. EMSGSIZE: the scrape goes without our part
                logs.event(log, "metrics_reply_failed", level=logging.WARNING, error=str(exc))


if __name__ == "__main__":
    sys.exit(main())
