"""SES route against the fake SES (tests/support/fakeses/): pacing and a shared quota.

Every scenario starts its own fake (`python -m tests.support.fakeses`), one smtp-sink as
the original host (mail that falls back lands there) and one or more
`relay serve` whose rules send everything to SES. The fake's
`/fake-ses/stats` is polled while the queue drains, so rates come from the
receiving side: recipients the fake accepted per second, throttle replies per
call, and nothing lost (accepted by SES + fallen back >= injected).

Issue 14's scenarios (`Shared`) run three relays on one quota whose mail arrives
0-2 s apart, one relay joining later, one leaving early, or another sender
beside them (`OtherSender`, straight to the fake). Each relay's share comes from
the `event=sent route=ses` lines of its own log, over the time all relays send.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import importlib.util
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loads, relayproc, sink, tools
from bench.report import Report
from bench.sections import Params

REPO = Path(__file__).resolve().parent.parent
STALL = 20.0  # seconds without progress before a scenario gives up


def unavailable() -> str | None:
    """None when the SES scenarios can run, else why not."""
    if not (REPO / "tests" / "support" / "fakeses").is_dir():
        return "tests/support/fakeses/ has not landed"
    missing = relayproc.available()
    if missing:
        return missing
    for module in ("relay.deliver", "relay.deliver.ses.pace", "relay.deliver.ses.client"):
        if importlib.util.find_spec(module) is None:
            return f"{module} has not landed"
    return None


class FakeSes:
    """`python -m tests.support.fakeses` on a loopback port the bench picked."""

    def __init__(self, workdir: Path, name: str, *, rate_limit: float, latency: float) -> None:
        self.port = tools.free_port()
        self.url = f"http://{tools.HOST}:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "tests.support.fakeses",
            "--host",
            tools.HOST,
            "--port",
            str(self.port),
            "--rate-limit",
            f"{rate_limit:g}",
            "--latency",
            f"{latency:g}",
        ]
        self.proc = tools.Proc(name, argv, workdir / f"{name}.log", cwd=REPO)
        try:
            tools.wait_port(self.port, 15, self.proc)
        except BaseException:
            self.proc.stop()
            raise

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/fake-ses/stats", timeout=5) as answer:
            result: dict[str, Any] = json.load(answer)
            return result

    def stop(self) -> None:
        self.proc.stop(timeout=10)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    title: str
    rate_limit: float  # the fake's recipients/s
    relays: tuple[float | None, ...]  # max_send_rate of each relay; None = auto
    mails: int
    latency: float = 0.02


def _settled_rate(timeline: list[tuple[float, int]]) -> float | None:
    """Accepted/s over the second half of the time SES was accepting."""
    moving = [(t, n) for t, n in timeline if n > 0]
    if len(moving) < 3:
        return None
    t0, t1 = moving[0][0], moving[-1][0]
    half = [(t, n) for t, n in moving if t >= (t0 + t1) / 2]
    if len(half) < 2 or half[-1][0] <= half[0][0]:
        return None
    return (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0])


def _start(
    stack: contextlib.ExitStack, base: Path, upstream_port: int, targets: list[relayproc.SesTarget]
) -> list[relayproc.Relay]:
    """One relay per target, started side by side, each stopped when `stack` closes."""
    relays = []
    for i, target in enumerate(targets):
        relay = relayproc.Relay(base, name=f"relay{i}", upstream_port=upstream_port, ses=target)
        stack.callback(relay.stop)
        relays.append(relay.spawn())
    return [relay.ready() for relay in relays]


def run_scenario(workdir: Path, sc: Scenario, p: Params, report: Report) -> dict[str, Any]:
    """Inject `sc.mails` split over the relays; wait until SES + fallback have them all."""
    base = workdir / sc.name
    base.mkdir()
    expected = sc.mails / (0.9 * sc.rate_limit)
    deadline = min(p.wait, 2 * expected + 10)
    with contextlib.ExitStack() as stack:
        fake = FakeSes(base, "fakeses", rate_limit=sc.rate_limit, latency=sc.latency)
        stack.callback(fake.stop)
        fallback = stack.enter_context(sink.Sink(base, name="sink-fallback"))
        targets = [relayproc.SesTarget(endpoint_url=fake.url, max_send_rate=r) for r in sc.relays]
        relays = _start(stack, base, fallback.port, targets)
        rates = ", ".join("auto" if r is None else f"{r:g}" for r in sc.relays)
        report.progress(
            f"ses {sc.name}: {sc.mails} mails, {len(relays)} relay(s) max_send_rate {rates}, "
            f"fake limit {sc.rate_limit:g} rcpt/s, latency {sc.latency * 1000:.0f} ms"
        )
        share = sc.mails // len(relays)
        total = share * len(relays)
        sources = [
            subprocess.Popen(
                loads.smtp_source_argv(r.port, messages=share, sessions=5, size=2048),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in relays
        ]
        start = time.monotonic()
        timeline: list[tuple[float, int]] = []
        last_progress, last_seen = start, -1
        stats: dict[str, Any] = {}
        try:
            while time.monotonic() - start < deadline:
                stats = fake.stats()
                seen = stats["accepted"] + fallback.count()
                now = time.monotonic()
                timeline.append((now - start, stats["accepted"]))
                if seen >= total:
                    break
                if seen != last_seen:
                    last_progress, last_seen = now, seen
                elif now - last_progress > STALL:
                    break
                time.sleep(0.25)
        finally:
            for proc in sources:
                try:
                    _, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    err = "timed out"
                if proc.returncode:
                    raise RuntimeError(f"smtp-source into relay failed: {err[-300:]}")
        elapsed = time.monotonic() - start
        # Spool first, then the receiving side: mail only moves from the spool to
        # SES or the sink, so this order can count a mail twice, never miss one.
        pending = failed = 0
        for relay in relays:
            counts = relay.queue_stats()
            pending += sum(counts.get(k, 0) for k in ("queued", "inflight", "deferred"))
            failed += counts.get("failed", 0)
        stats = fake.stats()
        fell_back = fallback.count()
    accepted = stats.get("accepted", 0)
    span = (stats["last"] - stats["first"]) if stats.get("first") is not None else 0.0
    rate = (stats["recipients"] - 1) / span if span > 0 else None
    settled = _settled_rate(timeline)
    result = {
        "injected": total,
        "accepted_by_ses": accepted,
        "fell_back_upstream": fell_back,
        "still_queued": pending,
        "failed": failed,
        "lost": max(0, total - accepted - fell_back - pending - failed),
        "calls": stats.get("calls", 0),
        "throttles": stats.get("throttles", 0),
        "rate": rate,
        "settled_rate": settled,
        "share_of_limit": None if rate is None else rate / sc.rate_limit,
        "settled_share": None if settled is None else settled / sc.rate_limit,
        "throttle_share": stats.get("throttles", 0) / max(1, stats.get("calls", 0)),
        "seconds": elapsed,
        "complete": accepted + fell_back >= total,
    }
    report.progress(
        f"ses {sc.name}: {accepted}/{total} via SES, {fell_back} fell back, "
        f"rate {rate or 0:.1f}/s ({100 * (result['share_of_limit'] or 0):.0f}% of limit), "
        f"{result['throttles']} throttles in {result['calls']} calls, "
        f"{pending} still queued at the deadline ({elapsed:.0f} s)"
    )
    return result


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def run(workdir: Path, p: Params, report: Report) -> None:
    """The four SES scenarios of issue 6; rows with goals where the issue sets them."""
    scenarios = {
        "auto100": Scenario(
            name="auto100",
            title="1 relay, max_send_rate auto, fake limit 100 rcpt/s",
            rate_limit=100,
            relays=(None,),
            mails=p.ses_mails,
        ),
        "shared60": Scenario(
            name="shared60",
            title="3 relays x max_send_rate 60, one quota of 60 rcpt/s",
            rate_limit=60,
            relays=(60, 60, 60),
            mails=p.ses_multi_mails,
        ),
        "exact20": Scenario(
            name="exact20",
            title="max_send_rate 20 vs limit 20",
            rate_limit=20,
            relays=(20,),
            mails=p.pacing_mails,
        ),
        "over50": Scenario(
            name="over50",
            title="max_send_rate 50 vs limit 20",
            rate_limit=20,
            relays=(50,),
            mails=p.pacing_mails,
        ),
    }
    results = {
        name: run_scenario(workdir, sc, p, report)
        for name, sc in scenarios.items()
        if p.ses_single is None or name in p.ses_single
    }
    shared = {
        sc.name: run_shared(workdir, sc, p, report)
        for sc in shared_scenarios(p)
        if p.ses_shared is None or sc.name in p.ses_shared
    }
    results.update(shared)
    report.details["ses"] = results
    incomplete = {n: r["still_queued"] for n, r in results.items() if not r["complete"]}
    if incomplete:
        report.sections["ses"] = (
            f"partial: mails still queued at the deadline {incomplete} (rates are still valid)"
        )
    rows = [
        *_single_rows(scenarios, results),
        dict(
            metric="SES all scenarios: mails lost",
            unit="mails",
            relay=sum(r["lost"] for r in results.values()),
            goal=0,
            op="<=",
            note="lost = injected - accepted by SES - fallen back upstream - still in the spool "
            "(queued/inflight/deferred, per `relay queue stats`) - failed",
        ),
        dict(
            metric="SES all scenarios: fell back upstream or failed",
            unit="mails",
            relay=sum(r["fell_back_upstream"] + r["failed"] for r in results.values()),
        ),
    ]
    for sc in shared_scenarios(p):
        if sc.name not in shared:
            continue
        r = shared[sc.name]
        rows += [
            dict(
                metric=f"SES {sc.title}: used",
                unit="% of what the quota leaves",
                relay=_pct(r["used"]),
                goal=95,
                op=">=",
                note=r["note"],
            ),
            dict(
                metric=f"SES {sc.title}: throttled",
                unit="% of calls",
                relay=_pct(r["throttle_share"]),
                goal=1,
                op="<",
            ),
            dict(
                metric=f"SES {sc.title}: smallest relay",
                unit="% of the fair share",
                relay=_pct(r["least"]),
                goal=70,
                op=">=",
            ),
        ]
    for row in rows:
        report.add(section="ses", **row)


def _single_rows(
    scenarios: dict[str, Scenario], results: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The rows of issue 6's scenarios that ran (a quick run leaves some out)."""
    rows: list[dict[str, Any]] = []
    if "auto100" in results:
        a = results["auto100"]
        rows += [
            dict(
                metric=f"SES {scenarios['auto100'].title}: rate",
                unit="% of limit",
                relay=_pct(a["share_of_limit"]),
                note=f"{a['injected']} mails, 20 ms latency; auto = 90% of GetSendQuota",
            ),
            dict(
                metric="SES 1 relay auto vs 100/s: throttle replies",
                unit="replies",
                relay=a["throttles"],
            ),
        ]
    if "shared60" in results:
        s = results["shared60"]
        rows += [
            dict(
                metric=f"SES {scenarios['shared60'].title}: aggregate rate",
                unit="% of limit",
                relay=_pct(s["share_of_limit"]),
                goal=90,
                op=">=",
                note=f"{s['injected']} mails split over the three relays",
            ),
            dict(
                metric="SES 3 relays sharing 60/s: throttles",
                unit="% of calls",
                relay=_pct(s["throttle_share"]),
                goal=2,
                op="<",
            ),
        ]
    if "exact20" in results:
        e = results["exact20"]
        rows += [
            dict(
                metric=f"SES {scenarios['exact20'].title}: rate",
                unit="% of limit",
                relay=_pct(e["share_of_limit"]),
                goal=95,
                op=">=",
                note=f"{e['injected']} mails",
            ),
            dict(
                metric="SES max_send_rate 20 vs limit 20: throttles",
                unit="replies",
                relay=e["throttles"],
                goal=0,
                op="<=",
            ),
        ]
    if "over50" in results:
        o = results["over50"]
        rows += [
            dict(
                metric=f"SES {scenarios['over50'].title}: settled rate (2nd half)",
                unit="% of limit",
                relay=_pct(o["settled_share"]),
                note=f"{o['injected']} mails; overall {_fmt_pct(o['share_of_limit'])} of limit",
            ),
            dict(
                metric="SES max_send_rate 50 vs limit 20: throttles",
                unit="% of calls",
                relay=_pct(o["throttle_share"]),
            ),
        ]
    return rows


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


@dataclass(frozen=True, slots=True, kw_only=True)
class Shared:
    """Three relays (max_send_rate = the fake's limit, as `auto` on one account would give
    all of them) and the mail each gets, `starts` seconds after the first."""

    name: str
    title: str
    mails: tuple[int, ...]
    starts: tuple[float, ...] = (0.0, 0.0, 0.0)
    background: float = 0.0  # another sender's recipients/s
    rate_limit: float = 60.0
    latency: float = 0.02


def shared_scenarios(p: Params) -> list[Shared]:
    """Issue 14's scenarios, `ses_multi_mails` per relay (about 90 s at 60/s in all)."""
    n = p.ses_multi_mails
    join = 2 * n / 60.0 / 3  # a third of the way through the other two's mail
    return [
        Shared(name="together", title="3 relays start together, 60/s", mails=(n, n, n)),
        Shared(
            name="staggered",
            title="3 relays starting 0/1/2 s apart, 60/s",
            mails=(n, n, n),
            starts=(0.0, 1.0, 2.0),
        ),
        Shared(
            name="joining",
            title=f"2 relays, a 3rd joining after {join:.0f} s, 60/s",
            mails=(n, n, n),
            starts=(0.0, 0.0, join),
        ),
        Shared(name="leaving", title="3 relays, one leaving early, 60/s", mails=(n, n, n // 3)),
        Shared(
            name="other",
            title="3 relays beside another sender at 20 of 60/s",
            mails=(2 * n // 3,) * 3,
            background=20.0,
        ),
    ]


class OtherSender(threading.Thread):
    """Another sender on the account: one SendRawEmail every 1 / rate seconds, straight to
    the fake, throttled or not (a throttled one is not sent again)."""

    def __init__(self, url: str, rate: float) -> None:
        super().__init__(name="other-sender", daemon=True)
        self.url, self.rate = url, rate
        self.calls = self.throttles = 0
        self.accepted: list[float] = []  # wall-clock times, as the relays' logs
        self.done = threading.Event()
        raw = base64.b64encode(b"From: other@example.org\r\nSubject: other\r\n\r\nx\r\n")
        self.body = urllib.parse.urlencode(
            {
                "Action": "SendRawEmail",
                "Source": "other@example.org",
                "Destinations.member.1": "to@example.org",
                "RawMessage.Data": raw.decode(),
            }
        ).encode()

    def run(self) -> None:
        due = time.monotonic()
        while not self.done.wait(max(0.0, due - time.monotonic())):
            due += 1.0 / self.rate
            self.calls += 1
            try:
                with urllib.request.urlopen(self.url, data=self.body, timeout=5) as answer:
                    answer.read()
                self.accepted.append(time.time())
            except urllib.error.HTTPError as exc:
                exc.read()
                self.throttles += 1

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


def _sent_times(log: Path) -> list[float]:
    """Wall-clock times of the relay's `event=sent ... route=ses` lines."""
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if " event=sent " in line and " route=ses" in line:
            stamp = line.split(" ", 1)[0]  # 2026-12-04T19:08:00.123Z
            whole, _, ms = stamp.rstrip("Z").partition(".")
            at = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
            times.append(at + int(ms or 0) / 1000)
    return sorted(times)


def shares(
    sent: list[list[float]], other: list[float], limit: float, since: float, until: float
) -> tuple[float, float]:
    """(used, least) over [since, until): the relays' rate over what the other sender left,
    and the smallest relay's rate over the fair share of that."""
    span = max(until - since, 1e-9)
    counts = [sum(since <= t < until for t in times) / span for times in sent]
    left = limit - sum(since <= t < until for t in other) / span
    return sum(counts) / left, min(counts) / (left / len(counts))


def run_shared(workdir: Path, sc: Shared, p: Params, report: Report) -> dict[str, Any]:
    """Inject each relay's mail at its start; wait until SES + fallback have it all."""
    base = workdir / sc.name
    base.mkdir()
    total = sum(sc.mails)
    expected = total / (0.9 * (sc.rate_limit - sc.background)) + max(sc.starts)
    deadline = min(p.wait, 2 * expected + 10)
    with contextlib.ExitStack() as stack:
        fake = FakeSes(base, "fakeses", rate_limit=sc.rate_limit, latency=sc.latency)
        stack.callback(fake.stop)
        fallback = stack.enter_context(sink.Sink(base, name="sink-fallback"))
        target = relayproc.SesTarget(endpoint_url=fake.url, max_send_rate=sc.rate_limit)
        relays = _start(stack, base, fallback.port, [target] * len(sc.mails))
        report.progress(
            f"ses {sc.name}: {sc.mails} mails into 3 relays at +{sc.starts} s, fake limit "
            f"{sc.rate_limit:g}/s"
            + (f", another sender at {sc.background:g}/s" if sc.background else "")
        )
        other = OtherSender(fake.url, sc.background) if sc.background else None
        if other is not None:
            other.start()
            stack.callback(other.stop)
        start = time.monotonic()
        sources: dict[int, subprocess.Popen[str]] = {}
        last_progress, last_seen = start, -1
        try:
            while time.monotonic() - start < deadline:
                for i, relay in enumerate(relays):
                    if i not in sources and time.monotonic() - start >= sc.starts[i]:
                        argv = loads.smtp_source_argv(
                            relay.port, messages=sc.mails[i], sessions=5, size=2048
                        )
                        sources[i] = subprocess.Popen(
                            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                        )
                stats = fake.stats()
                seen = stats["accepted"] - (len(other.accepted) if other else 0) + fallback.count()
                now = time.monotonic()
                if seen >= total:
                    break
                if seen != last_seen:
                    last_progress, last_seen = now, seen
                elif now - last_progress > STALL and len(sources) == len(relays):
                    break
                time.sleep(0.25)
        finally:
            if other is not None:
                other.stop()
            for proc in sources.values():
                try:
                    _, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    err = "timed out"
                if proc.returncode:
                    raise RuntimeError(f"smtp-source into relay failed: {err[-300:]}")
        elapsed = time.monotonic() - start
        pending = failed = 0
        for relay in relays:
            counts = relay.queue_stats()
            pending += sum(counts.get(k, 0) for k in ("queued", "inflight", "deferred"))
            failed += counts.get("failed", 0)
        stats = fake.stats()
        fell_back = fallback.count()
        sent = [_sent_times(relay.dir / "relay.log") for relay in relays]
    other_times = other.accepted if other else []
    other_calls, other_throttles = (other.calls, other.throttles) if other else (0, 0)
    accepted = stats.get("accepted", 0) - len(other_times)
    calls = stats.get("calls", 0) - other_calls
    throttles = stats.get("throttles", 0) - other_throttles
    used = least = 0.0
    note = "no relay sent through SES"
    if all(sent):
        since, until = max(t[0] for t in sent), min(t[-1] for t in sent)
        note = f"over the {until - since:.0f} s all relays sent"
        if until - since < 2.0:  # a smoke run (--quick): the whole run, rough
            since, until = min(t[0] for t in sent), max(t[-1] for t in sent)
            note = f"over the whole {until - since:.1f} s (too short to overlap)"
        used, least = shares(sent, other_times, sc.rate_limit, since, until)
        if sc.name == "leaving":
            # The third relay's mail ends first: how soon the other two fill the quota, and
            # how they share it after.
            stay = sorted(sent[0] + sent[1])
            ends = min(sent[0][-1], sent[1][-1])
            full = until
            while full + 5 <= ends:
                if sum(full <= t < full + 5 for t in stay) >= 0.95 * sc.rate_limit * 5:
                    break
                full += 0.5
            after = shares(sent[:2], [], sc.rate_limit, full, ends) if ends > full else (0, 0)
            note += (
                f"; after it left: full again in {full - until:.0f} s, then "
                f"{100 * after[0]:.0f}% used, smaller of the two {100 * after[1]:.0f}% of fair"
            )
    result = {
        "injected": total,
        "accepted_by_ses": accepted,
        "fell_back_upstream": fell_back,
        "still_queued": pending,
        "failed": failed,
        "lost": max(0, total - accepted - fell_back - pending - failed),
        "calls": calls,
        "throttles": throttles,
        "throttle_share": throttles / max(1, calls),
        "used": used,
        "least": least,
        "note": note,
        "seconds": elapsed,
        "complete": accepted + fell_back >= total,
    }
    report.progress(
        f"ses {sc.name}: {accepted}/{total} via SES, {fell_back} fell back, "
        f"{100 * used:.1f}% of what the quota leaves, smallest relay {100 * least:.0f}% "
        f"of fair, {throttles} throttles in {calls} calls, {pending} still queued ({note})"
    )
    return result
