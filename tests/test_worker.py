"""Delivery in its own process: `relay serve` runs the delivery process
(`relay.deliver.process`) as a child and watches it.

Real processes throughout: `relay serve` (the `relay_process` fixture, in its own
process group), the capture server as the original host, a fake SES where a send
must take a while. The child's pid comes from the parent's
`event=delivery_process_started pid=N` line.
"""

# STYLE.md asserts read `expected == actual`; ruff's SIM300 calls that Yoda.

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from relay import rules
from relay import settings as settings_mod
from relay.deliver import handover, process, supervisor
from relay.spool import Spool, new_id
from relay.spool.lock import DELIVERY_LOCK
from tests.support.aws import REGION
from tests.support.capture import CaptureServer, trace_queue_id
from tests.support.fakeses import FakeSes
from tests.support.operate import RULES, http_get, metrics_port, write_atomically
from tests.support.processes import Process, RelayProcess
from tests.support.relays import ConfigWriter
from tests.support.smtp import send
from tests.support.spools import rows, wait_rows
from tests.support.waits import wait_until

SENDER = "noreply@moodle.test"


def mail(n: int, subject: str = "hello") -> bytes:
    return (
        f"To: ada@example.net\r\nFrom: {SENDER}\r\nSubject: {subject} {n}\r\n"
        f"Message-ID: <{n}.{time.monotonic_ns()}@moodle.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def upstream_config(write_config: ConfigWriter, capture: CaptureServer, **more: Any) -> Path:
    return write_config(
        ses={"enabled": False}, upstream={"host": "127.0.0.1", "port": capture.port}, **more
    )


def child_pids(relay: RelayProcess) -> list[int]:
    """Delivery processes `relay serve` started, in order (from its log)."""
    return [
        int(pid) for pid in re.findall(r"event=delivery_process_started pid=(\d+)", relay.log())
    ]


def child_of(relay: RelayProcess, number: int = 1) -> int:
    """The pid of the `number`-th delivery process, once it has been started."""
    pids = wait_until(
        lambda: len(child_pids(relay)) >= number and child_pids(relay), f"delivery process {number}"
    )
    return int(pids[number - 1])


def stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone (reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (an orphan's new parent may be slow)."""
    found = stat(pid)
    return found is None or found[0] == "Z"


def scrape(port: int) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    status, text = http_get(port, "/metrics")
    assert 200 == status
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def test_mail_is_delivered_by_a_child_process(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """`relay serve` starts one delivery process (its child, another pid), which takes the
    spool's delivery lock and delivers what the parent accepted to the original host."""
    relay = relay_process(upstream_config(write_config, capture)).start()
    assert relay.proc is not None
    child = child_of(relay)
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    wait_rows(relay.config.parent / "spool", [qid], {"sent"})
    assert [qid] == [m.queue_id for m in capture.messages]
    assert (True, relay.proc.pid) == (child != relay.proc.pid, stat(child)[1])  # type: ignore[index]
    assert f"event=delivery_started pid={child} " in relay.log()
    assert min(nice(relay.proc.pid) + process.NICE, 19) == nice(child)  # receiving goes first
    assert 0 == relay.stop()


def test_a_refused_nice_is_logged_and_delivery_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where setpriority(2) is denied (a seccomp filter answering EPERM), the delivery process
    logs it and runs at its parent's priority instead of stopping."""

    def refused(_: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(process.os, "nice", refused)
    with caplog.at_level(logging.WARNING, logger="relay.delivery_process"):
        process.lower_priority()
    assert ['event=nice_refused nice=19 error="[Errno 1] Operation not permitted"'] == [
        r.getMessage() for r in caplog.records
    ]


UNIT = Path(__file__).parent.parent / "systemd" / "relay.service"
SANDBOX = Path(__file__).parent / "support" / "sandbox.c"


def syscall_group(name: str) -> set[str]:
    """The system calls in a systemd group (`@name`), nested groups expanded, or {name}."""
    if not name.startswith("@"):
        return {name}
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()[1:]
    names: set[str] = set()
    for line in (line.strip() for line in listing):
        if line and not line.startswith("#"):
            names |= syscall_group(line)
    return names


def unit_syscalls(*, drop: str = "") -> set[str]:
    """What the unit's SystemCallFilter= lines allow, merged in order as systemd merges
    them (the first is an allow list; "~" removes, a later plain line adds back)."""
    allowed: set[str] = set()
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if not line.startswith("SystemCallFilter=") or line == f"SystemCallFilter={drop}":
            continue
        value = line.split("=", 1)[1]
        names = set().union(*(syscall_group(n) for n in value.lstrip("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


@pytest.mark.system
@pytest.mark.parametrize("drop", ["", "setpriority"], ids=["as-shipped", "without-setpriority"])
def test_relay_delivers_under_the_units_system_call_filter(
    write_config: ConfigWriter,
    relay_process: Process,
    capture: CaptureServer,
    tmp_path: Path,
    drop: str,
) -> None:
    """`relay serve` and its delivery process under a seccomp filter built from
    systemd/relay.service's SystemCallFilter= lines (tests/support/sandbox.c; denied calls get
    EPERM, as SystemCallErrorNumber=EPERM says). As shipped, the delivery process lowers its
    priority; with the unit's `setpriority` line left out, os.nice is refused, logged, and
    delivery goes on. Either way the mail is delivered (no SIGSYS, no crash loop)."""
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is missing (Debian package gcc)"
    sandbox = tmp_path / "sandbox"
    subprocess.run(
        [gcc, "-O1", "-o", str(sandbox), str(SANDBOX), "-lseccomp"],
        check=True,
        timeout=60,
    )  # fails here without Debian's libseccomp-dev
    allowed = tmp_path / "allowed"
    allowed.write_text("\n".join(sorted(unit_syscalls(drop=drop))))
    relay = relay_process(upstream_config(write_config, capture))
    relay.prefix = [str(sandbox), str(allowed)]
    relay.start()
    assert relay.proc is not None
    child = child_of(relay)
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    wait_rows(relay.config.parent / "spool", [qid], {"sent"})
    assert [qid] == [m.queue_id for m in capture.messages]
    refused = "event=nice_refused nice=19" in relay.log()
    if drop:
        assert (True, nice(relay.proc.pid)) == (refused, nice(child))
    else:
        assert (False, min(nice(relay.proc.pid) + process.NICE, 19)) == (refused, nice(child))
    assert 0 == relay.stop()


def nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_new_mail_wakes_the_delivery_process_at_once(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """Mail sent one at a time (each after the last was delivered, the loop idle) goes out
    within a fraction of the delivery loop's 1 s poll: the wake pipe, not the poll, starts it."""
    relay = relay_process(upstream_config(write_config, capture)).start()
    spool = relay.config.parent / "spool"
    wait_until(lambda: "event=delivery_started" in relay.log(), "event=delivery_started")
    latencies = []
    for n in range(7):
        time.sleep(0.15)
        started = time.monotonic()
        send(relay.port, SENDER, ["ada@example.net"], mail(n))
        capture.wait_for(n + 1)
        latencies.append(time.monotonic() - started)
    print(f"250 to delivered, ms: {[round(s * 1000) for s in latencies]}")
    assert statistics.median(latencies) < 0.25, latencies
    assert {"sent"} == {row["state"] for row in rows(spool).values()}
    assert 0 == relay.stop()


@pytest.mark.system
def test_parent_sigkill_makes_the_delivery_process_exit(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """SIGKILL of `relay serve`: its delivery process sees EOF on the wake pipe, logs
    `event=parent_gone` and exits within seconds; a new `relay serve` then delivers."""
    config = upstream_config(write_config, capture)
    relay = relay_process(config).start()
    child = child_of(relay)
    wait_until(lambda: "event=delivery_started" in relay.log(), "event=delivery_started")
    killed_at = time.monotonic()
    assert -signal.SIGKILL == relay.stop(signal.SIGKILL)
    wait_until(lambda: exited(child), f"delivery process {child} to exit", timeout=5)
    print(f"delivery process exited {time.monotonic() - killed_at:.2f} s after the kill")
    assert "event=parent_gone" in relay.log()

    again = relay_process(config).start()
    qid = send(again.port, SENDER, ["ada@example.net"], mail(1))
    wait_rows(config.parent / "spool", [qid], {"sent"})
    assert 0 == again.stop()


@pytest.mark.system
def test_child_sigkill_is_logged_and_a_new_child_delivers(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """SIGKILL of the delivery process: `relay serve` logs `event=delivery_process_died`,
    keeps accepting, starts a new delivery process, and the mail accepted meanwhile is
    delivered. /metrics counts the restart and shows the new process up."""
    config = upstream_config(write_config, capture, metrics="127.0.0.1:0")
    relay = relay_process(config).start()
    first = child_of(relay)
    os.kill(first, signal.SIGKILL)
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))  # while there is no child
    died = wait_until(
        lambda: re.search(r".*event=delivery_process_died.*", relay.log()),
        "event=delivery_process_died",
    )
    assert "ERROR" in died.group(0) and "returncode=-9" in died.group(0), died.group(0)
    second = child_of(relay, 2)
    wait_rows(config.parent / "spool", [qid], {"sent"})
    assert first != second
    _, samples = scrape(metrics_port(relay))
    assert (1.0, 1.0) == (
        samples[("relay_delivery_process_restarts_total", frozenset())],
        samples[("relay_delivery_process_up", frozenset())],
    )
    assert 0 == relay.stop()


@pytest.mark.system
@pytest.mark.parametrize("edit", ["invalid", "new-spool"])
def test_a_new_delivery_process_runs_on_what_relay_serve_runs_on(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer, edit: str
) -> None:
    """relay.yaml edited (an invalid value; or a new `spool:`, reloaded, which waits for a
    restart), then the delivery process dies: the next one runs on the settings relay serve
    has, not on the file. It delivers the mail relay serve accepts into its spool. Reading
    the file, it exited 1 at every start (invalid), or delivered from the new, empty spool."""
    config = upstream_config(write_config, capture)
    relay = relay_process(config).start()
    assert relay.proc is not None
    first = child_of(relay)
    if edit == "invalid":
        upstream_config(write_config, capture, retry={"schedule": 5})
    else:
        upstream_config(write_config, capture, spool="spool-new")
        wait_until(lambda: "event=delivery_started" in relay.log(), "event=delivery_started")
        relay.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: 2 == relay.log().count("reload_needs_restart"), "both reloaded")
    os.kill(first, signal.SIGKILL)
    child_of(relay, 2)
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    wait_rows(config.parent / "spool", [qid], {"sent"})
    assert [(SENDER, ("ada@example.net",))] == [(m.mail_from, m.rcpt_tos) for m in capture.messages]
    assert "delivery_no_settings" not in relay.log()
    assert 0 == relay.stop()


def test_handover_gives_what_relay_serve_runs_on_unless_the_code_differs(
    write_config: ConfigWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivery process gets relay serve's settings and rules, not the file as it is
    now. Started from other code on disk (an upgrade not yet restarted), it reads the files
    instead: unpickled into classes that changed, values could land in the wrong fields."""
    config = write_config(hostname="running.test")
    running = settings_mod.load(config)
    ruleset = rules.load(running.rules)
    packed = handover.pack(running, ruleset)
    write_config(hostname="edited.test")
    assert (running, ruleset, False) == handover.unpack(io.BytesIO(packed))
    monkeypatch.setattr(handover, "CODE", "the code after an upgrade")
    read, _, from_files = handover.unpack(io.BytesIO(packed))
    assert ("edited.test", True) == (read.hostname, from_files)


@pytest.mark.usefixtures("aws_env")
@pytest.mark.system
def test_without_an_ses_client_ses_mail_goes_upstream_and_says_why(
    write_config: ConfigWriter,
    relay_process: Process,
    capture: CaptureServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AWS_PROFILE names no profile, so no SES client can be made: the delivery process logs
    event=ses_unusable and sends SES-routed mail upstream, the reason on its row. It exited
    1 at every start instead, and nothing was delivered, upstream mail neither."""
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    (tmp_path / "rules.yaml").write_text("default: ses\nrules: []\n")
    config = write_config(
        rules="rules.yaml",
        upstream={"host": "127.0.0.1", "port": capture.port},
        ses={"region": REGION},
    )
    relay = relay_process(config).start()
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    row = wait_rows(config.parent / "spool", [qid], {"sent"})[qid]
    assert ("upstream", [(SENDER, ("ada@example.net",))]) == (
        row["route"],
        [(m.mail_from, m.rcpt_tos) for m in capture.messages],
    )
    assert "no SES client" in row["fallback_reason"], row["fallback_reason"]
    assert "no-such-profile" in row["fallback_reason"], row["fallback_reason"]
    wait_until(lambda: "event=ses_unusable" in relay.log(), "event=ses_unusable")
    assert 1 == len(child_pids(relay)), relay.log()
    assert 0 == relay.stop()


@pytest.mark.usefixtures("aws_env")
@pytest.mark.system
def test_sigterm_drains_the_send_in_flight_and_both_exit_0(
    write_config: ConfigWriter, relay_process: Process, fake_ses: FakeSes, tmp_path: Path
) -> None:
    """SIGTERM while a send to SES takes 1.5 s: `relay serve` stops its delivery process,
    which finishes that send (the row ends `sent`, not `inflight`) and exits 0; then
    `relay serve` exits 0."""
    (tmp_path / "rules.yaml").write_text("default: ses\nrules: []\n")
    config = write_config(
        rules="rules.yaml",
        ses={
            "region": REGION,
            "endpoint_url": fake_ses.url,
            "max_send_rate": 10,
            "timeout": 10,
        },
    )
    relay = relay_process(config).start()
    child = child_of(relay)
    wait_until(lambda: "event=delivery_started" in relay.log(), "event=delivery_started")
    fake_ses.latency = 1.5
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    # The call under way: a send still waiting for its turn at the pace is cancelled.
    wait_until(lambda: fake_ses.requests, "the call to SES")
    assert 0 == relay.stop(signal.SIGTERM, timeout=30)
    assert "sent" == rows(config.parent / "spool")[qid]["state"]
    assert [qid] == [trace_queue_id(s.raw) for s in fake_ses.sent]
    assert f"event=delivery_process_stopped pid={child} returncode=0" in relay.log()
    assert exited(child)


@pytest.mark.system
def test_sighup_reaches_the_delivery_process(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer, tmp_path: Path
) -> None:
    """Rules are applied where mail is classified, in the delivery process: after a rules
    change and SIGHUP to `relay serve`, new mail is classified by the new rules."""
    rules_file = tmp_path / "rules.yaml"
    write_atomically(rules_file, RULES.format(name="before"))
    config = upstream_config(write_config, capture, rules="rules.yaml")
    relay = relay_process(config).start()
    assert relay.proc is not None
    spool = config.parent / "spool"
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    assert "before" == wait_rows(spool, [qid])[qid]["rule"]

    write_atomically(rules_file, RULES.format(name="after"))
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: 2 == relay.log().count("event=reloaded"), "both processes reloaded")
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(2))
    assert "after" == wait_rows(spool, [qid])[qid]["rule"]
    assert 1 == len(child_pids(relay)), "the delivery process was restarted, not reloaded"
    assert 0 == relay.stop()


@pytest.mark.system
def test_sighup_while_the_delivery_process_starts_is_a_reload_not_a_death(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer, tmp_path: Path
) -> None:
    """SIGHUP to `relay serve` in the half second a new delivery process spends importing:
    relay serve asks it to reload over their socketpair, which it reads once its loop runs.
    Forwarded as a signal, the reload ended it (uvloop's spawn unblocks every signal in the
    child; SIGHUP's default action is to exit) and it was started again a second later."""
    rules_file = tmp_path / "rules.yaml"
    write_atomically(rules_file, RULES.format(name="before"))
    config = upstream_config(write_config, capture, rules="rules.yaml")
    relay = relay_process(config).start()
    assert relay.proc is not None
    wait_until(lambda: "event=delivery_started" in relay.log(), "event=delivery_started")
    write_atomically(rules_file, RULES.format(name="after"))
    os.kill(child_of(relay), signal.SIGKILL)
    second = child_of(relay, 2)  # logged right after the spawn: still importing
    assert f"event=delivery_started pid={second} " not in relay.log()
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: 2 == relay.log().count("event=reloaded"), "both processes reloaded")
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    assert "after" == wait_rows(config.parent / "spool", [qid])[qid]["rule"]
    assert [second] == child_pids(relay)[1:]
    assert 1 == relay.log().count("event=delivery_process_died")  # the SIGKILL's
    assert 0 == relay.stop()


def test_metrics_show_the_delivery_process_counters_once(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """/metrics of `relay serve` has the parent's counters (received) and the delivery
    process's (deliveries, classified) for the same mail, and every metric family once."""
    config = upstream_config(write_config, capture, metrics="127.0.0.1:0")
    relay = relay_process(config).start()
    port = metrics_port(relay)
    qid = send(relay.port, SENDER, ["ada@example.net"], mail(1))
    wait_rows(config.parent / "spool", [qid], {"sent"})
    text, samples = scrape(port)
    expected = {"received": 1.0, "delivered": 1.0, "classified": 1.0, "up": 1.0}
    actual = {
        "received": samples[("relay_received_messages_total", frozenset())],
        "delivered": samples[
            ("relay_deliveries_total", frozenset({("route", "upstream"), ("outcome", "sent")}))
        ],
        "classified": samples[
            (
                "relay_classified_messages_total",
                frozenset({("rule", "(default)"), ("route", "upstream")}),
            )
        ],
        "up": samples[("relay_delivery_process_up", frozenset())],
    }
    assert expected == actual
    declared = re.findall(r"^# TYPE (\S+)", text, re.M)
    assert [] == sorted({name for name in declared if declared.count(name) > 1})
    assert {"process_cpu_seconds_total", "relay_ses_throttles_total"} <= {n for n, _ in samples}
    assert 0 == relay.stop()


async def leave_inflight(spool: Path) -> str:
    """A spool with one message claimed by a delivery that then died."""
    opened = await Spool.open(spool)
    qid = new_id()
    trace = f"Received: from moodle.test\r\n\tby relay.test (relay) with ESMTP id {qid}; now\r\n"
    try:
        await opened.add(
            sender=SENDER,
            recipients=["ada@example.net"],
            raw=mail(1),
            peer="127.0.0.1",
            trace=trace.encode(),
            message_id="<1@moodle.test>",
            queue_id=qid,
        )
        await opened.claim(1)
    finally:
        await opened.close()
    return qid


@pytest.mark.system
def test_delivery_waits_for_the_lock_before_reclaiming(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """While another process holds the spool's delivery lock (an old delivery process
    still sending), the new one neither reclaims its in-flight mail nor delivers: the row
    stays `inflight`, new mail stays queued. Once the lock is free both go out."""
    config = upstream_config(write_config, capture)
    spool = config.parent / "spool"
    inflight = asyncio.run(leave_inflight(spool))
    with open(spool / DELIVERY_LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        relay = relay_process(config).start()
        fresh = send(relay.port, SENDER, ["ada@example.net"], mail(2))
        wait_until(lambda: "event=delivery_lock_busy" in relay.log(), "event=delivery_lock_busy")
        time.sleep(1.5)  # more than the delivery loop's poll
        held = rows(spool)
        assert ("inflight", "queued", []) == (
            held[inflight]["state"],
            held[fresh]["state"],
            capture.messages,
        )
    wait_rows(spool, [inflight, fresh], {"sent"})
    assert {inflight, fresh} == {m.queue_id for m in capture.messages}
    assert 0 == relay.stop()


@pytest.mark.system
async def test_a_hung_delivery_process_is_killed_and_replaced(
    start_relay: Callable[..., Any],
    capture: CaptureServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delivery process whose event loop stops answering (here: SIGSTOP) is not a crash,
    yet it delivers nothing: after LIVENESS_MISSES unanswered pings it is killed, logged as
    `event=delivery_process_hung`, and a new one delivers the mail accepted meanwhile."""
    caplog.set_level(logging.INFO)
    # Scaled down from 10 s and 2 s; a busy machine (the suite on 2 cores) answered a
    # scrape in over 0.2 s, and a healthy new process was killed as hung too.
    monkeypatch.setattr(supervisor, "LIVENESS_EVERY", 0.5)
    monkeypatch.setattr(supervisor, "SCRAPE_TIMEOUT", 1.0)
    relay = await start_relay(
        tasks=[supervisor.delivery_process], upstream={"host": "127.0.0.1", "port": capture.port}
    )

    def logged(event: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage()]

    def started() -> list[int]:
        return [
            int(re.findall(r"pid=(\d+)", line)[0]) for line in logged("delivery_process_started")
        ]

    loop = asyncio.get_running_loop()
    first = (await loop.run_in_executor(None, wait_until, started, "a delivery process"))[0]
    os.kill(first, signal.SIGSTOP)
    qid = await loop.run_in_executor(None, send, relay.port, SENDER, ["ada@example.net"], mail(1))
    await loop.run_in_executor(None, wait_rows, relay.settings.spool, [qid], {"sent"})
    assert exited(first)
    assert len(started()) == 2
    hung = [
        r.getMessage() for r in caplog.records if "event=delivery_process_hung" in r.getMessage()
    ]
    assert len(hung) == 1 and f"pid={first}" in hung[0]


def test_a_delivery_process_gone_before_its_settings_are_written_is_an_exit_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The child dies before the handover is written (killed at once, or failing at its first
    import): on uvloop, relay serve's loop, writing to its closed stdin raised RuntimeError,
    which went up through the supervisor and stopped relay serve (exit 1, Moodle refused).
    Now the write is skipped and the death is logged and restarted as any other."""
    monkeypatch.setattr(handover, "pack", lambda settings, rules: b"x" * 100_000)

    async def scenario() -> int | None:
        proc = await asyncio.create_subprocess_exec("true", stdin=asyncio.subprocess.PIPE)
        await proc.wait()
        await asyncio.sleep(0.1)  # the loop has seen the pipe close
        ctx = type("Ctx", (), {"settings": None, "rules": None})()
        await supervisor._hand_over(proc, ctx)  # type: ignore[arg-type]
        return proc.returncode

    assert 0 == uvloop.run(scenario())
