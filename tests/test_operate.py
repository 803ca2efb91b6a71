"""Operating relay: systemd notify + watchdog, SIGHUP reload, SIGTERM under load, metrics and
the Grafana dashboard, `relay demo`. Real processes, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import runtime
from relay.metrics.http import READY_FOR
from relay.ops import samples
from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.operate import RULES, http_get, metrics_port, write_atomically
from tests.support.processes import RELAY, Process, relay_cli
from tests.support.relays import ConfigWriter
from tests.support.smtp import asend, send
from tests.support.spools import await_rows, rows, wait_rows
from tests.support.tls import TlsFiles
from tests.support.waits import wait_until

DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana" / "relay.json"


def mail(subject: str, n: int = 0) -> bytes:
    """A small Moodle-like mail."""
    return (
        f"Date: Mon, 2 Mar 2026 10:00:00 +0000\r\nTo: ada@example.net\r\n"
        f"From: noreply@moodle.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.monotonic_ns()}.{n}@moodle.test>\r\n\r\nHello {n}\r\n"
    ).encode()


# a. systemd notify protocol


@pytest.mark.system
def test_ready_after_listen_watchdog_and_stopping(write_config: ConfigWriter) -> None:
    """Under NOTIFY_SOCKET, `relay serve` says READY=1 only once the SMTP port accepts (a
    connect made the moment READY arrives gets the 220 greeting), pings WATCHDOG=1 at half
    of WATCHDOG_USEC, and says STOPPING=1 on SIGTERM, then exits 0."""
    with tempfile.TemporaryDirectory(prefix="rn") as short:  # AF_UNIX paths max 107 bytes
        path = os.path.join(short, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(15)
        config = write_config()
        port_file = config.parent / "port"
        env = {
            **os.environ,
            "NOTIFY_SOCKET": path,
            "WATCHDOG_USEC": "200000",
            "RELAY_PORT_FILE": str(port_file),
        }
        env.pop("WATCHDOG_PID", None)
        log = config.parent / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*RELAY, "serve", "--config", str(config)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            got: list[tuple[float, str]] = []
            while not any(m == "READY=1" for _, m in got):
                got.append((time.monotonic(), sock.recv(4096).decode()))
            # READY arrived: the listener must take a connection now, with no retry.
            port = int(port_file.read_text())
            with socket.create_connection(("127.0.0.1", port), timeout=5) as smtp:
                greeting = smtp.recv(512).decode()
            assert greeting.startswith("220 "), greeting
            ready_at = got[-1][0]
            while time.monotonic() - ready_at < 1.0:
                got.append((time.monotonic(), sock.recv(4096).decode()))
            pings = [t for t, m in got if m == "WATCHDOG=1" and t >= ready_at]
            proc.send_signal(signal.SIGTERM)
            while got[-1][1] != "STOPPING=1":
                got.append((time.monotonic(), sock.recv(4096).decode()))
            code = proc.wait(40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            sock.close()
    messages = [m for _, m in got]
    assert {"READY=1", "WATCHDOG=1", "STOPPING=1"} == set(messages), messages
    assert 1 == messages.count("READY=1")
    # every 0.1 s for one second: allow for scheduling, but not for "never" or "once"
    assert 5 <= len(pings) <= 15, pings
    assert 0 == code, log.read_text()


@pytest.mark.system
def test_a_busy_systemd_does_not_stop_smtp(
    write_config: ConfigWriter, relay_process: Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's notify queue full (PID 1 busy: it holds 10 datagrams, shared by every
    service): the WATCHDOG=1 pings are dropped, SMTP goes on. They were sent with a blocking
    send from the event loop, which then waited in the kernel: every client timed out
    until systemd read its socket again."""
    with tempfile.TemporaryDirectory(prefix="rn") as short:
        path = os.path.join(short, "notify")
        busy = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        busy.bind(path)  # never read while the mails go
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "100000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        relay = relay_process(write_config()).start()
        time.sleep(1.5)  # a ping every 0.05 s: the queue is full by now
        started = time.monotonic()
        for n in range(3):
            send(relay.port, "noreply@moodle.test", ["ada@example.net"], mail("busy", n))
        took = time.monotonic() - started
        busy.setblocking(False)
        said = []
        with contextlib.suppress(BlockingIOError):
            while True:
                said.append(busy.recv(100).decode())
        assert 0 == relay.stop()
        busy.close()
    assert took < 3.0, f"three mails took {took:.1f} s while systemd was busy"
    assert "READY=1" in said, said  # from a thread, which waited for room


@pytest.mark.parametrize("key", ["listen", "metrics"])
def test_no_ready_when_the_port_is_taken(write_config: ConfigWriter, key: str) -> None:
    """When the listen or metrics port is already in use, `relay serve` exits 1 promptly
    without READY=1, so systemd reports a failed start (and restarts it) instead of waiting.
    A taken metrics port gave READY=1, then a traceback and exit 1: a crash loop."""
    with (
        tempfile.TemporaryDirectory(prefix="rn") as short,
        socket.socket() as taken,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = os.path.join(short, "notify")
        sock.bind(path)
        config = write_config(**{key: f"127.0.0.1:{taken.getsockname()[1]}"})
        env = {**os.environ, "NOTIFY_SOCKET": path}
        done = subprocess.run(
            [*RELAY, "serve", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=8,
            check=False,
        )
        sock.setblocking(False)
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(sock.recv(4096).decode())
    assert 1 == done.returncode, done.stderr
    assert "READY=1" not in got, got
    said = done.stderr.splitlines()[-1]
    expected = "listen on" if key == "listen" else "listen on metrics"
    assert f"relay serve stopped: cannot {expected} 127.0.0.1:" in said, done.stderr


# b. SIGHUP reload


BROKEN = """\
default: upstream
rules:
  - name: broken
    route: upstream
    match:
      subject: '(unclosed'
"""


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics as {(sample name, labels): value}."""
    status, text = http_get(port, "/metrics")
    assert 200 == status
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.system
def test_a_sighup_while_relay_serve_starts_does_not_end_it(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """A reload (SIGHUP) while `relay serve` starts, before its event loop handles the
    signal (sent as soon as /proc shows it ignored, long before it listens): it starts and
    takes mail. SIGHUP's default action ended it, and systemd does not restart a unit a
    SIGHUP ended."""
    config = write_config(
        ses={"enabled": False}, upstream={"host": "127.0.0.1", "port": capture.port}
    )
    relay = relay_process(config)
    sent: list[float] = []

    def hup_once_ignored() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if relay.proc is not None:
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{relay.proc.pid}/status").read_text()
                    ignored = int(re.search(r"SigIgn:\s*(\w+)", status)[1], 16)  # type: ignore[index]
                    if ignored & (1 << (signal.SIGHUP - 1)):
                        relay.proc.send_signal(signal.SIGHUP)
                        sent.append(time.monotonic())
                        return
            time.sleep(0.001)

    watcher = threading.Thread(target=hup_once_ignored)
    watcher.start()
    try:
        relay.start()
    finally:
        watcher.join()
    assert sent, "relay serve never ignored SIGHUP while it started"
    assert send(relay.port, "noreply@moodle.test", ["ada@example.net"], mail("hello", 1))


@pytest.mark.system
def test_relay_serve_with_its_standard_files_closed_runs(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """`relay serve <&- >&- 2>&- &`: it listens and takes mail. With 0, 1 or 2 closed, a
    socket or pipe got that number and libuv aborted on closing it (SIGABRT), just after
    "listening"."""
    config = write_config(
        ses={"enabled": False}, upstream={"host": "127.0.0.1", "port": capture.port}
    )
    relay = relay_process(config)
    relay.prefix = ["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh"]
    relay.start()
    qids = [
        send(relay.port, "noreply@moodle.test", ["ada@example.net"], mail("hello", n))
        for n in range(3)
    ]
    time.sleep(1.0)
    assert relay.proc is not None and relay.proc.poll() is None
    assert 3 == len(qids)


@pytest.mark.system
def test_a_reload_of_a_large_file_does_not_hold_up_moodles_mail(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """A SIGHUP with relay.yaml grown to 0.9 MB (70,000 networks; the cap is 1 MiB) takes
    PyYAML and relay seconds to read. They were read on the event loop: every SMTP reply
    waited meanwhile (9.7 s for a file of 20 MB). Read in a thread, mail is answered as
    usual throughout, and the reload then applies."""
    config = write_config(
        ses={"enabled": False}, upstream={"host": "127.0.0.1", "port": capture.port}
    )
    relay = relay_process(config).start()
    assert relay.proc is not None
    networks = ", ".join(["127.0.0.0/8"] * 70_000)
    write_atomically(config, config.read_text() + f"allow_networks: [{networks}]\n")
    relay.proc.send_signal(signal.SIGHUP)
    slowest, sent, deadline = 0.0, 0, time.monotonic() + 60
    while relay.log().count("event=reloaded") < 2 and time.monotonic() < deadline:
        started = time.monotonic()
        send(relay.port, "noreply@moodle.test", ["ada@example.net"], mail("during", sent))
        slowest, sent = max(slowest, time.monotonic() - started), sent + 1
    print(f"{sent} mails during the reload, the slowest {slowest * 1000:.0f} ms")
    assert 2 == relay.log().count("event=reloaded"), relay.log()[-2000:]
    assert slowest < 1.0


@pytest.mark.system
def test_no_events_queue_no_feedback_gauge(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """Without `ses.events`, relay_ses_feedback_up has no sample: it read 0 from the start,
    and the alert RelaySesFeedbackDown (== 0 for 15 min) fired on every such relay."""
    config = write_config(
        metrics="127.0.0.1:0", upstream={"host": "127.0.0.1", "port": capture.port}
    )
    relay = relay_process(config).start()
    port = metrics_port(relay)
    wait_until(lambda: scrape(port).get(("relay_delivery_process_up", frozenset())) == 1, "up")
    assert [] == [key for key in scrape(port) if key[0] == "relay_ses_feedback_up"]


@pytest.mark.system
def test_sighup_broken_rules_keep_old_then_fixed_rules_apply(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer, tmp_path: Path
) -> None:
    """SIGHUP with a broken rules file keeps the old rules (the next mail is still classified
    by them) and logs `event=reload_failed` with file:line; after the fix, SIGHUP makes the
    new rules apply to the next mail. Reload counters show one error and one ok."""
    rules_file = tmp_path / "rules.yaml"
    write_atomically(rules_file, RULES.format(name="old-rule"))
    config = write_config(
        rules="rules.yaml",
        ses={"enabled": False},
        metrics="127.0.0.1:0",
        upstream={"host": "127.0.0.1", "port": capture.port},
    )
    relay = relay_process(config).start()
    assert relay.proc is not None
    port = metrics_port(relay)
    spool = tmp_path / "spool"

    def deliver_one(n: int) -> dict[str, Any]:
        qid = send(relay.port, "noreply@moodle.test", ["ada@example.net"], mail("hello", n))
        return wait_rows(spool, [qid])[qid]

    assert "old-rule" == deliver_one(1)["rule"]

    # Both processes reload (relay serve and its delivery process, which classifies).
    write_atomically(rules_file, BROKEN)
    relay.proc.send_signal(signal.SIGHUP)
    failed = wait_until(
        lambda: (
            (lines := re.findall(r".*event=reload_failed.*", relay.log()))
            and len(lines) == 2
            and lines
        ),
        "event=reload_failed twice",
    )
    assert [True, True] == [f"{rules_file}:6:" in line for line in failed], failed
    qid = deliver_one(2)["id"]
    shown = relay_cli("queue", "--config", str(config), "show", "--json", qid)
    assert 0 == shown.returncode, shown.stderr
    assert ("old-rule", "upstream", "sent") == tuple(
        json.loads(shown.stdout)[k] for k in ("rule", "route", "state")
    )

    write_atomically(rules_file, RULES.format(name="new-rule"))
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: 2 == relay.log().count("event=reloaded"), "event=reloaded twice")
    assert "new-rule" == deliver_one(3)["rule"]

    reloads = {
        dict(k[1])["result"]: v
        for k, v in scrape(port).items()
        if k[0] == "relay_rules_reloads_total"
    }
    assert {"error": 1.0, "ok": 1.0} == reloads
    assert 0 == relay.stop()


# c. SIGTERM under load


@dataclass
class Client:
    """Sends mail until the relay goes away; keeps the queue id of every 250."""

    port: int
    keepalive: bool
    name: str
    accepted: list[str] = field(default_factory=list)
    ended_by: str = ""

    def run(self, stop: threading.Event) -> None:
        n = 0
        smtp: smtplib.SMTP | None = None
        try:
            while not stop.is_set():
                if smtp is None:
                    smtp = smtplib.SMTP(
                        "127.0.0.1", self.port, local_hostname="moodle.test", timeout=40
                    )
                    smtp.ehlo()
                n += 1
                smtp.mail("noreply@moodle.test")
                smtp.rcpt(f"{self.name}-{n}@example.net")
                code, reply = smtp.data(mail(f"load {self.name}", n))
                if code != 250:
                    raise smtplib.SMTPDataError(code, reply)
                self.accepted.append(reply.decode().rsplit(" ", 1)[-1])
                if not self.keepalive:
                    smtp.quit()
                    smtp = None
            # The relay went away between two of its mails, and the test said stop first.
            self.ended_by = "stop (between transactions)"
        except (smtplib.SMTPException, OSError) as exc:
            self.ended_by = repr(exc)
        finally:
            if smtp is not None:
                smtp.close()


@pytest.mark.system
def test_sigterm_with_a_silent_implicit_tls_client_stops_at_once(
    write_config: ConfigWriter, relay_process: Process, tls_files: TlsFiles
) -> None:
    """tls.implicit, and a client that connected and sent nothing (no TLS handshake): SIGTERM
    stops relay in a moment. It waited for that client for the whole 30 s drain, its
    listener already closed to Moodle."""
    config = write_config(
        ses={"enabled": False},
        tls={"cert": str(tls_files.cert), "key": str(tls_files.key), "implicit": True},
    )
    relay = relay_process(config).start()
    with socket.create_connection(("127.0.0.1", relay.port)):
        wait_until(lambda: "event=settled" in relay.log(), "relay serve settled")
        started = time.monotonic()
        code = relay.stop(signal.SIGTERM, timeout=60)
        took = time.monotonic() - started
    assert (0, True) == (code, took < 5), (took, relay.log())


@pytest.mark.system
def test_sigterm_under_load_loses_nothing(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer, tmp_path: Path
) -> None:
    """Six clients (half reusing their connection, like smtpmaxbulk) send without pause while
    the relay delivers; SIGTERM: exit 0 well within the deadline, every 250'd mail is in the
    spool, each one marked sent was delivered, and after a restart all of them are."""
    config = write_config(
        ses={"enabled": False}, upstream={"host": "127.0.0.1", "port": capture.port}
    )
    relay = relay_process(config).start()
    stop = threading.Event()
    clients = [Client(relay.port, keepalive=i % 2 == 1, name=f"c{i}") for i in range(6)]
    threads = [threading.Thread(target=c.run, args=(stop,)) for c in clients]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(len(c.accepted) for c in clients) >= 200, "200 mails accepted")
    started = time.monotonic()
    code = relay.stop(signal.SIGTERM, timeout=60)
    took = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(30)
    accepted = [qid for c in clients for qid in c.accepted]
    print(
        f"SIGTERM -> exit {code} in {took:.2f} s; {len(accepted)} mails accepted; "
        f"{len(capture.messages)} delivered before the stop"
    )
    assert 0 == code, relay.log()
    assert took < 35, took
    ended = [c.ended_by for c in clients]
    assert all(ended) and any(not e.startswith("stop") for e in ended), ended
    assert 200 <= len(accepted)

    spooled = rows(tmp_path / "spool")
    assert [] == [qid for qid in accepted if qid not in spooled]
    delivered = {m.queue_id for m in capture.messages}
    marked_sent = {qid for qid in accepted if spooled[qid]["state"] == "sent"}
    assert set() == marked_sent - delivered

    relay_process(config).start()  # the rest goes out after a restart
    wait_rows(tmp_path / "spool", accepted, {"sent"}, timeout=60)
    assert set() == set(accepted) - {m.queue_id for m in capture.messages}


# d. metrics, health, readiness, dashboard


def dashboard_metrics() -> set[str]:
    """Every relay_* metric name the Grafana dashboard queries (as exposed: _total, _bucket)."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    names: set[str] = set()

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                names.update(re.findall(r"\brelay_\w+", target.get("expr", "")))
            walk(panel.get("panels", []))

    walk(board.get("panels", []))
    return names


def exposed_names(text: str) -> set[str]:
    """Names a scrape exposes: sample names, and names declared by # HELP (a labelled
    counter with no observation yet has no sample, but Prometheus knows the name)."""
    found = set(re.findall(r"^# HELP (\w+)", text, re.M))
    found.update(re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{| )", text, re.M))
    return found


async def test_metrics_move_with_traffic_health_readiness_and_dashboard(
    aws_env: None, moto_server: str, start_relay: Any, capture: CaptureServer
) -> None:
    """With traffic to both routes, the received, classified and delivery counters move by
    exactly what was sent; /healthz is 200; /readyz is 200, 503 while the spool cannot
    commit, 200 again after; every metric the Grafana dashboard queries is in the scrape."""
    running = await start_relay(
        deliver=True,
        metrics="127.0.0.1:0",
        upstream={"host": "127.0.0.1", "port": capture.port},
        ses={"region": REGION, "endpoint_url": moto_server, "max_send_rate": 50},
    )
    for _ in range(500):  # the metrics task binds its port right after the service starts
        if running.ctx.metrics_port is not None:
            break
        await asyncio.sleep(0.02)
    port = running.ctx.metrics_port
    assert port is not None

    async def get(path: str) -> tuple[int, str]:  # off the loop: it serves the answer
        return await asyncio.to_thread(http_get, port, path)

    async def read() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return await asyncio.to_thread(scrape, port)

    before = await read()
    ids = [await asend(running.port, s.sender, [s.recipient], s.raw) for s in samples.samples()]
    done = await await_rows(running.ctx.spool.path.parent, ids)
    assert {"sent"} == {row["state"] for row in done.values()}
    after = await read()

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    expected = {
        "received": 4.0,
        "ses sent": 2.0,
        "upstream sent": 2.0,
        "student": 1.0,
        "cc": 1.0,
        "default": 2.0,
    }
    actual = {
        "received": moved("relay_received_messages_total"),
        "ses sent": moved("relay_deliveries_total", route="ses", outcome="sent"),
        "upstream sent": moved("relay_deliveries_total", route="upstream", outcome="sent"),
        "student": moved(
            "relay_classified_messages_total", rule="reengagement-student", route="ses"
        ),
        "cc": moved("relay_classified_messages_total", rule="reengagement-cc", route="ses"),
        "default": moved("relay_classified_messages_total", rule="(default)", route="upstream"),
    }
    assert expected == actual

    assert (200, "ok\n") == await get("/healthz")
    assert (200, "ready\n") == await get("/readyz")
    await running.ctx.spool.set_limits(read_only=True)
    try:
        await asyncio.sleep(READY_FOR)  # past the answer /readyz keeps
        assert 503 == (await get("/readyz"))[0]
        assert 200 == (await get("/healthz"))[0]  # alive, just not ready
    finally:
        await running.ctx.spool.set_limits(read_only=False)
    await asyncio.sleep(READY_FOR)
    assert (200, "ready\n") == await get("/readyz")

    queried = dashboard_metrics()
    assert 15 <= len(queried), queried  # the parser found the dashboard's queries
    _, text = await get("/metrics")
    assert set() == queried - exposed_names(text)


# e. relay demo


@pytest.mark.system
def test_demo_runs_and_shows_where_each_mail_went() -> None:
    """`relay demo` exits 0 within 20 s and shows each sample's route: re-engagement
    (student, CC) via SES with an SES MessageId, forum post and password reset upstream."""
    started = time.monotonic()
    done = relay_cli("demo", timeout=60)
    took = time.monotonic() - started
    print(done.stdout, f"({took:.1f} s)")
    assert 0 == done.returncode, done.stdout + done.stderr
    assert took < 20, took
    table = {line[:25].strip(): line.split() for line in done.stdout.splitlines()}
    found = {}
    for label, route in (
        ("re-engagement (student)", "ses"),
        ("re-engagement (CC copy)", "ses"),
        ("forum post", "upstream"),
        ("password reset", "upstream"),
    ):
        words = table[label]
        found[label] = (route in words, words[-1] != "-" if route == "ses" else words[-1] == "-")
    assert dict.fromkeys(found, (True, True)) == found, done.stdout
    assert "original host (NOT seen" not in done.stdout


def test_ctrl_c_in_the_middle_of_the_demo_stops_it_at_once(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once relay is up:
    the demo says "interrupted" and exits 130 within seconds, leaving no process. It waited
    out its 30 s deadlines, then printed every mail as "not delivered" and exited 1."""
    with subprocess.Popen(
        [*RELAY, "demo"],
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # once relay listens, the samples go
            assert first.startswith("relay listening on"), first
            os.killpg(proc.pid, signal.SIGINT)
            started = time.monotonic()
            _, stderr = proc.communicate(timeout=20)
            took = time.monotonic() - started
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert (130, True) == (proc.returncode, took < 5), (took, stderr)
    assert [] == list(tmp_path.iterdir())  # its directory and spool gone with it
    assert "relay demo: interrupted" in stderr, stderr


async def test_reload_moves_delivery_to_a_new_upstream_host(
    start_relay: Callable[..., Any], write_config: ConfigWriter
) -> None:
    """An `upstream` change in relay.yaml applies at SIGHUP: the next mail goes to the new
    host (kept-open connections to the old one are closed), none is lost or doubled."""

    with CaptureServer() as old, CaptureServer() as new:
        relay = await start_relay(deliver=True, upstream={"host": "127.0.0.1", "port": old.port})
        first = await asend(relay.port, "a@example.org", ["x@example.net"], mail("before"))
        await await_rows(relay.settings.spool, [first], {"sent"})
        write_config("relay0.yaml", upstream={"host": "127.0.0.1", "port": new.port})
        assert runtime.reload(relay.ctx)
        second = await asend(relay.port, "a@example.org", ["x@example.net"], mail("after"))
        await await_rows(relay.settings.spool, [second], {"sent"})
        assert [m.queue_id for m in old.messages] == [first]
        assert [m.queue_id for m in new.messages] == [second]


RELOAD_REFUSED = {
    # the variable is in relay.env, which systemd reads at a restart, not at a reload
    "password-env-unset": (
        {"username": "moodle", "password_env": "RELAY_TEST_UNSET_PASSWORD"},
        None,
        "upstream.password_env: RELAY_TEST_UNSET_PASSWORD is not set",
    ),
    "password-file-a-directory": (
        {"username": "moodle", "password_file": "."},
        None,
        "upstream.password_file:",
    ),
    "nul-in-a-path": ({}, "rules\0.yaml", "ValueError"),
}


@pytest.mark.parametrize(
    ("upstream", "rules", "said"), RELOAD_REFUSED.values(), ids=RELOAD_REFUSED.keys()
)
async def test_a_reload_relay_serve_would_refuse_at_start_keeps_the_old_settings(
    start_relay: Callable[..., Any],
    write_config: ConfigWriter,
    caplog: pytest.LogCaptureFixture,
    upstream: dict[str, str],
    rules: str | None,
    said: str,
) -> None:
    """A reload naming an upstream password relay cannot read (`relay serve` refuses that
    at start) applied it: every mail to the original host was then deferred until
    `retry.max_age`. A path with a NUL byte raised out of the reload and stopped relay
    serve. Each is now `reload_failed`, naming the problem, with the old settings kept."""
    relay = await start_relay()
    old = relay.ctx.settings
    extra = {"rules": rules} if rules else {}
    write_config("relay0.yaml", upstream={"host": "127.0.0.1", "port": 9, **upstream}, **extra)
    with caplog.at_level(logging.ERROR, logger="relay"):
        assert not runtime.reload(relay.ctx)
    failed = [r.getMessage() for r in caplog.records if "reload_failed" in r.getMessage()]
    assert (1, True, old) == (len(failed), said in failed[0], relay.ctx.settings), failed
    assert not relay.task.done()


async def test_reload_names_a_new_hostname_and_keeps_the_old_one(
    start_relay: Callable[..., Any], write_config: ConfigWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener puts `hostname` in each Received line from start; a reload applied it
    only to delivery (EHLO, the DSNs' From), silently. Now it waits for a restart, named."""
    relay = await start_relay()
    old = relay.ctx.settings.hostname
    write_config("relay0.yaml", hostname="new.example.org")
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert runtime.reload(relay.ctx)
    warned = [r.getMessage() for r in caplog.records if "reload_needs_restart" in r.getMessage()]
    assert (["keys=hostname"], old) == (
        [w[w.index("keys=") :] for w in warned],
        relay.ctx.settings.hostname,
    )


async def test_reload_names_the_ses_settings_that_need_a_restart(
    start_relay: Callable[..., Any], write_config: ConfigWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """Started with SES off: a SIGHUP reload that turns it on, moves its region and turns
    on suppression lookups applies the rest but says, in `reload_needs_restart`, that
    those three wait for a restart (no SES client, no lookups were made at start), and
    the region in effect stays the old one meanwhile (what a delivery process started in
    between is handed); switching it off again, in the old region, needs none."""
    relay = await start_relay(ses={"enabled": False, "suppressed": "send"})
    region = relay.ctx.settings.ses.region
    write_config(
        "relay0.yaml", ses={"enabled": True, "region": "eu-west-1", "suppressed": "upstream"}
    )
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert runtime.reload(relay.ctx)
    warned = [r.getMessage() for r in caplog.records if "reload_needs_restart" in r.getMessage()]
    assert 1 == len(warned), warned
    assert "keys=ses.region,ses.enabled,ses.suppressed" in warned[0], warned
    assert region == relay.ctx.settings.ses.region
    caplog.clear()
    write_config("relay0.yaml", ses={"enabled": False, "region": region})
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert runtime.reload(relay.ctx)
    assert not [r for r in caplog.records if "reload_needs_restart" in r.getMessage()]


def damage_the_state_index(spool: Path) -> None:
    """Overwrite the root page of the spool's (state, due_at) index with noise: what a disk
    fault leaves. Counting mail by state reads it; opening the spool does not."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(spool / "spool.sqlite3")) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        [root] = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'messages_due'"
        ).fetchone()
    with open(spool / "spool.sqlite3", "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(bytes(range(256)) * (page_size // 256))


@pytest.mark.system
def test_a_damaged_spool_is_said_at_error_on_readyz_and_in_a_metric(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer, tmp_path: Path
) -> None:
    """The spool file is damaged under a running service (a disk fault): SQLite says
    "malformed" at the next count by state. It was a WARNING every few seconds
    (`gauges_failed`, `claim_failed`) while /readyz said 200 and Moodle's mail kept being
    accepted into a file nothing could be delivered from. Now: `event=spool_damaged` at
    ERROR once per process, /readyz 503, and the damage metrics at 1 (alert
    RelaySpoolDamaged)."""
    config = write_config(
        ses={"enabled": False},
        metrics="127.0.0.1:0",
        upstream={"host": "127.0.0.1", "port": capture.port},
    )
    relay = relay_process(config).start()
    port = metrics_port(relay)
    for n in range(20):
        send(relay.port, "noreply@moodle.test", ["ada@example.net"], mail("hello", n))
    assert (200, 0.0) == (
        http_get(port, "/readyz")[0],
        scrape(port)[("relay_spool_damaged", frozenset())],
    )
    damage_the_state_index(tmp_path / "spool")
    # The delivery process reads the index at its next claim, the main process at its next
    # count of the queue (every 5 s): each says so in a family of its own.
    wait_until(lambda: 503 == http_get(port, "/readyz")[0], "/readyz 503", timeout=20)
    assert (1.0, 1.0) == (
        scrape(port)[("relay_spool_damaged", frozenset())],
        scrape(port)[("relay_delivery_spool_damaged", frozenset())],
    )
    damaged = [line for line in relay.log().splitlines() if "event=spool_damaged" in line]
    assert 2 == len(damaged) and all(" ERROR " in line for line in damaged), damaged


@pytest.mark.system
def test_a_sigterm_while_relay_serve_starts_stops_it_cleanly(
    write_config: ConfigWriter, relay_process: Process, capture: CaptureServer
) -> None:
    """SIGTERM as soon as relay serve catches it, long before its event loop runs (a
    `docker stop` right after a start): it is kept, and relay serve stops cleanly (exit 0)
    once started. It had no handler then: as PID 1 in a container the signal was ignored
    and the stop waited for SIGKILL; elsewhere it died of it."""
    config = write_config(
        ses={"enabled": False}, upstream={"host": "127.0.0.1", "port": capture.port}
    )
    relay = relay_process(config)
    with relay.log_path.open("wb") as log:
        relay.proc = subprocess.Popen(
            [*RELAY, "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    status = Path(f"/proc/{relay.proc.pid}/status")

    def caught() -> bool:
        with contextlib.suppress(OSError):
            bits = int(re.search(r"SigCgt:\s*(\w+)", status.read_text())[1], 16)  # type: ignore[index]
            return bool(bits & (1 << (signal.SIGTERM - 1)))
        return False

    wait_until(caught, "SIGTERM caught", step=0.001)
    relay.proc.send_signal(signal.SIGTERM)
    assert 0 == relay.proc.wait(20), relay.log()
    assert "event=stop_requested_at_start" in relay.log()


async def test_relay_serve_logs_the_rules_warnings_at_start_and_at_a_reload(
    start_relay: Callable[..., Any],
    write_config: ConfigWriter,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """A rule an earlier one always takes the mail from (the shipped rules upside down:
    the student rule first) loads, and relay serve says so at its start and at each reload
    that brings it, one `rules_warning` line at the rule's line; rules without one say
    nothing."""
    upside_down = tmp_path / "upside-down.yaml"
    upside_down.write_text(
        "rules:\n"
        "  - {name: student, route: ses, match: {header: {X-Moodle-Originating-Script: r}}}\n"
        "  - name: cc\n"
        "    route: ses\n"
        "    match: {header: {X-Moodle-Originating-Script: r, To: '@'}}\n",
        encoding="utf-8",
    )
    said = f"warning=\"{upside_down}:3: rule 'cc' never decides: rule 'student' (line 2)"

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "rules_warning" in r.getMessage()]
        caplog.clear()
        return found

    with caplog.at_level(logging.WARNING, logger="relay"):
        relay = await start_relay(rules=str(upside_down))
        at_start = warnings()
        write_config("relay0.yaml", rules=str(upside_down))
        assert runtime.reload(relay.ctx)
        at_reload = warnings()
        write_config("relay0.yaml")  # the shipped rules
        assert runtime.reload(relay.ctx)
        shipped = warnings()
    assert [1, 1, 0] == [len(at_start), len(at_reload), len(shipped)], (at_start, at_reload)
    assert said in at_start[0] and said in at_reload[0], (at_start, at_reload)
