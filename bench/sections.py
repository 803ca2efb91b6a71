"""The relay-vs-Postfix sections that need only SMTP: Moodle's path, accept rate
with end to end, sequential latency, and the backlog (host down, then back).

Each function takes the running servers, measures, and adds rows to the report.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import loads, postfix, profile, relayproc, sink, tools
from bench.report import Report

MOODLE_GOAL_MS = 5.0
SEQ_BLOCK = 50  # sequential transactions into one server before the next takes its turn


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    php_mails: int
    accept_mails: int
    accept_sessions: int
    accept_size: int
    accept_rounds: int  # each server in turn, the order reversed every round
    seq_count: int
    seq_size: int
    seq_conn_count: int  # smtp-source -s 1: one new connection per mail, one at a time
    seq_conn_size: int
    backlog_mails: int
    backlog_size: int
    ses_mails: int
    ses_multi_mails: int
    pacing_mails: int
    # issue 6's single and issue 14's shared-quota scenarios to run (bench/sesbench.py);
    # None: all. A quick run (a smoke test of the harness) keeps one of each kind: auto rate
    # and a shared one; a relay leaving early, another sender.
    ses_single: tuple[str, ...] | None = None
    ses_shared: tuple[str, ...] | None = None
    timeout: float  # deadline of one load run (smtp-source, PHPMailer), seconds
    wait: float  # longest wait for delivery (end to end, drain, one SES scenario), seconds


FULL = Params(
    php_mails=300,
    accept_mails=2000,
    accept_sessions=20,
    accept_size=20480,
    accept_rounds=3,
    seq_count=500,
    seq_size=4096,
    seq_conn_count=1000,
    seq_conn_size=20480,
    backlog_mails=100_000,
    backlog_size=2048,
    ses_mails=1000,
    ses_multi_mails=1800,
    pacing_mails=1000,
    timeout=900,
    wait=900,
)
QUICK = Params(
    php_mails=30,
    accept_mails=200,
    accept_sessions=20,
    accept_size=20480,
    accept_rounds=2,
    seq_count=50,
    seq_size=4096,
    seq_conn_count=50,
    seq_conn_size=20480,
    backlog_mails=1000,
    backlog_size=2048,
    ses_mails=60,
    ses_multi_mails=60,
    pacing_mails=40,
    ses_single=("auto100", "shared60"),
    ses_shared=("leaving", "other"),
    timeout=60,
    wait=15,
)


@dataclass(slots=True, kw_only=True)
class Servers:
    """What the SMTP sections measure against; relay is None until `relay serve` exists."""

    workdir: Path
    reference_sink: sink.Sink
    postfix: postfix.Postfix
    postfix_sink: sink.Sink
    relay: relayproc.Relay | None
    relay_sink: sink.Sink | None
    no_delivery: str | None = None  # why relay serve does not deliver (yet), None when it does


@contextlib.contextmanager
def servers(
    workdir: Path, report: Report, *, with_relay: bool, no_delivery: str | None
) -> Iterator[Servers]:
    """smtp-sink (reference), Postfix -> its sink, relay serve -> its sink; all stopped after."""
    with contextlib.ExitStack() as stack:
        report.progress("starting smtp-sinks and a private Postfix instance")
        ref = stack.enter_context(sink.Sink(workdir, name="sink-reference"))
        pf_sink = stack.enter_context(sink.Sink(workdir, name="sink-postfix"))
        pf = stack.enter_context(postfix.Postfix(workdir, pf_sink.port))
        report.progress(f"postfix smtpd on :{pf.port}, relayhost smtp-sink :{pf_sink.port}")
        relay = relay_sink = None
        if with_relay:
            relay_sink = stack.enter_context(sink.Sink(workdir, name="sink-relay"))
            relay = stack.enter_context(relayproc.Relay(workdir, upstream_port=relay_sink.port))
            report.progress(f"relay serve on :{relay.port}, upstream smtp-sink :{relay_sink.port}")
        yield Servers(
            workdir=workdir,
            reference_sink=ref,
            postfix=pf,
            postfix_sink=pf_sink,
            relay=relay,
            relay_sink=relay_sink,
            no_delivery=no_delivery,
        )


def moodle_path(srv: Servers, p: Params, report: Report) -> None:
    """PHPMailer, one connection per mail, into relay, smtp-sink and Postfix smtpd."""
    targets = {"smtp-sink": srv.reference_sink.port, "postfix": srv.postfix.port}
    if srv.relay is not None:
        targets["relay"] = srv.relay.port
    stats: dict[str, dict[str, float]] = {}
    for name, port in targets.items():
        report.progress(f"PHPMailer: {p.php_mails} mails into {name}")
        result = loads.phpmailer(port, count=p.php_mails, timeout=p.timeout)
        ms = [float(x) for x in result["ms"]]  # type: ignore[attr-defined]
        stats[name] = loads.summary(ms) | {"failed": float(result["failed"])}  # type: ignore[arg-type]
        report.details.setdefault("phpmailer", {})[name] = stats[name] | {
            "phpmailer_version": result.get("phpmailer")
        }
    relay = stats.get("relay", {})
    pf = stats["postfix"]
    sink_note = (
        f"into smtp-sink (which delays its ACKs): mean {stats['smtp-sink']['mean_ms']:.1f} ms, "
        f"median {stats['smtp-sink']['median_ms']:.1f} ms"
    )
    report.add(
        section="moodle",
        metric="PHPMailer ms per mail, mean (Moodle cron)",
        unit="ms",
        relay=relay.get("mean_ms"),
        postfix=pf["mean_ms"],
        goal=MOODLE_GOAL_MS,
        op="<=",
        note=f"{p.php_mails} mails, one connection each; postfix = its smtpd; {sink_note}",
    )
    report.add(
        section="moodle",
        metric="PHPMailer ms per mail, p99",
        unit="ms",
        relay=relay.get("p99_ms"),
        postfix=pf["p99_ms"],
    )
    failed = relay.get("failed", 0) + pf["failed"]
    if failed:
        report.add(
            section="moodle",
            metric="PHPMailer failed sends",
            unit="mails",
            relay=relay.get("failed"),
            postfix=pf["failed"],
            goal=0,
            op="<=",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One accept/e2e run: accepted mails/s, seconds until the sink had all, CPU spent."""

    per_second: float | None
    e2e: float | None
    note: str
    cpu: dict[str, float] | None  # seconds: total, own, reaped; processes before/after


def _cpu_spent(
    root: int | None, before: tools.CpuTree | None, *, settle: bool
) -> dict[str, float] | None:
    """CPU seconds the tree under `root` spent since `before` (after it settles, if asked)."""
    if root is None or before is None:
        return None
    after = tools.wait_cpu_idle(root) if settle else tools.cpu_tree(root)
    if after is None:
        return None
    return {
        "seconds": after.total - before.total,
        "own_seconds": after.own - before.own,
        "reaped_seconds": after.reaped - before.reaped,
        "processes_before": before.processes,
        "processes_after": after.processes,
    }


def _inject_and_drain(
    port: int,
    sink_: sink.Sink,
    p: Params,
    report: Report,
    name: str,
    *,
    root: int | None,
    delivers: bool = True,
) -> Run:
    """smtp-source at `port`; accepted/s, seconds until the sink has them all, and the CPU
    time of the process tree under `root` over that time (until it is idle again)."""
    base = sink_.count()
    cpu_before = tools.cpu_tree(root) if root is not None else None
    argv = loads.smtp_source_argv(
        port, messages=p.accept_mails, sessions=p.accept_sessions, size=p.accept_size
    )
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=p.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"smtp-source into {name} did not finish in {p.timeout:.0f} s") from None
    accepted = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source into {name} exited {proc.returncode}: {err[-400:]}")
    drained = sink_.wait_for(base + p.accept_mails, p.wait, stall=30) if delivers else None
    e2e = None if drained is None else accepted + drained
    note = ""
    if e2e is None and delivers:
        arrived = sink_.count() - base
        waited = time.monotonic() - start
        note = (
            f"{name} incomplete: {arrived} of {p.accept_mails} arrived in {waited:.0f} s "
            f"({arrived / waited:.1f} mails/s)"
        )
    cpu = _cpu_spent(root, cpu_before, settle=e2e is not None)
    report.progress(
        f"{name}: {p.accept_mails / accepted:.0f} accepted/s, end to end "
        + (f"{e2e:.2f} s" if e2e is not None else note or "not measured")
        + (f", {cpu['seconds']:.2f} CPU s" if cpu else "")
    )
    return Run(per_second=p.accept_mails / accepted, e2e=e2e, note=note, cpu=cpu)


def _pooled(runs: list[Run]) -> Run:
    """Rounds as one run: all mails over all seconds accepting; the mean time end to end
    (None if any round was incomplete); CPU seconds and reaped seconds summed."""
    if not runs or any(run.per_second is None for run in runs):
        return Run(per_second=None, e2e=None, note="", cpu=None)
    seconds = sum(1 / run.per_second for run in runs if run.per_second)
    e2es = [run.e2e for run in runs if run.e2e is not None]
    cpus = [run.cpu for run in runs if run.cpu is not None]
    cpu = None
    if len(cpus) == len(runs):
        cpu = {key: sum(one[key] for one in cpus) for key in cpus[0]}
        cpu["processes_before"] = cpus[0]["processes_before"]
        cpu["processes_after"] = cpus[-1]["processes_after"]
    return Run(
        per_second=len(runs) / seconds,
        e2e=sum(e2es) / len(e2es) if len(e2es) == len(runs) else None,
        note="; ".join(dict.fromkeys(run.note for run in runs if run.note)),
        cpu=cpu,
    )


def accept_and_e2e(srv: Servers, p: Params, report: Report) -> None:
    """20 KB mails, 20 concurrent connections; accepted/s and time until the sink has all.

    `p.accept_rounds` rounds, the servers in turn and the order reversed every round, as
    the sequential section does: one run of each is 3-5 s, and the same server read 511 and
    1,111 mails/s minutes apart on this machine. Each row pools its rounds (all mails over
    all seconds), so no round is left out; the rounds' own figures go to the details."""
    targets: dict[str, tuple[int, sink.Sink, int | None]] = {
        "postfix": (srv.postfix.port, srv.postfix_sink, srv.postfix.master_pid())
    }
    if srv.relay is not None and srv.relay_sink is not None:
        targets["relay"] = (
            srv.relay.port,
            srv.relay_sink,
            srv.relay.proc.pid if srv.relay.proc else None,
        )
    rounds: dict[str, list[Run]] = {name: [] for name in targets}
    order = list(targets)
    for number in range(1, p.accept_rounds + 1):
        for name in order:
            port, sink_, root = targets[name]
            report.progress(
                f"smtp-source, round {number} of {p.accept_rounds}: {p.accept_mails} x "
                f"{p.accept_size} B, {p.accept_sessions} sessions into {name} "
                "(delivery to smtp-sink running)"
            )
            delivers = name == "postfix" or srv.no_delivery is None
            rounds[name].append(
                _inject_and_drain(port, sink_, p, report, name, root=root, delivers=delivers)
            )
        order.reverse()
    results = {name: _pooled(runs) for name, runs in rounds.items()}
    report.details["accept"] = {
        name: {
            "per_second": run.per_second,
            "e2e_s": run.e2e,
            "cpu": run.cpu,
            "rounds": [
                {"per_second": one.per_second, "e2e_s": one.e2e, "cpu": one.cpu}
                for one in rounds[name]
            ],
        }
        for name, run in results.items()
    }
    relay = results.get("relay", Run(per_second=None, e2e=None, note="", cpu=None))
    pf = results["postfix"]
    spread = "; ".join(
        f"{name} by round " + " ".join(f"{one.per_second:.0f}" for one in runs if one.per_second)
        for name, runs in rounds.items()
    )
    note = (
        f"{p.accept_mails} mails of {p.accept_size} B over {p.accept_sessions} connections, one "
        "connection per mail (smtp-source); delivery to an smtp-sink runs meanwhile and competes "
        f"for CPU, as in production; {p.accept_rounds} rounds, the servers in turn (the first "
        f"one alternating), all mails over all seconds: {spread} mails/s"
    )
    if srv.no_delivery and srv.relay:
        note += f"; relay: no delivery running ({srv.no_delivery})"
    report.add(
        section="accept",
        metric="accepted mails/s, 20 KB, 20 connections",
        unit="mails/s",
        relay=relay.per_second,
        postfix=pf.per_second,
        note=note,
    )
    report.add(
        section="e2e",
        metric=f"end to end upstream, {p.accept_mails} mails until sink has all",
        unit="s",
        relay=relay.e2e,
        postfix=pf.e2e,
        note="; ".join(
            text
            for text in (
                "from the first connection until smtp-sink counted every mail; the rounds' mean",
                f"relay: {srv.no_delivery}" if srv.no_delivery and srv.relay else "",
                relay.note,
                pf.note,
            )
            if text
        ),
    )
    mails = p.accept_mails * p.accept_rounds
    per_1000 = {
        name: None if run.cpu is None else run.cpu["seconds"] * 1000 / mails
        for name, run in (("relay", relay), ("postfix", pf))
    }
    split = "; ".join(
        f"{name}: {run.cpu['seconds']:.2f} s in all, {run.cpu['reaped_seconds']:.2f} s of it "
        f"from processes that exited and were reaped ({run.cpu['processes_before']:.0f} live "
        f"before, {run.cpu['processes_after']:.0f} after)"
        for name, run in (("relay", relay), ("postfix", pf))
        if run.cpu is not None
    )
    report.add(
        section="e2e",
        metric=f"CPU s per 1,000 mails, the same {p.accept_mails} x {p.accept_size // 1024} KB",
        unit="s",
        relay=per_1000["relay"],
        postfix=per_1000["postfix"],
        note="utime+stime from /proc/PID/stat, from before smtp-source starts until the sink "
        "has every mail and the tree is idle again, of the whole process tree: relay serve and "
        "its delivery process; Postfix's master and every daemon below it (smtpd, cleanup, "
        "trivial-rewrite, qmgr, smtp, ...). Daemons that exit in between (max_use, max_idle) "
        "are counted through cutime+cstime of the process that reaped them (master); "
        "smtp-source and smtp-sink are not counted on either side; " + split,
    )


def sequential(srv: Servers, p: Params, report: Report) -> None:
    """One connection at a time, TCP_NODELAY client: the server's own time per transaction."""
    stats = {}
    targets = {"postfix": srv.postfix.port}
    if srv.relay is not None:
        targets["relay"] = srv.relay.port
    for name in targets:
        report.progress(f"sequential: {p.seq_count} transactions of {p.seq_size} B into {name}")
    times = _interleaved(targets, p.seq_count, p.seq_size)
    for name in targets:
        stats[name] = loads.summary(times[name])
        report.details.setdefault("sequential", {})[name] = stats[name]
    relay = stats.get("relay", {})
    for key, label in (("median_ms", "median"), ("p99_ms", "p99")):
        report.add(
            section="sequential",
            metric=f"ms per transaction, sequential, {label}",
            unit="ms",
            relay=relay.get(key),
            postfix=stats["postfix"][key],
            note=(
                f"{p.seq_count} x {p.seq_size} B, connect..QUIT, own client with TCP_NODELAY;"
                f" in blocks of {SEQ_BLOCK}, the servers in turn (the first one alternating),"
                " against drift of the machine's load"
                if label == "median"
                else ""
            ),
        )
    targets["smtp-sink"] = srv.reference_sink.port
    means = _per_connection_means(targets, p, report)
    report.details.setdefault("sequential", {})["smtp_source_mean_ms"] = means
    report.add(
        section="sequential",
        metric="ms per transaction, new connection per mail, mean (smtp-source -s 1)",
        unit="ms",
        relay=means.get("relay"),
        postfix=means["postfix"],
        note=f"smtp-source -s 1 -m {p.seq_conn_count} -l {p.seq_conn_size}: one session at a "
        "time, a new connection per mail, wall time of the whole run over the mails (so "
        "smtp-source's own start, a few ms, is spread over them); two halves per server, "
        f"{' '.join(means)}, then the other way round, against drift of the machine's load; "
        f"into smtp-sink for scale: {means['smtp-sink']:.2f} ms",
    )


def _interleaved(targets: dict[str, int], count: int, size: int) -> dict[str, list[float]]:
    """`count` sequential transactions into each target, SEQ_BLOCK at a time, the targets in
    turn and the order reversed every round: a spell of disk or CPU contention on this
    machine (block medians drift by 2x within a minute) falls on both servers alike."""
    times: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    done = 0
    while done < count:
        block = min(SEQ_BLOCK, count - done)
        for name in names:
            times[name] += loads.sequential(targets[name], count=block, size=size)
        names.reverse()
        done += block
    return times


def _per_connection_means(targets: dict[str, int], p: Params, report: Report) -> dict[str, float]:
    """Mean ms per mail of `smtp-source -s 1` (one connection per mail) into each target."""
    half = max(1, p.seq_conn_count // 2)
    spent = dict.fromkeys(targets, 0.0)
    sent = dict.fromkeys(targets, 0)
    names = list(targets)
    for order in (names, names[::-1]):
        for name in order:
            done = loads.smtp_source(
                targets[name], messages=half, sessions=1, size=p.seq_conn_size, timeout=p.timeout
            )
            spent[name] += done["seconds"]
            sent[name] += half
    for name in names:
        report.progress(
            f"sequential: smtp-source -s 1, {sent[name]} x {p.seq_conn_size} B into {name}: "
            f"{spent[name] * 1000 / sent[name]:.2f} ms per mail"
        )
    return {name: spent[name] * 1000 / sent[name] for name in names}


def _inject(port: int, p: Params, name: str, report: Report) -> float:
    report.progress(f"backlog: {p.backlog_mails} x {p.backlog_size} B into {name} (host down)")
    done = loads.smtp_source(
        port,
        messages=p.backlog_mails,
        sessions=p.accept_sessions,
        size=p.backlog_size,
        timeout=p.timeout,
    )
    report.progress(f"backlog: {name} accepted {done['per_second']:.0f} mails/s")
    return done["per_second"]


def _postfix_pss_kib(pf: postfix.Postfix) -> int | None:
    """Proportional set size of Postfix's master and all its children, summed
    (PSS, so the shared libraries are counted once, not once per process)."""
    master = pf.master_pid()
    if master is None:
        return None
    pids = [master]
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == master:
                pids.append(int(status.parent.name))
    sizes = [tools.pss_kib(pid) for pid in pids]
    return sum(s for s in sizes if s)


def _profiled(
    relay: relayproc.Relay, folder: Path | None
) -> contextlib.AbstractContextManager[profile.Recorder | None]:
    """py-spy on relay's delivery process while the block runs, when `folder` is given."""
    if folder is None:
        return contextlib.nullcontext()
    children = relay.pids()[1:]
    if len(children) != 1:
        raise RuntimeError(f"relay serve should have one delivery process, has {children}")
    return profile.Recorder(children[0], folder / "drain.raw")


def backlog(
    workdir: Path,
    p: Params,
    report: Report,
    *,
    with_relay: bool,
    no_delivery: str | None,
    profile_dir: Path | None = None,
) -> None:
    """N mails queued with the original host down; peak RSS; drain time when it is back.

    With `profile_dir`, py-spy records relay's delivery process during the drain.
    """
    down_port = tools.free_port()
    results: dict[str, dict[str, float | None]] = {}
    drain_note = ""
    if with_relay:
        retry = 5.0
        with relayproc.Relay(
            workdir, name="relay-backlog", upstream_port=down_port, retry_schedule=(retry,)
        ) as relay:
            rate = _inject(relay.port, p, "relay", report)
            rss_queued = relay.rss_peak()
            pss_queued = relay.pss_now()
            drain = None
            if no_delivery is None:
                with (
                    _profiled(relay, profile_dir) as recorder,
                    sink.Sink(workdir, down_port, name="sink-backlog-relay") as back,
                ):
                    report.progress("backlog: original host is back, relay draining")
                    cpu_before = relay.cpu()
                    start = time.monotonic()
                    drain = back.wait_for(p.backlog_mails, p.wait, stall=60)
                    cpu_drain = _cpu_spent(relay.pids()[0], cpu_before, settle=False)
                    if drain is None:
                        waited, arrived = time.monotonic() - start, back.count()
                        drain_note = (
                            f"relay incomplete: {arrived} of {p.backlog_mails} drained in "
                            f"{waited:.0f} s ({arrived / waited:.1f} mails/s)"
                        )
                        report.progress(f"backlog: {drain_note}")
                report.details["backlog_relay_drain_cpu"] = cpu_drain
                if recorder is not None and profile_dir is not None:
                    summary = profile.summarize(
                        recorder.raw, seconds=recorder.seconds, thread_cpu=recorder.thread_cpu
                    )
                    (profile_dir / "drain.txt").write_text(summary + "\n")
                    (profile_dir / "drain.threads.json").write_text(
                        json.dumps({str(t): s for t, s in recorder.thread_cpu.items()}) + "\n"
                    )
                    report.progress(f"backlog: profile of the drain in {profile_dir}/drain.txt")
            report.details["backlog_relay_peak_rss_mib"] = {
                str(pid): (tools.peak_rss_kib(pid) or 0) / 1024 for pid in relay.pids()
            }
            results["relay"] = {
                "accept_per_s": rate,
                "peak_rss_mib": (relay.rss_peak() or 0) / 1024,
                "rss_queued_mib": (rss_queued or 0) / 1024,
                "pss_queued_mib": (pss_queued or 0) / 1024,
                "drain_s": drain,
            }
    pf_down = tools.free_port()
    with postfix.Postfix(workdir / "backlog", pf_down) as pf:
        rate = _inject(pf.port, p, "postfix", report)
        rss = _postfix_pss_kib(pf)
        settled = pf.wait_settled(min(120.0, p.timeout))
        report.progress(f"backlog: postfix {'deferred all' if settled else 'still busy'}")
        with sink.Sink(workdir, pf_down, name="sink-backlog-postfix") as back:
            report.progress("backlog: original host is back, postfix flush, draining")
            master = pf.master_pid()
            cpu_before = pf.cpu()
            start = time.monotonic()
            pf.flush()
            done = back.wait_for(p.backlog_mails, p.wait, stall=60)
            pf_drain = None if done is None else time.monotonic() - start
            report.details["backlog_postfix_drain_cpu"] = _cpu_spent(
                master, cpu_before, settle=False
            )
        results["postfix"] = {
            "accept_per_s": rate,
            "pss_sum_mib": (rss or 0) / 1024,
            "drain_s": pf_drain,
        }
    report.details["backlog"] = results
    row = results.get("relay", {})
    n = p.backlog_mails
    report.add(
        section="backlog",
        metric=f"peak RSS of relay (both processes), {n} mails queued",
        unit="MiB",
        relay=row.get("peak_rss_mib"),
        postfix=results["postfix"]["pss_sum_mib"],
        goal=200,
        op="<",
        note="relay: VmHWM of relay serve plus VmHWM of its delivery process, read after the "
        "drain, so the peak covers the queueing and the drain (each process's own peak, "
        "summed: an upper bound of the peak of the sum); "
        + (
            f"PSS of the two with the backlog queued: {row['pss_queued_mib']:.0f} MiB; "
            if row.get("pss_queued_mib")
            else ""
        )
        + "postfix: sum of the PSS of master and its children after the injection "
        "(different architecture, for scale only)",
    )
    report.add(
        section="backlog",
        metric=f"drain {n} queued mails after the host is back",
        unit="s",
        relay=row.get("drain_s"),
        postfix=results["postfix"]["drain_s"],
        note="relay: retry schedule [5 s], so up to 5 s of it is waiting for the retry; postfix: "
        "`postfix flush` when the sink is back"
        + (f"; relay: {no_delivery}" if no_delivery and with_relay else "")
        + (f"; {drain_note}" if with_relay and drain_note else ""),
    )
    report.add(
        section="backlog",
        metric=f"accepted mails/s, {p.backlog_size} B, host down",
        unit="mails/s",
        relay=row.get("accept_per_s"),
        postfix=results["postfix"]["accept_per_s"],
    )
