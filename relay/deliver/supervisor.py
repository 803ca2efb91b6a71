"""`relay serve`'s side of the delivery process: start it, wake it, scrape it, restart it, stop it.

    DEFAULT_TASKS -> delivery_process(ctx):
      start `python -m relay.deliver.process --wake-fd R --metrics-fd S ...`, and hand it
        the settings and rules in effect here on its stdin (a file edited since is not read)
      spool.wakeup (a committed add) -> one byte down the wake pipe (dropped when full)
      /metrics -> b"SEQ" on the metrics socketpair -> b"SEQ\\n" + the child's exposition
      SIGHUP here -> b"reload" on the same socketpair: both reload relay.yaml and the rules
        (the child's are the ones that classify; an invalid file keeps the old ones in
        each). Not a signal: one arriving before the child's handler is set would end it
      the child exits on its own -> event=delivery_process_died, started again after 1 s,
        2 s, ... 30 s (back to 1 s after a minute of running)
      ctx.stop -> SIGTERM, the child drains its sends; SIGKILL after drain + STOP_GRACE
      every LIVENESS_EVERY s a scrape doubles as a ping: LIVENESS_MISSES unanswered in a
        row (its event loop is stuck) -> event=delivery_process_hung, SIGKILL, restart

The receiving side (this process) keeps the listener, the spool's adds and
/metrics; delivery gets its own core and its own SQLite connection. The child
exits when the wake pipe reaches EOF, that is when this process is gone, however
it died; a lock in the spool directory keeps a second one from delivering
meanwhile (relay.deliver.process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

from relay import logs, metrics
from relay.deliver import handover
from relay.runtime import Context, wait_any

log = logging.getLogger("relay.delivery_process")

RESTART_FIRST = 1.0  # seconds before starting a delivery process that died
RESTART_MAX = 30.0
STABLE_AFTER = 60.0  # a child that ran this long gets RESTART_FIRST again
STOP_GRACE = 5.0  # seconds beyond the child's drain before SIGKILL
SCRAPE_TIMEOUT = 2.0
LIVENESS_EVERY = 10.0  # seconds between pings of the child's event loop
LIVENESS_MISSES = 3  # unanswered pings in a row before the child is killed and restarted
SCRAPE_MAX = 1 << 20  # one reply is one SOCK_SEQPACKET message
# systemd's notify socket is for the main process (NotifyAccess=main); the port file is ours.
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RELAY_PORT_FILE")


class Child:
    """One run of the delivery process and this side's ends of its wake pipe and socket."""

    def __init__(self, proc: asyncio.subprocess.Process, wake: int, channel: socket.socket):
        self.proc = proc
        self.pid = proc.pid
        self._wake = wake
        self._channel = channel
        self._scraping = asyncio.Lock()
        self._seq = 0

    @classmethod
    async def start(cls, ctx: Context) -> Child:
        wake_read, wake_write = os.pipe()  # not inheritable: only the child gets wake_read
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc: asyncio.subprocess.Process | None = None
        try:
            os.set_blocking(wake_write, False)
            ours.setblocking(False)
            argv = [
                sys.executable,
                "-m",
                "relay.deliver.process",
                "--wake-fd",
                str(wake_read),
                "--metrics-fd",
                str(theirs.fileno()),
                "--log-format",
                ctx.log_format,
                "--log-level",
                str(logging.getLogger().getEffectiveLevel()),
            ]
            env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(wake_read, theirs.fileno()),
            )
            await _hand_over(proc, ctx)
        except BaseException:
            os.close(wake_write)
            ours.close()
            if proc is not None and proc.returncode is None:
                proc.kill()  # never a delivery process left behind, unwatched
            raise
        finally:
            os.close(wake_read)
            theirs.close()
        return cls(proc, wake_write, ours)

    def wake(self) -> None:
        """New mail. A full pipe means the child has not read the last bytes: it is awake."""
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._wake, b"w")

    def reload(self) -> None:
        """Ask the child to reload relay.yaml and the rules. It reads the request once its
        loop runs, however early this comes (uvloop's spawn unblocks every signal in the
        child, so a SIGHUP during its half second of imports would end it)."""
        # A few bytes into a socket buffer of ~200 KB that the child empties all the time.
        # Gone: the next child is handed what relay serve runs on once it has reloaded.
        with contextlib.suppress(OSError):
            self._channel.send(handover.RELOAD)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    async def scrape(self) -> bytes | None:
        """The child's metrics text, or None when it does not answer in SCRAPE_TIMEOUT."""
        loop = asyncio.get_running_loop()
        async with self._scraping:
            self._seq += 1
            tag = str(self._seq).encode()
            try:
                async with asyncio.timeout(SCRAPE_TIMEOUT):
                    await loop.sock_sendall(self._channel, tag)
                    while reply := await loop.sock_recv(self._channel, SCRAPE_MAX):
                        seq, _, text = reply.partition(b"\n")
                        if seq == tag:  # not a late answer to a scrape that timed out
                            return text
            except (TimeoutError, OSError) as exc:
                logs.event(
                    log,
                    "delivery_metrics_missing",
                    level=logging.WARNING,
                    pid=self.pid,
                    error=repr(exc),
                )
        return None

    async def stop(self, drain: float) -> int:
        """SIGTERM; SIGKILL if it has not exited after `drain` + STOP_GRACE seconds."""
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(self.proc.wait()), drain + STOP_GRACE)
        except TimeoutError:
            logs.event(
                log,
                "delivery_process_killed",
                level=logging.WARNING,
                pid=self.pid,
                waited=drain + STOP_GRACE,
            )
            self.signal(signal.SIGKILL)
            return await self.proc.wait()

    def close(self) -> None:
        os.close(self._wake)
        self._channel.close()


async def _hand_over(proc: asyncio.subprocess.Process, ctx: Context) -> None:
    """The settings and rules in effect here, down the child's stdin (relay.deliver.handover):
    the ones it runs on, not the files as they are now (an invalid edit, or a new `spool:`
    not applied yet, would stop a restarted child from delivering what this one accepts)."""
    assert proc.stdin is not None
    # It died at once: logged as any exit. uvloop raises RuntimeError on writing to the
    # closed pipe; it went up and stopped relay serve.
    with contextlib.suppress(ConnectionError, RuntimeError):
        proc.stdin.write(handover.pack(ctx.settings, ctx.rules))
        await proc.stdin.drain()
    proc.stdin.close()


class Supervisor:
    """Keeps one delivery process running while the service runs."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.child: Child | None = None

    async def scrape(self) -> bytes | None:
        return await self.child.scrape() if self.child is not None else None

    def forward_reload(self) -> None:
        if self.child is not None:
            self.child.reload()

    async def run(self) -> None:
        delay = RESTART_FIRST
        while not self.ctx.stop.is_set():
            started = time.monotonic()
            try:
                died = await self._run_once()
            except Exception as exc:  # fork/exec failed (memory, pids, fds), or a bug here:
                died = None  # relay serve never stops for its child, as Postfix's master(8)
                logs.event(
                    log,
                    "delivery_process_start_failed",
                    level=logging.ERROR,
                    error=repr(exc),
                    restart_in=delay,
                )
            if self.ctx.stop.is_set():
                return
            if time.monotonic() - started > STABLE_AFTER:
                delay = RESTART_FIRST
            if died is not None:
                metrics.DELIVERY_RESTARTS.inc()
                logs.event(
                    log,
                    "delivery_process_died",
                    level=logging.ERROR,
                    pid=died[0],
                    returncode=died[1],
                    restart_in=delay,
                )
            await wait_any(self.ctx.stop, seconds=delay)
            delay = min(delay * 2, RESTART_MAX)

    async def _run_once(self) -> tuple[int, int] | None:
        """Start a child and watch it: (pid, exit code) if it ended on its own, else None."""
        child = self.child = await Child.start(self.ctx)
        metrics.DELIVERY_UP.set(1)
        logs.event(log, "delivery_process_started", pid=child.pid)
        forward = asyncio.create_task(self._forward_wakeups(child))
        watch = asyncio.create_task(_watch_liveness(child))
        exited = asyncio.ensure_future(child.proc.wait())
        stopped = asyncio.ensure_future(self.ctx.stop.wait())
        try:
            await asyncio.wait([exited, stopped], return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                return child.pid, exited.result()
            code = await child.stop(self.ctx.drain)
            logs.event(log, "delivery_process_stopped", pid=child.pid, returncode=code)
            return None
        finally:
            for waiter in (forward, watch, exited, stopped):
                waiter.cancel()
            if child.proc.returncode is None:  # cancelled: never leave a delivery behind
                child.signal(signal.SIGKILL)
            self.child = None
            metrics.DELIVERY_UP.set(0)
            child.close()

    async def _forward_wakeups(self, child: Child) -> None:
        wakeup = self.ctx.spool.wakeup
        while True:
            await wakeup.wait()
            wakeup.clear()
            child.wake()


async def _watch_liveness(child: Child) -> None:
    """Kill a child whose event loop stopped answering (a hang is not a crash: without
    this, mail would be accepted and never delivered); `run` then starts a new one."""
    misses = 0
    while misses < LIVENESS_MISSES:
        await asyncio.sleep(LIVENESS_EVERY)
        misses = 0 if await child.scrape() is not None else misses + 1
    logs.event(
        log,
        "delivery_process_hung",
        level=logging.ERROR,
        pid=child.pid,
        unanswered=misses,
        every=LIVENESS_EVERY,
    )
    child.signal(signal.SIGKILL)


async def delivery_process(ctx: Context) -> None:
    """Run the delivery process until stop; then stop it, bounded."""
    supervisor = Supervisor(ctx)
    ctx.delivery_metrics = supervisor.scrape
    ctx.on_reload_signal.append(supervisor.forward_reload)
    await supervisor.run()
