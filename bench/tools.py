"""Finding Debian's tools, picking loopback ports, and owning child processes.

Every process the bench starts goes through `Proc`, a context manager that
stops it (SIGTERM, then SIGKILL after a deadline) even when a section fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HOST = "127.0.0.1"
_FALLBACK_DIRS = ("/usr/sbin", "/usr/lib/postfix/sbin")


class ToolMissing(RuntimeError):
    """A Debian tool the bench needs (postfix, smtp-sink, php, ...) is not installed."""


@cache
def daemon_directory() -> Path | None:
    """Postfix's daemon_directory (smtpd, master, ...), or None without postconf."""
    postconf = _which("postconf")
    if postconf is None:
        return None
    out = subprocess.run(
        [postconf, "-h", "daemon_directory"], capture_output=True, text=True, timeout=10
    )
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in _FALLBACK_DIRS:
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tool(name: str) -> str:
    """Absolute path of a Debian tool; PATH first, then the Postfix directories."""
    found = _which(name)
    if found is None and name not in ("postconf",):
        daemon = daemon_directory()
        if daemon is not None and os.access(daemon / name, os.X_OK):
            found = str(daemon / name)
    if found is None:
        raise ToolMissing(f"{name} not found (Debian packages postfix, php-cli, libphp-phpmailer)")
    return found


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_banner(port: int, timeout: float, proc: Proc | None = None) -> None:
    """Wait until an SMTP server on `port` answers its 220 greeting."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered 220 on {HOST}:{port} within {timeout:.0f} s ({last})")


def wait_port(port: int, timeout: float, proc: Proc | None = None) -> None:
    """Wait until something accepts TCP connections on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {HOST}:{port} within {timeout:.0f} s")


class Proc:
    """A child process in its own session, stopped and reaped on exit.

    Output goes to a log file (never a pipe nobody reads), so a chatty child
    cannot block; `tail()` shows its end when something fails.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self._logfile = log.open("wb")
        self.popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 2000) -> str:
        if not self._logfile.closed:
            self._logfile.flush()
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the whole process group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._logfile.close()
        return self.popen.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, in KiB; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib(pid: int) -> int | None:
    """VmRSS (current resident set) of a live process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """Proportional set size (shared pages split among their users) of a process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3, state, is index 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Live processes below `pid` (children, grandchildren, ...), from /proc's parent ids."""
    parents: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        child = int(status.parent.name)
        fields = _stat_fields(child)
        if fields is not None and len(fields) > 1 and fields[1].isdigit():
            parents.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuTree:
    """CPU seconds of a process tree at one moment, from /proc/PID/stat.

    `own`: utime + stime of the live processes (root and descendants);
    `reaped`: cutime + cstime of the same processes, the time of children that
    exited and were waited for by one of them (Postfix's master reaps each smtpd,
    cleanup and smtp that exits after max_idle / max_use). The sum only grows:
    when a child exits and is reaped, its time moves from `own` to its parent's
    `reaped`. A child that has exited but not been reaped yet is a zombie whose
    time is still in its own stat line, so it is counted once either way.
    """

    own: float
    reaped: float
    processes: int

    @property
    def total(self) -> float:
        return self.own + self.reaped


_TICK = float(os.sysconf("SC_CLK_TCK"))


def thread_cpu(pid: int) -> dict[int, float]:
    """utime + stime in seconds of each live thread of `pid`, by native thread id."""
    seconds = {}
    for stat in Path(f"/proc/{pid}/task").glob("[0-9]*/stat"):
        tid = int(stat.parent.name)
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        seconds[tid] = (int(fields[11]) + int(fields[12])) / _TICK
    return seconds


def process_cpu(pid: int) -> float:
    """utime + stime in seconds of the live process `pid` (0.0 when it is gone)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0


def cpu_tree(pid: int) -> CpuTree | None:
    """CpuTree of `pid` and every live process below it; None when `pid` is gone."""
    own = reaped = 0.0
    count = 0
    for member in [pid, *descendants(pid)]:
        fields = _stat_fields(member)
        if fields is None:
            if member == pid:
                return None
            continue
        # fields[11:15]: utime, stime, cutime, cstime (stat fields 14-17), in clock ticks
        own += (int(fields[11]) + int(fields[12])) / _TICK
        reaped += (int(fields[13]) + int(fields[14])) / _TICK
        count += 1
    return CpuTree(own=own, reaped=reaped, processes=count)


def wait_cpu_idle(
    pid: int, *, quiet: float = 0.05, window: float = 0.5, timeout: float = 15.0
) -> CpuTree | None:
    """The tree's CpuTree once it uses under `quiet` cores over `window` s (at most `timeout` s).

    After the sink has every mail both servers still finish up (relay records
    the outcomes, Postfix's qmgr removes the queue files): that is work for the
    same mails, so the reading is taken once the tree has gone (nearly) idle.
    """
    deadline = time.monotonic() + timeout
    last = cpu_tree(pid)
    while last is not None and time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_tree(pid)
        if now is None:
            return last
        busy = (now.total - last.total) / window
        last = now
        if busy < quiet:
            break
    return last
