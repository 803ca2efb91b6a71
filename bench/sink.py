"""Postfix's smtp-sink as the "original host": accepts everything, counts messages.

smtp-sink -c rewrites a `sess=N quit=N mesg=N` counter line (ending in CR) on
stdout whenever a message completes; `count()` reads the last one from the
log file, so counting costs the sink nothing.
"""

from __future__ import annotations

import os
import pwd
import re
import time
from pathlib import Path

from bench import tools

_MESG = re.compile(rb"mesg=(\d+)")


def _unprivileged_user() -> str:
    for name in ("postfix", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise tools.ToolMissing("no 'postfix' or 'nobody' user for smtp-sink -u")


class Sink:
    """smtp-sink on a loopback port (started by `start()`, stopped by `stop()`)."""

    def __init__(self, workdir: Path, port: int | None = None, *, name: str = "sink") -> None:
        self.port = port or tools.free_port()
        self.workdir = workdir
        self.name = name
        self.proc: tools.Proc | None = None

    def start(self) -> Sink:
        argv = [tools.tool("smtp-sink"), "-c", "-m", "512"]
        if os.geteuid() == 0:
            argv += ["-u", _unprivileged_user()]
        argv += [f"{tools.HOST}:{self.port}", "1024"]
        self.proc = tools.Proc(self.name, argv, self.workdir / f"{self.name}.log")
        tools.wait_banner(self.port, 10, self.proc)
        return self

    def count(self) -> int:
        """Messages completed so far (the counter smtp-sink last printed)."""
        if self.proc is None:
            return 0
        path = self.proc.log
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - 256))
                found = _MESG.findall(fh.read())
        except OSError:
            return 0
        return int(found[-1]) if found else 0

    def wait_for(
        self, total: int, timeout: float, *, stall: float | None = None, poll: float = 0.02
    ) -> float | None:
        """Seconds until `total` messages have arrived; None if the deadline passed first,
        or if nothing new arrived for `stall` seconds."""
        start = time.monotonic()
        deadline = start + timeout
        last, last_change = self.count(), start
        while time.monotonic() < deadline:
            now_count = self.count()
            if now_count >= total:
                return time.monotonic() - start
            if now_count != last:
                last, last_change = now_count, time.monotonic()
            elif stall is not None and time.monotonic() - last_change > stall:
                return None
            time.sleep(poll)
        return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
