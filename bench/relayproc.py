"""`relay serve` as a child process with a temp relay.yaml, spool and rules file.

The bench picks the listen port (bind 0, close, reuse) and waits for the 220
greeting. Delivery goes to `upstream_port` (an smtp-sink, or a closed port to
keep mail queued) and, with `ses`, SES-routed mail to a fake SES endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import tools

RULES_UPSTREAM = "default: upstream\nrules: []\n"
RULES_SES = """\
default: upstream
rules:
  - name: bench-all
    route: ses
    match: {sender: '.'}
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class SesTarget:
    endpoint_url: str
    max_send_rate: float | None  # None: auto (90% of GetSendQuota's MaxSendRate)
    fallback_after: float = 3600.0


def relay_argv() -> list[str]:
    """The `relay` console script of this interpreter's environment, else `python -c`."""
    script = Path(sys.executable).with_name("relay")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("relay")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from relay.cli import main; sys.exit(main())"]


def available() -> str | None:
    """None when `relay serve` can run here, else why not (its modules have not landed)."""
    try:
        import relay.service  # noqa: F401
    except ImportError as exc:
        return f"relay serve not available yet ({exc})"
    return None


def delivers(workdir: Path, timeout: float = 8.0) -> str | None:
    """None when `relay serve` delivers a mail to its upstream, else why not (probe)."""
    from bench import loads, sink

    with (
        sink.Sink(workdir, name="sink-probe") as probe_sink,
        Relay(workdir, name="relay-probe", upstream_port=probe_sink.port) as relay,
    ):
        loads.sequential(relay.port, count=1, size=512)
        if probe_sink.wait_for(1, timeout) is None:
            return f"relay serve accepted a probe mail but did not deliver it within {timeout:g} s"
    return None


class Relay:
    """One `relay serve` with its own directory under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "relay",
        upstream_port: int,
        ses: SesTarget | None = None,
        retry_schedule: tuple[float, ...] = (60.0,),
        deliverers: int | None = None,
        command: list[str] | None = None,
    ) -> None:
        """`command`: the `relay` to run (another checkout's, for A/B); this environment's
        by default."""
        self.name = name
        self.dir = workdir / name
        self.port = tools.free_port()
        self.upstream_port = upstream_port
        self.ses = ses
        self.retry_schedule = retry_schedule
        self.deliverers = deliverers
        self.command = command or relay_argv()
        self.proc: tools.Proc | None = None
        self.peak_rss_kib: int | None = None

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        rules = self.dir / "rules.yaml"
        rules.write_text(RULES_SES if self.ses else RULES_UPSTREAM)
        schedule = ", ".join(f"{s:g}" for s in self.retry_schedule)
        lines = [
            f"listen: {tools.HOST}:{self.port}",
            "spool: spool",
            "rules: rules.yaml",
            "hostname: relay.bench.invalid",
            "metrics: null",
            f"upstream: {{host: {tools.HOST}, port: {self.upstream_port}, security: none,"
            " timeout: 10}",
            f"retry: {{schedule: [{schedule}], max_age: 86400}}",
        ]
        if self.deliverers:
            lines.append(f"deliverers: {self.deliverers}")
        if self.ses:
            rate = self.ses.max_send_rate
            lines.append(
                f"ses: {{enabled: true, region: us-east-1, endpoint_url: '{self.ses.endpoint_url}',"
                f" max_send_rate: {'auto' if rate is None else f'{rate:g}'},"
                f" fallback_after: {self.ses.fallback_after:g}}}"
            )
        else:
            lines.append("ses: {enabled: false}")
        config = self.dir / "relay.yaml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 30) -> Relay:
        self.spawn()
        return self.ready(timeout)

    def spawn(self) -> Relay:
        """Start `relay serve` without waiting for it (`ready` waits): several relays start
        side by side."""
        config = self.write_config()
        env = dict(os.environ)
        # Dummy credentials for the fake SES; no shared files, no botocore retries of its own.
        env.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_PROFILE", "RELAY_CONFIG"):
            env.pop(name, None)
        argv = [*self.command, "serve", "--config", str(config)]
        self.proc = tools.Proc(self.name, argv, self.dir / "relay.log", env=env, cwd=self.dir)
        return self

    def ready(self, timeout: float = 30) -> Relay:
        """Wait for the 220 and for the delivery process to be up."""
        assert self.proc is not None, "spawn() first"
        tools.wait_banner(self.port, timeout, self.proc)
        # Measure delivery, not its start: the delivery process is up, holds the spool's
        # lock and (with SES) has its quota, as a relay that has been running for a while.
        ready = ["event=delivery_started "] + (["event=ses_quota"] if self.ses else [])
        self.wait_log(ready, timeout)
        return self

    def wait_log(self, needles: list[str], timeout: float) -> None:
        """Wait until every one of `needles` is in relay.log."""
        deadline = time.monotonic() + timeout
        log = self.dir / "relay.log"
        while not all(n in log.read_text(errors="replace") for n in needles):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {needles} in {log} within {timeout:g} s")
            time.sleep(0.05)

    def queue_stats(self) -> dict[str, int]:
        """`relay queue stats --json` counts by state (queued, inflight, deferred, sent, failed)."""
        done = subprocess.run(
            [*self.command, "queue", "--config", str(self.dir / "relay.yaml"), "stats", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.dir,
        )
        if done.returncode != 0:
            raise RuntimeError(f"relay queue stats failed: {done.stderr.strip()[-300:]}")
        counts: dict[str, int] = json.loads(done.stdout)["counts"]
        return counts

    def pids(self) -> list[int]:
        """relay serve and the processes below it (its delivery process)."""
        return [self.proc.pid, *tools.descendants(self.proc.pid)] if self.proc else []

    def rss_peak(self) -> int | None:
        """VmHWM of relay serve plus that of its delivery process, in KiB.

        Each process's own peak, summed: at most the peak of the sum (the two
        peaks need not fall at the same moment). A delivery process that was
        restarted takes its predecessor's peak with it.
        """
        sizes = [tools.peak_rss_kib(pid) for pid in self.pids()]
        return sum(s for s in sizes if s) or None

    def pss_now(self) -> int | None:
        """PSS of relay serve plus its delivery process, in KiB (shared pages split)."""
        sizes = [tools.pss_kib(pid) for pid in self.pids()]
        return sum(s for s in sizes if s) or None

    def cpu(self) -> tools.CpuTree | None:
        """CPU seconds so far of relay serve and its delivery process (see tools.CpuTree)."""
        return tools.cpu_tree(self.proc.pid) if self.proc else None

    def rss_now(self) -> int | None:
        """VmRSS of relay serve plus its delivery process, in KiB."""
        sizes = [tools.rss_kib(pid) for pid in self.pids()]
        return sum(s for s in sizes if s) or None

    def stop(self) -> None:
        if self.proc is not None:
            self.peak_rss_kib = self.rss_peak() or self.peak_rss_kib
            self.proc.stop(timeout=30)
            self.proc = None

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
