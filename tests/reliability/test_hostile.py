"""Hostile and broken clients can neither stop `relay serve` nor make it lose mail (issue 11).

Each scenario runs a real `relay serve` process on 127.0.0.1 and prints its figure.
A flood comes from other loopback source addresses (127.0.0.2 and up: one
"client" per address), so that the well-behaved client, on 127.0.0.1 like
Moodle, is a different client to relay's per-address cap.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.capture import CaptureServer
from tests.conftest import ConfigWriter
from tests.fakeses import FakeSes
from tests.reliability.helpers import MailFactory, free_port, try_send
from tests.sesfixtures import REGION

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("aws_env")]

RELAY = [sys.executable, "-c", "import sys; from relay.cli import main; sys.exit(main())"]


@dataclass
class Limited:
    """`relay serve` started under `ulimit -n NOFILE` (soft and hard)."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> int:
        return self.log().count("\n")


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Callable[..., Limited]]:
    """`limited(config, nofile=1024)`: relay serve with that open-file limit; killed after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path, *, nofile: int = 1024, wait: bool = True) -> Limited:
        port_file = tmp_path / f"port.{len(started)}"
        log_path = tmp_path / f"relay.{len(started)}.log"
        env = {**os.environ, "RELAY_PORT_FILE": str(port_file), "PYTHONUNBUFFERED": "1"}

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*RELAY, "serve", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=limit,
            )
        started.append(proc)
        deadline = time.monotonic() + 15
        while wait and not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        port = int(port_file.read_text()) if port_file.exists() else 0
        return Limited(proc, port, log_path)

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def healthz(port: int, timeout: float) -> tuple[int, float]:
    """(HTTP status, seconds) of GET /healthz; status 0 when it did not answer."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            status = r.status
    except OSError:
        status = 0
    return status, time.monotonic() - started


def heard(sock: socket.socket) -> str:
    """The last reply line already received on `sock`, without waiting ("" if none yet)."""
    try:
        text = sock.recv(4096, socket.MSG_DONTWAIT).decode(errors="replace")
    except (BlockingIOError, OSError):
        return ""
    return text.rstrip("\r\n").rsplit("\r\n", 1)[-1]


FLOOD = 1100
PER_SOURCE = 50  # connections per flooding source address (the per-client cap)


def test_a_connection_flood_under_1024_files_leaves_room_for_moodle(
    write_config: ConfigWriter,
    limited: Callable[..., Limited],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Must show 1. Under `ulimit -n 1024`, 1,100 idle connections from 22 addresses are
    held open by the flooder: relay keeps to its caps (max_sessions 500, 50 per client,
    421 4.7.0 beyond), a new well-behaved client still gets 250 within 5 s, /healthz
    answers within 2 s, and relay logs fewer than 5,000 lines during the flood."""
    metrics_port = free_port()
    config = write_config(
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 500, "timeout": 5},
        metrics=f"127.0.0.1:{metrics_port}",
    )
    relay = limited(config, nofile=1024)
    assert relay.port, relay.log()
    assert "event=open_files soft=1024 hard=1024 max_sessions=500" in relay.log()
    before = relay.lines()
    flood: list[socket.socket] = []
    try:
        started = time.monotonic()
        for n in range(FLOOD):
            source = f"127.0.0.{2 + n // PER_SOURCE}"
            sock = socket.create_connection(
                ("127.0.0.1", relay.port), timeout=5, source_address=(source, 0)
            )
            flood.append(sock)
        opened = time.monotonic() - started
        time.sleep(1.5)  # they idle: the first ones are now "silent" to relay
        replies = [heard(sock) for sock in flood]
        mail = MailFactory("flood")()
        sent_at = time.monotonic()
        reply = try_send(relay.port, mail, timeout=10)
        took = time.monotonic() - sent_at
        status, health_took = healthz(metrics_port, timeout=2)
        during = relay.lines() - before
    finally:
        for sock in flood:
            sock.close()
    held = sum(r.startswith("220 ") for r in replies)  # greeted, not closed since
    refused = sum(r.startswith("421 4.7.0") for r in replies)
    print(
        f"connection flood (ulimit -n 1024): {FLOOD} connections opened in {opened:.2f}s "
        f"from {FLOOD // PER_SOURCE} addresses: relay holds {held}, {refused} got 421 4.7.0; "
        f"new client's mail: {reply.text[:40]!r} in {took:.3f}s; /healthz {status} in "
        f"{health_took:.3f}s; relay log lines during the flood: {during}"
    )
    assert 250 == reply.code, reply.text
    assert took < 5.0
    assert (200, True) == (status, health_took < 2.0)
    assert during < 5000
    assert held <= 500
    assert "Traceback" not in relay.log()


def test_max_sessions_that_cannot_fit_the_open_file_limit_is_refused_at_start(
    write_config: ConfigWriter, limited: Callable[..., Limited]
) -> None:
    """max_sessions 1000 under `ulimit -n 1024`: relay serve exits 1 naming the key,
    the limit and what would fit, before it listens."""
    config = write_config(limits={"max_sessions": 1000, "max_sessions_per_ip": 50})
    relay = limited(config, nofile=1024, wait=False)
    code = relay.proc.wait(15)
    print(f"max_sessions 1000 under 1024 files: exit {code}; {relay.log().strip()[-200:]}")
    assert 1 == code
    assert "limits.max_sessions 1000 needs 1100 open files" in relay.log()
    assert "at most 924" in relay.log()
