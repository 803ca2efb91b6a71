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
from collections import Counter, defaultdict
from pathlib import Path

from bench import tools

RATE = 100  # samples per second
REPO = Path(__file__).resolve().parent.parent
_THREAD = re.compile(r"thread \((?P<tid>\w+)\): ?(?P<name>.*)$")
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
        self._cpu_before: dict[int, float] = {}
        self.thread_cpu: dict[int, float] = {}  # CPU seconds per native thread id, while recording

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
        self._cpu_before = tools.thread_cpu(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.started
        after = tools.thread_cpu(self.pid)
        self.thread_cpu = {t: s - self._cpu_before.get(t, 0.0) for t, s in after.items()}
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


def _stacks(raw: Path) -> list[tuple[int | None, str, list[str], int]]:
    """(thread id, thread name, frames root first, samples) per line of py-spy's raw output."""
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        tid, name = None, ""
        if match := _THREAD.match(frames[0]):
            tid, name = int(match.group("tid"), 0), match.group("name")
            frames = frames[1:]
        stacks.append((tid, name, [_function(f) for f in frames], int(count_text)))
    return stacks


def summarize(
    raw: Path, *, seconds: float, thread_cpu: dict[int, float] | None = None, top: int = 20
) -> str:
    """Self and cumulative time per function, as a text table.

    py-spy drops the samples of threads it sees idle, but on a busy machine a
    thread that is runnable and waiting for a core looks busy too: the logging
    listener and the idle thread pools then collect samples without spending
    CPU. With `thread_cpu` (CPU seconds per thread id over the recording, from
    /proc) each thread's samples are scaled to the CPU it really spent, so the
    shares below are shares of CPU time; without it, of samples.
    """
    stacks = _stacks(raw)
    per_thread: Counter[int | None] = Counter()
    names: dict[int | None, str] = {}
    for tid, name, _, count in stacks:
        per_thread[tid] += count
        names[tid] = name or str(tid)
    weight = {
        tid: thread_cpu[tid] / n if thread_cpu and tid in thread_cpu else 1 / RATE
        for tid, n in per_thread.items()
    }
    own: defaultdict[str, float] = defaultdict(float)
    cumulative: defaultdict[str, float] = defaultdict(float)
    for tid, _, functions, count in stacks:
        if not functions:
            continue
        own[functions[-1]] += count * weight[tid]
        for name in set(functions):
            cumulative[name] += count * weight[tid]
    total = sum(own.values())
    if not total:
        return "no samples"
    samples = sum(per_thread.values())
    lines = [
        f"{samples} samples at {RATE}/s over {seconds:.1f} s; "
        + (
            f"{total:.1f} CPU seconds (/proc), {total / seconds:.2f} cores on average"
            if thread_cpu
            else "shares of samples (no CPU times given)"
        ),
        "by thread, samples / CPU s: "
        + ", ".join(
            f"{names[tid]} {n / samples:.0%}"
            + (f" / {thread_cpu.get(tid, 0.0):.1f} s" if thread_cpu and tid is not None else "")
            for tid, n in per_thread.most_common(6)
        ),
        "",
        f"{'self':>6} {'cum':>6}  function (self: the leaf of the stack; cum: on the stack)",
    ]
    ranked = sorted(cumulative, key=lambda n: (own[n], cumulative[n]), reverse=True)[:top]
    for name in ranked:
        lines.append(f"{own[name] / total:6.1%} {cumulative[name] / total:6.1%}  {name}")
    lines += ["", f"{'cum':>6} {'self':>6}  by cumulative"]
    for name, n in sorted(cumulative.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{n / total:6.1%} {own[name] / total:6.1%}  {name}")
    return "\n".join(lines)
