"""py-spy on a live process while the bench measures, and a text summary of its samples.

`python -m bench --only backlog --profile DIR` records the delivery process
while it drains the backlog: DIR gets `drain.raw` (py-spy's collapsed stacks,
one `frame;frame;... count` line per distinct stack; flamegraph tools read it)
and `drain.txt`, the functions with the most samples, self and cumulative.

py-spy is not a dependency of relay: `.venv/bin/pip install py-spy`. It
samples from outside (ptrace), so the profiled process runs unmodified; at
100 samples/s it costs the target little, but the drain it measures is not
the bench's drain figure: compare figures from runs without --profile.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

RATE = 100  # samples per second
REPO = Path(__file__).resolve().parent.parent
_LINE = re.compile(r"\s*\((?P<file>[^()]*?)(?::\d+)?\)$")
# Paths from the venv's site-packages, the standard library and the checkout, made short.
_SHORTEN = re.compile(r"^.*/(site-packages|lib/python3\.\d+)/|^" + re.escape(f"{REPO}/"))


def pyspy() -> str | None:
    """py-spy next to this interpreter (the venv), else on PATH; None when not installed."""
    here = Path(sys.executable).with_name("py-spy")
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("py-spy")


class Recorder:
    """`py-spy record` of `pid` into `raw` from __enter__ until __exit__ (SIGINT: it writes)."""

    def __init__(self, pid: int, raw: Path) -> None:
        self.pid = pid
        self.raw = raw
        self.log = raw.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Recorder:
        exe = pyspy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.raw.parent.mkdir(parents=True, exist_ok=True)
        argv = [exe, "record", "--pid", str(self.pid), "--rate", str(RATE), "--threads"]
        argv += ["--format", "raw", "--output", str(self.raw)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.started
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _function(frame: str) -> str:
    """`name (path/to/file.py:123)` -> `name (file.py)`: one entry per function, not per line."""
    match = _LINE.search(frame)
    if match is None:
        return frame.strip()
    name = frame[: match.start()].strip()
    return f"{name} ({_SHORTEN.sub('', match.group('file'))})"


def summarize(raw: Path, *, seconds: float, top: int = 20) -> str:
    """Self and cumulative samples per function, and per thread, as a text table."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[0].startswith(("thread (", "process ")):
            threads[frames[0].partition(": ")[2] or frames[0]] += count
            frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += count
        names = [_function(f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            cumulative[name] += count
    if not total:
        return "no samples"
    busy = total / (RATE * seconds) if seconds else 0.0  # samples of idle threads are dropped
    lines = [
        f"{total} samples at {RATE}/s over {seconds:.1f} s: its threads were busy (not idle) "
        f"{busy:.2f} cores on average, summed",
        "",
        "threads: " + ", ".join(f"{name} {n / total:.0%}" for name, n in threads.most_common(6)),
        "",
        f"{'self':>6} {'cum':>6}  function (self: the leaf of the stack; cum: on the stack)",
    ]
    ranked = sorted(cumulative, key=lambda n: (own[n], cumulative[n]), reverse=True)[:top]
    for name in ranked:
        lines.append(f"{own[name] / total:6.1%} {cumulative[name] / total:6.1%}  {name}")
    lines += ["", f"{'cum':>6} {'self':>6}  by cumulative"]
    for name, n in cumulative.most_common(top):
        lines.append(f"{n / total:6.1%} {own[name] / total:6.1%}  {name}")
    return "\n".join(lines)
