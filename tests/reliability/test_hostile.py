"""Hostile and broken clients can neither stop `relay serve` nor make it lose mail (issue 11).

Each scenario runs a real `relay serve` process on 127.0.0.1 and prints its figure.
A flood comes from other loopback source addresses (127.0.0.2 and up: one
"client" per address), so that the well-behaved client, on 127.0.0.1 like
Moodle, is a different client to relay's per-address cap.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import resource
import signal
import smtplib
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.receive.handler import extract_message_id
from relay.receive.passwords import hash_password
from relay.spool import DB_NAME
from tests.support.addresses import Connect
from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.mails import ORIGIN, MailFactory
from tests.support.operate import http_get
from tests.support.operate import metrics_port as logged_metrics_port
from tests.support.ports import free_port
from tests.support.processes import RelayProcess
from tests.support.relays import ConfigWriter
from tests.support.smtp import send, try_send
from tests.support.spools import rows
from tests.support.tls import TlsFiles
from tests.support.waits import wait_until

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
        scraped_at = time.monotonic()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as answer:
            scrape = answer.read().decode()
        scrape_took = time.monotonic() - scraped_at
        during = relay.lines() - before
    finally:
        for sock in flood:
            sock.close()
    held = sum(r.startswith("220 ") for r in replies)  # greeted, not closed since
    refused = sum(r.startswith("421 4.7.0") for r in replies)
    counted = re.findall(r'relay_sessions_refused_total\{reason="(\w+)"\} (\d+)', scrape)
    print(
        f"connection flood (ulimit -n 1024): {FLOOD} connections opened in {opened:.2f}s "
        f"from {FLOOD // PER_SOURCE} addresses: relay holds {held}, {refused} got 421 4.7.0; "
        f"new client's mail: {reply.text[:40]!r} in {took:.3f}s; /healthz {status} in "
        f"{health_took:.3f}s, /metrics in {scrape_took:.3f}s counting refusals {counted}; "
        f"relay log lines during the flood: {during}"
    )
    assert 250 == reply.code, reply.text
    assert took < 5.0
    assert (200, True) == (status, health_took < 2.0)
    assert during < 5000
    assert held <= 500
    assert scrape_took < 2.0
    assert refused <= sum(int(n) for _, n in counted)
    assert "Traceback" not in relay.log()


def test_an_ipv6_client_is_counted_by_its_prefix_not_its_address(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    ipv6_clients: Callable[[str], Connect],
) -> None:
    """max_sessions_per_ip 5 on [::1]: five connections from five addresses of one /84
    are held, a sixth from yet another address of it gets 421 4.7.0, as Postfix 3.8
    counts them (smtpd_client_ipv6_prefix_length 84). A client of the next /84 and
    Moodle on ::1 still get in, and Moodle's mail is queued and delivered. Counted by
    address, all six were let in: a host with a /64 had 2**64 "clients"."""
    relay = relay_process(
        write_config(
            listen="[::1]:0",
            upstream={"host": "127.0.0.1", "port": capture.port},
            limits={"max_sessions_per_ip": 5},
        )
    )
    relay.host = "::1"
    relay.start()
    held = [ipv6_clients(f"2001:db8:5e55::{n:x}")(relay.port) for n in range(1, 6)]
    sixth = ipv6_clients("2001:db8:5e55::f:ffff")(relay.port)  # the same /84
    neighbour = ipv6_clients("2001:db8:5e55:0:0:1000::1")(relay.port)  # the next /84
    greetings = [sock.recv(200).decode(errors="replace")[:9] for sock in [*held, sixth, neighbour]]
    mail = MailFactory("ipv6")()
    while mail.route != "upstream":
        mail = MailFactory("ipv6")()
    with smtplib.SMTP("::1", relay.port, timeout=10) as client:
        client.ehlo("moodle.test")
        client.mail(mail.sender)
        for rcpt in mail.recipients:
            client.rcpt(rcpt)
        code, _ = client.data(mail.raw)
    delivered = [m for m in capture.wait_for(1, timeout=30) if m.message_id == mail.message_id]
    for sock in [*held, sixth, neighbour]:
        sock.close()
    print(f"IPv6 /84: greetings {greetings}; Moodle on ::1: {code}, delivered {bool(delivered)}")
    assert ["220 relay"] * 5 == greetings[:5]
    assert "421 4.7.0" == greetings[5]
    assert "220 relay" == greetings[6]
    assert 250 == code and delivered
    assert "2001:db8:5e55::/84" in relay.log_path.read_text()


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
    assert "limits.max_sessions 1000 needs 1132 open files (132 reserved)" in relay.log()
    assert "at most 892" in relay.log()


class Wire:
    """A raw SMTP client socket: commands and (last line of) replies, timed."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """The reply's last line; "" once the server has closed the connection."""
        while True:
            line = self.file.readline()
            if not line:
                return ""
            if line[3:4] != b"-":
                return line.decode(errors="replace").rstrip("\r\n")

    def command(self, text: str) -> str:
        try:
            self.sock.sendall(f"{text}\r\n".encode())
        except OSError:
            return ""
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
def auth_relay(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess], tmp_path: Path
) -> RelayProcess:
    """relay serve with AUTH (loopback, no TLS): user moodle, password "right horse"."""
    users = tmp_path / "users"
    users.write_text(f"moodle:{hash_password('right horse')}\n", encoding="utf-8")
    return relay_process(write_config(auth={"users_file": str(users)})).start()


def test_a_password_guesser_is_cut_off_and_slowed(auth_relay: RelayProcess) -> None:
    """Must show 3a. One connection sends wrong passwords until relay closes it: closed
    within 30 attempts (max_auth_failures 5: the 5th gets 421 4.7.0), each 535 slower
    than the one before; the right password on a new connection still works; the
    password is in no log line."""
    wire = Wire(auth_relay.port)
    wire.reply()
    wire.command("EHLO guesser.test")
    attempts, timings, last = 0, [], ""
    while attempts < 30:
        started = time.monotonic()
        last = wire.command(plain("moodle", f"guess{attempts}"))
        timings.append(time.monotonic() - started)
        attempts += 1
        if not last.startswith("535"):
            break
    closed = "" == wire.reply()
    wire.close()
    good = Wire(auth_relay.port)
    good.reply()
    good.command("EHLO moodle.test")
    right = good.command(plain("moodle", "right horse"))
    good.close()
    print(
        f"AUTH guessing: connection closed after {attempts} wrong passwords with {last!r}; "
        f"reply times {', '.join(f'{t:.2f}s' for t in timings)}; right password then: "
        f"{right[:3]}"
    )
    assert attempts <= 30
    assert (5, True) == (attempts, closed)
    assert last.startswith("421 4.7.0")
    assert timings == sorted(timings)
    assert right.startswith("235")
    text = auth_relay.log()
    assert "event=auth_failed" in text and "peer=127.0.0.1" in text
    assert "guess1" not in text and "right horse" not in text


def test_a_guesser_that_hangs_up_before_the_answer_is_counted(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess], tmp_path: Path
) -> None:
    """Twelve connections each send a wrong password and hang up 50 ms later, while its
    check (a scrypt of about 0.25 s here, p=8) still runs. Each is a failure from the
    client all the same (relay_auth_failures_total), so its next guess waits what it
    earned past its ten free failures (3 s for the thirteenth). Hanging up, a guesser was
    never counted, slowed or logged. They are logged sampled (event=auth_abandoned, at
    most one line per 10 s with a count): one a line, a client hanging up as fast as it
    connects wrote 340 KB of log a second."""
    users = tmp_path / "users"
    users.write_text(f"moodle:{hash_password('right horse', p=8)}\n", encoding="utf-8")
    config = write_config(auth={"users_file": str(users)}, metrics="127.0.0.1:0")
    relay = relay_process(config).start()
    metrics_at = logged_metrics_port(relay)
    for n in range(12):
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
            sock.recv(1000)  # the greeting
            sock.sendall(f"EHLO hangup.test\r\n{plain('moodle', f'guess{n}')}\r\n".encode())
            time.sleep(0.05)  # the AUTH read, its check begun
    wait_until(
        lambda: "relay_auth_failures_total 12.0" in http_get(metrics_at, "/metrics")[1],
        "twelve failures counted",
    )
    assert 1 == relay.log().count("event=auth_abandoned")
    wire = Wire(relay.port)
    wire.reply()
    wire.command("EHLO hangup.test")
    started = time.monotonic()
    reply = wire.command(plain("moodle", "thirteenth"))
    took = time.monotonic() - started
    wire.close()
    print(f"12 AUTHs hung up on while checked: the 13th {reply[:3]} in {took:.2f} s")
    assert reply.startswith("535")
    assert took >= 2.5


def test_an_unknown_user_costs_what_a_wrong_password_costs(auth_relay: RelayProcess) -> None:
    """Must show 3b. Fresh connections, alternating: an unknown user, then the known user
    with a wrong password, 5 each (within the address's 10 undelayed failures): the
    median AUTH reply time of the unknown user is within 3x of the known user's."""
    unknown: list[float] = []
    known: list[float] = []
    for n in range(10):
        wire = Wire(auth_relay.port)
        wire.reply()
        wire.command("EHLO timing.test")
        user = f"nobody{n}" if n % 2 == 0 else "moodle"
        started = time.monotonic()
        reply = wire.command(plain(user, "wrong"))
        (unknown if n % 2 == 0 else known).append(time.monotonic() - started)
        assert reply.startswith("535"), reply
        wire.close()
    ratio = statistics.median(unknown) / statistics.median(known)
    print(
        f"AUTH timing: median unknown user {statistics.median(unknown) * 1000:.1f} ms, "
        f"known user wrong password {statistics.median(known) * 1000:.1f} ms, ratio {ratio:.2f}"
    )
    assert 1 / 3 <= ratio <= 3


def test_a_noop_stream_is_cut_but_a_kept_alive_moodle_is_not(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """Must show 4. 1,000 NOOPs on one connection: closed (421 4.7.0) before the
    thousandth; meanwhile a kept-alive PHPMailer-like connection sends 150 mails, each
    followed by RSET (150 junk commands in all), and every mail gets 250."""
    relay = relay_process(write_config()).start()
    wire = Wire(relay.port)
    wire.reply()
    wire.command("EHLO noop.test")
    answered, last = 0, ""
    for _ in range(1000):
        last = wire.command("NOOP")
        if not last.startswith("250"):
            break
        answered += 1
    wire.close()
    moodle = Wire(relay.port)
    moodle.reply()
    moodle.command("EHLO moodle.test")
    queued = 0
    for n in range(150):
        moodle.command("MAIL FROM:<noreply@moodle.example.org>")
        moodle.command(f"RCPT TO:<student{n}@students.example.org>")
        moodle.command("DATA")
        queued += moodle.command(f"Subject: {n}\r\n\r\nHello.\r\n.").startswith("250 2.0.0")
        moodle.command("RSET")
    moodle.close()
    print(
        f"junk commands: {answered} NOOPs answered 250, then {last!r}; a kept-alive client "
        f"with RSET after each mail: {queued} of 150 mails queued"
    )
    assert answered < 1000
    assert 100 == answered
    assert last.startswith("421 4.7.0")
    assert 150 == queued


def test_idle_timeout_runs_from_the_last_read_and_sessions_end(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """idle_timeout 2 s, session_timeout 6 s: a DATA upload of 5 s with a line every
    0.5 s is accepted (aiosmtpd cut DATA 300 s after the DATA command, whatever came
    since); a client silent for 2 s mid-DATA gets 421 4.4.2; a session that keeps
    talking (NOOP, RSET) is closed with 421 4.4.2 after 6 s."""
    relay = relay_process(write_config(limits={"idle_timeout": 2, "session_timeout": 6})).start()

    def transaction(wire: Wire) -> None:
        wire.reply()
        wire.command("EHLO slow.test")
        wire.command("MAIL FROM:<noreply@moodle.example.org>")
        wire.command("RCPT TO:<student@students.example.org>")
        assert wire.command("DATA").startswith("354")

    def slow_upload() -> tuple[str, float]:
        slow = Wire(relay.port)
        transaction(slow)
        started = time.monotonic()
        for n in range(10):
            slow.sock.sendall(f"line {n}\r\n".encode())
            time.sleep(0.5)
        upload = slow.command(".")
        slow.close()
        return upload, time.monotonic() - started

    def silent_mid_data() -> tuple[str, float]:
        silent = Wire(relay.port)
        transaction(silent)
        silent.sock.sendall(b"Subject: half\r\n")
        started = time.monotonic()
        cut = silent.reply()
        silent.close()
        return cut, time.monotonic() - started

    def chatty_session() -> tuple[str, float]:
        chatty = Wire(relay.port)
        chatty.reply()
        started = time.monotonic()
        last = ""
        while time.monotonic() - started < 15:
            last = chatty.command("RSET" if int(time.monotonic() * 2) % 2 else "NOOP")
            if not last.startswith("250"):
                break
            time.sleep(0.5)
        chatty.close()
        return last, time.monotonic() - started

    # Side by side: each session has its own timers (13 s one after the other)
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(f) for f in (slow_upload, silent_mid_data, chatty_session)]
        (upload, upload_took), (cut, silent_took), (last, chatty_took) = (r.result() for r in runs)
    print(
        f"timeouts (idle 2 s, session 6 s): a {upload_took:.1f}s DATA upload got "
        f"{upload[:24]!r}; silent mid-DATA cut after {silent_took:.1f}s with {cut!r}; "
        f"a chatty session closed after {chatty_took:.1f}s with {last!r}"
    )
    assert upload.startswith("250 2.0.0")
    assert cut.startswith("421 4.4.2") and 1.5 < silent_took < 4
    assert last.startswith("421 4.4.2") and 5 < chatty_took < 9


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stuff(sock: socket.socket, command: bytes, *, most: int = 64 << 20) -> int:
    """Send `command` over and over, never reading, until the socket takes no more
    (both sides' buffers full: relay's replies wait in its own); bytes sent."""
    sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < most:
            sent += sock.send(command * 512)
    return sent


def dropped(sock: socket.socket) -> bool:
    """Whether the server has closed or reset the connection (read what is left)."""
    sock.setblocking(True)
    sock.settimeout(5)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False  # still open: what was buffered is read and nothing more comes
    return True


def closed_by_relay(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has closed or reset (`dropped`); all closed after."""
    try:
        return sum(dropped(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()


# Five: with twenty, the sessions closed within seconds even without the linger's abort
# (seen, not explained: the kernel was short of socket memory); with five they stay open.
NON_READERS = 5
# EHLO after EHLO is junk since the EHLO storms: the junk limit would close them first
NON_READER_LIMITS = {"idle_timeout": 2, "max_junk_commands": 1_000_000}


def test_clients_that_quit_and_never_read_their_replies_are_dropped(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """Five clients with a small MSS and receive buffer pipeline a thousand EHLOs and QUIT,
    and never read. relay serve answers QUIT with 221 and closes, but close() waits for the
    replies still in its buffer, which never leave: each socket, and its file, stayed open
    for good (no timer drops a session that is closing; once evicted, the session caps did
    not count it either, so one client could use up every file). Now each is dropped
    within the linger after QUIT, and relay serve's open files are back to what they were."""
    relay = relay_process(write_config(limits=NON_READER_LIMITS)).start()
    assert relay.proc is not None
    time.sleep(1.0)  # its delivery process started, its files settled
    before = open_files(relay.proc.pid)
    clients = []
    for n in range(NON_READERS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
        sock.bind((f"127.0.0.{2 + n}", 0))
        sock.connect(("127.0.0.1", relay.port))
        sock.sendall(b"EHLO quitter.test\r\n" * (800 + 100 * n) + b"QUIT\r\n")
        clients.append(sock)
    # Answered until the buffers are full, then QUIT is read: the most files over that second
    # (the one sample at its end missed a client dropped a moment early, on a busy machine).
    during = 0
    for _ in range(20):
        time.sleep(0.05)
        during = max(during, open_files(relay.proc.pid))
    started = time.monotonic()
    deadline = started + 20
    while (after := open_files(relay.proc.pid)) > before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    waited = time.monotonic() - started
    for sock in clients:  # whether each sees a reset or the end of its replies depends on
        sock.close()  # how far they got: relay serve's files are what this is about
    print(
        f"{NON_READERS} clients quitting unread: relay serve's open files {before} -> "
        f"{during} -> {after} after {waited:.1f} s more"
    )
    assert during >= before + NON_READERS
    assert after <= before + 1  # one of relay serve's own may come and go meanwhile


def test_clients_that_never_read_their_replies_are_dropped(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """idle_timeout 2 s: five clients (127.0.0.2 and up), with small receive buffers,
    pipeline EHLO until no buffer takes more and never read a reply. Moodle's mail
    meanwhile is queued within a second: no such client keeps the event loop to itself
    (each one did for half a second, answering EHLO after EHLO). relay serve cuts each
    off after 2 s of silence, and its 421 cannot go out either: close() alone would wait
    for ever for the replies to leave, keeping each socket (and file) open. Within the
    linger (2 s here) they are dropped: relay serve's open files are back to what they
    were."""
    relay = relay_process(write_config(limits=NON_READER_LIMITS)).start()
    assert relay.proc is not None
    # A first mail opens the files relay serve keeps from its first add on (the spool's
    # connection, its write-turn locks, a read connection's file SQLite holds for reuse).
    assert 250 == try_send(relay.port, MailFactory("first")(), timeout=10).code
    time.sleep(0.5)
    before = open_files(relay.proc.pid)
    clients, stuffed = [], []
    for n in range(NON_READERS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((f"127.0.0.{2 + n}", 0))
        sock.connect(("127.0.0.1", relay.port))
        clients.append(sock)
        stuffed.append(stuff(sock, b"EHLO reader.test\r\n"))
    started = time.monotonic()
    reply = try_send(relay.port, MailFactory("unread")(), timeout=10)
    took = time.monotonic() - started
    time.sleep(0.5)  # accepted, and answered until their replies fill the buffers
    during = open_files(relay.proc.pid)
    # Each is answered until its buffers are full (seconds of EHLO replies), then silent
    # for the idle timeout, then given the linger: all of that well within 20 s.
    deadline = time.monotonic() + 20
    while (after := open_files(relay.proc.pid)) >= before + NON_READERS and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    waited = time.monotonic() - started
    gone = closed_by_relay(clients)
    print(
        f"{NON_READERS} clients never reading, {min(stuffed) >> 10} KiB of EHLO or more "
        f"each; relay serve's open files {before} -> {during} -> {after} after {waited:.1f} s; "
        f"{gone} dropped; Moodle's mail meanwhile: {reply.text[:40]!r} in {took:.3f}s"
    )
    assert 250 == reply.code, reply.text
    assert took < 1.0
    assert during >= before + NON_READERS
    assert after < before + 5
    assert NON_READERS == gone
    assert "Traceback" not in relay.log()


def test_recipients_past_the_overshoot_limit_count_as_junk(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """One transaction, RCPT after RCPT: the first 50 (max_recipients) get 250, the next
    1,000 (Postfix's smtpd_recipient_overshoot_limit) 452 4.5.3 and are not counted, and
    each one after that counts as junk: the 101st (max_junk_commands 100) ends the session
    with 421 4.7.0, instead of a client going on for the whole session_timeout."""
    relay = relay_process(write_config()).start()
    wire = Wire(relay.port)
    wire.reply()
    wire.command("EHLO many.test")
    wire.command("MAIL FROM:<noreply@moodle.example.org>")
    replies: Counter[str] = Counter()
    last = ""
    for n in range(5000):
        last = wire.command(f"RCPT TO:<student{n}@students.example.org>")
        if not last.startswith(("250", "452")):
            break
        replies[last[:9]] += 1
    wire.close()
    print(f"5,000 RCPTs in one transaction: {dict(replies)}, then {last!r}")
    assert {"250 2.1.5": 50, "452 4.5.3": 1101} == dict(replies)
    assert last.startswith("421 4.7.0")


def test_implicit_tls_counts_a_connection_before_its_handshake(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess], tls_files: TlsFiles
) -> None:
    """tls.implicit, max_sessions_per_ip 5: twenty connections that never send a
    ClientHello. Counted at connect, as any other, only five are held (the other fifteen
    get 421 4.7.0); after a second of their silence a real TLS client evicts one of them
    and its mail is queued; the four left are closed at the handshake timeout
    (idle_timeout, 2 s here). With the listener doing TLS itself (create_server(ssl=...)),
    a session was counted only once its handshake was done: all twenty were held,
    uncounted and never evicted, for asyncio's 60 s."""
    relay = relay_process(
        write_config(
            limits={"max_sessions_per_ip": 5, "idle_timeout": 2},
            tls={"cert": str(tls_files.cert), "key": str(tls_files.key), "implicit": True},
        )
    ).start()
    silent = [socket.create_connection(("127.0.0.1", relay.port), timeout=5) for _ in range(20)]
    time.sleep(1.2)
    refused = 0
    for sock in silent:
        sock.settimeout(0.05)
        with contextlib.suppress(TimeoutError):
            refused += sock.recv(100).startswith(b"421 4.7.0")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    mail = MailFactory("tls")()
    with smtplib.SMTP_SSL("127.0.0.1", relay.port, context=context, timeout=10) as client:
        client.ehlo("moodle.test")
        client.mail(mail.sender)
        for rcpt in mail.recipients:
            client.rcpt(rcpt)
        code, text = client.data(mail.raw)
    time.sleep(2.5)  # the handshake timeout: min(idle_timeout, 60 s)
    closed = closed_by_relay(silent)
    print(
        f"implicit TLS: 20 silent connections, {refused} got 421; Moodle's mail: {code} "
        f"{text!r}; closed by relay 2.5 s later (the handshake timeout): {closed}"
    )
    assert (15, 250, 20) == (refused, code, closed)
    assert "Traceback" not in relay.log()


def test_an_overlong_auth_line_is_junk(auth_relay: RelayProcess) -> None:
    """AUTH LOGIN answered with a 2,000-byte line, 150 times on one connection: each gets
    RFC 4954's 500 5.5.6, which counts as junk (max_junk_commands 100), so the
    connection ends with 421 4.7.0; no ERROR, no traceback in the log."""
    wire = Wire(auth_relay.port)
    wire.reply()
    wire.command("EHLO long.test")
    replies: Counter[str] = Counter()
    last = ""
    for _ in range(150):
        challenge = wire.command("AUTH LOGIN")
        if not challenge.startswith("334"):
            last = challenge
            break
        last = wire.command("A" * 2000)
        replies[last[:9]] += 1
        if not last.startswith("5"):
            break
    wire.close()
    text = auth_relay.log()
    print(f"AUTH LOGIN with 2,000-byte answers: {dict(replies)}, then {last!r}")
    assert last.startswith("421 4.7.0")
    assert {"500 5.5.6"} == set(replies)
    assert "ERROR" not in text and "Traceback" not in text


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of process `pid`, MiB (VmRSS, VmHWM)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


HOARDERS = 150
HOARD = 9_500_000  # bytes of DATA each, under max_message_size (10 MiB): never refused


def test_data_hoarders_cost_disk_not_memory_and_lose_nothing(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Must show 2. 150 sessions each send ~9.5 MB of DATA and never finish: the main
    process's peak RSS stays under 400 MiB (max_data_in_memory 256 MiB, the rest spilled
    to temporary files in the spool directory); a well-behaved client still gets 250 and
    its mail reaches the original host byte for byte; one hoarder that finishes gets 250
    with all its bytes stored. Then all the others end their data at once: each gets 250,
    and the peak RSS stays under 750 MiB (each spilled body is read back whole to be
    spooled, and no more of them than max_data_in_memory at a time: 1.4 GB of them
    together before: a 1.8 GiB peak). RSS comes back down once the hoarders leave."""
    config = write_config(
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 500, "timeout": 5},
    )
    relay = relay_process(config).start()
    assert relay.proc is not None
    pid = relay.proc.pid
    baseline, _ = rss_mib(pid)
    line = b"x" * 998 + b"\r\n"
    piece = line * 64  # 64,000 bytes
    hoarders: list[Wire] = []
    started = time.monotonic()
    try:
        for n in range(HOARDERS):
            wire = Wire(relay.port, source=f"127.0.0.{2 + n // 40}")
            wire.reply()
            wire.command("EHLO hoarder.test")
            wire.command("MAIL FROM:<noreply@moodle.example.org>")
            wire.command(f"RCPT TO:<h{n}@students.example.org>")
            assert wire.command("DATA").startswith("354")
            hoarders.append(wire)
        for _ in range(HOARD // len(piece)):
            for wire in hoarders:
                wire.sock.sendall(piece)
        fed = time.monotonic() - started
        time.sleep(1.0)
        during, _ = rss_mib(pid)
        factory = MailFactory("hoard")
        mail = factory()
        while mail.route != "upstream":
            mail = factory()
        reply = try_send(relay.port, mail)
        finisher = hoarders.pop()
        finished = finisher.command(".")
        finisher.close()
        _, peak = rss_mib(pid)
        wait_until(  # the well-behaved mail delivered; the hoards need not follow it
            lambda: any(m.message_id == mail.message_id for m in capture.messages),
            "the well-behaved mail at the original host",
            timeout=30,
        )
        capture.mail_reply = "451 4.3.0 Not now"
        for wire in hoarders:  # and now all the others at once
            # The reply after the dot is waited for as a client waits (Postfix's
            # smtp_data_done_timeout: 600 s): 1.4 GB spooled at once took 27 s here, and
            # over the socket's 30 s once in CI, with both cores busy.
            wire.sock.settimeout(120)
            wire.sock.sendall(b".\r\n")
        ended = time.monotonic()
        together = Counter(wire.reply()[:9] for wire in hoarders)
        ended = time.monotonic() - ended
        _, peak_together = rss_mib(pid)
    finally:
        for wire in hoarders:
            wire.close()
    # Memory goes back once the bodies are spooled and freed (Budget's malloc_trim): 89-153
    # MiB here 3 s after, but 161 and 171 in CI, where the suite keeps both cores busy:
    # under baseline + 150 still tells it from the 260-360 held while they hoard.
    left = time.monotonic()
    time.sleep(3.0)
    while (after := rss_mib(pid)[0]) >= baseline + 150 and time.monotonic() - left < 15:
        time.sleep(0.5)
    left = time.monotonic() - left
    captured = [m for m in capture.wait_for(1, timeout=30) if m.message_id == mail.message_id]
    conn = sqlite3.connect(config.parent / "spool" / DB_NAME)
    try:
        sizes = dict(conn.execute("SELECT id, size FROM messages"))
    finally:
        conn.close()
    finished_id = finished.rsplit(" ", 1)[-1]
    print(
        f"DATA hoarding: {HOARDERS} sessions x {HOARD / 1e6:.1f} MB fed in {fed:.1f}s; main "
        f"process RSS baseline {baseline:.0f} MiB, during {during:.0f} MiB, peak "
        f"{peak:.0f} MiB, {left:.1f} s after they left {after:.0f} MiB; well-behaved client "
        f"{reply.text[:24]!r}, delivered intact: {bool(captured)}; finishing hoarder "
        f"{finished[:24]!r}, stored {sizes.get(finished_id)} bytes; the other "
        f"{HOARDERS - 1} ending at once: {dict(together)} in {ended:.1f}s, peak RSS "
        f"{peak_together:.0f} MiB"
    )
    assert peak < 400
    assert {"250 2.0.0": HOARDERS - 1} == dict(together)
    assert peak_together < 750
    assert 250 == reply.code
    assert captured and captured[0].content.endswith(mail.raw)
    assert finished.startswith("250 2.0.0")
    assert HOARD // len(piece) * len(piece) == sizes[finished_id]
    assert after < baseline + 150


LOOKALIKES = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-lf": b"\r.\n",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "lf-dot-cr": b"\n.\r",
}
SMUGGLED = (
    b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@victim.example>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled\r\n"
)
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def test_bare_newline_look_alikes_smuggle_nothing_and_reach_ses_normalized(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """Must show 5. Each of the 8 bare CR/LF end-of-data look-alikes, hiding a second
    MAIL/RCPT/DATA, in an SES-routed and in an upstream-routed mail (16 transactions):
    each gets one 250; SES and the original host each see exactly one message per
    accepted transaction routed there, none for the smuggled recipient; no bare CR or LF
    is left in what SES gets, and each mail's history says it was normalized."""
    config = write_config(
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 500, "timeout": 5},
        retry={"schedule": [1], "max_age": 600},
    )
    relay = relay_process(config).start()
    factory = MailFactory("bare")
    mails = {"ses": [], "upstream": []}  # type: dict[str, list[Outgoing]]
    while min(len(v) for v in mails.values()) < len(LOOKALIKES):
        mail = factory()
        mails[mail.route].append(mail)
    accepted: dict[str, tuple[str, str]] = {}  # queue id -> (route, Message-ID)
    replies: list[str] = []
    for route, chosen in mails.items():
        for mail, (name, lookalike) in zip(chosen, LOOKALIKES.items(), strict=False):
            wire = Wire(relay.port)
            wire.reply()
            wire.command("EHLO moodle.test")
            wire.command(f"MAIL FROM:<{mail.sender}>")
            for rcpt in mail.recipients:
                wire.command(f"RCPT TO:<{rcpt}>")
            assert wire.command("DATA").startswith("354")
            body = mail.raw + b"before " + name.encode() + lookalike + SMUGGLED + b"after\r\n"
            wire.sock.sendall(body + b".\r\n")
            reply = wire.reply()
            replies.append(reply)
            extra = wire.command("QUIT")
            wire.close()
            assert extra.startswith("221"), (name, extra)  # nothing smuggled answered
            if reply.startswith("250 "):
                accepted[reply.rsplit(" ", 1)[-1]] = (route, mail.message_id)
    routes = Counter(route for route, _ in accepted.values())
    capture.wait_for(routes["upstream"], timeout=30)
    wait_until(lambda: len(fake_ses.sent) >= routes["ses"], "SES sends", timeout=30)
    time.sleep(2.0)  # anything extra would have arrived by now
    ses_ids = Counter(extract_message_id(s.raw) for s in fake_ses.sent)
    upstream_ids = Counter(m.message_id for m in capture.messages)
    victims = [m for m in capture.messages if "victim@victim.example" in m.rcpt_tos] + [
        s for s in fake_ses.sent if "victim@victim.example" in s.destinations
    ]
    bare_in_ses = sum(1 for s in fake_ses.sent if _BARE.search(s.raw))
    history = rows(config.parent / "spool")
    noted = sum(1 for q in accepted if any("normalized" in d for _, d in history[q]["events"]))
    print(
        f"bare CR/LF look-alikes: {len(replies)} transactions, {len(accepted)} got 250; "
        f"SES got {sum(ses_ids.values())} messages ({routes['ses']} routed there), upstream "
        f"{sum(upstream_ids.values())} ({routes['upstream']} routed there); smuggled "
        f"recipient reached: {len(victims)}; SES messages with a bare CR or LF: "
        f"{bare_in_ses}; histories noting the normalization: {noted}"
    )
    assert 2 * len(LOOKALIKES) == len(accepted)
    assert {m: 1 for r, m in accepted.values() if r == "ses"} == dict(ses_ids)
    assert {m: 1 for r, m in accepted.values() if r == "upstream"} == dict(upstream_ids)
    assert (0, 0, len(accepted)) == (len(victims), bare_in_ses, noted)


def test_connections_without_a_request_cannot_keep_a_probe_out(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """Seventy connections to the metrics listener that send one byte and nothing more
    (more than its 64 at a time), renewed as they are dropped: /healthz is answered 200 each
    time, a new connection taking the place of the oldest still sending its request. They
    held all 64 places, and each probe was closed unanswered: an orchestrator acting on
    /healthz would restart relay over and over."""
    metrics_port = free_port()
    relay = relay_process(write_config(metrics=f"127.0.0.1:{metrics_port}")).start()
    assert metrics_port == logged_metrics_port(relay)
    holders: list[socket.socket] = []

    def hold(count: int) -> None:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
            sock.sendall(b"G")
            holders.append(sock)

    try:
        hold(70)
        answers = []
        for _ in range(5):
            answers.append(healthz(metrics_port, timeout=3))
            hold(10)
    finally:
        for sock in holders:
            sock.close()
    print(f"metrics listener held by silent connections: /healthz {answers}")
    assert [200] * 5 == [status for status, _ in answers]
    assert "Traceback" not in relay.log()


def test_the_metrics_listener_bounds_bad_requests(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """A 200 KB request line gets 400; a client sending one header line every 3 s is
    closed once its 5 s are up; /healthz answers meanwhile; no traceback is logged."""
    metrics_port = free_port()
    relay = relay_process(write_config(metrics=f"127.0.0.1:{metrics_port}")).start()
    # The metrics listener starts beside the SMTP one, not before it: wait for its log line.
    assert metrics_port == logged_metrics_port(relay)
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as huge:
        huge.sendall(b"GET /" + b"x" * 200_000 + b" HTTP/1.1\r\n\r\n")
        answer = huge.recv(200).split(b"\r\n")[0].decode()
    slow = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
    started = time.monotonic()
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")
    closed_after = 0.0
    slow.settimeout(3)
    try:
        for n in range(10):
            try:
                if slow.recv(100) == b"":  # waits up to 3 s: the server closed
                    break
            except TimeoutError:
                pass
            slow.sendall(f"X-Slow-{n}: 1\r\n".encode())
            status, _ = healthz(metrics_port, timeout=2)
            assert 200 == status
    except OSError:
        pass
    finally:
        closed_after = time.monotonic() - started
        slow.close()
    print(
        f"metrics listener: 200 KB request line -> {answer!r}; header-every-3s client closed "
        f"after {closed_after:.1f}s; /healthz answered meanwhile"
    )
    assert "HTTP/1.1 400 Bad Request" == answer
    assert 4.5 <= closed_after < 7
    assert "Traceback" not in relay.log()


def reminder(n: int, from_: bytes, rest: bytes = b"") -> bytes:
    """A re-engagement reminder (the shipped rules send it to SES) with this From."""
    return (
        b'To: "Student" <s%d@students.example.org>\r\nFrom: %s\r\nSubject: We miss you\r\n'
        % (n, from_)
        + b"Message-ID: <hostile.%d@moodle.example.org>\r\n" % n
        + f"X-Moodle-Originating-Script: {ORIGIN}\r\n".encode()
        + (rest or b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nDear student,\r\n")
    )


def test_a_mail_the_email_parser_chokes_on_does_not_stall_delivery(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    fake_ses: FakeSes,
    capture: CaptureServer,
) -> None:
    """Two SES-bound reminders that take the email package's parser half a minute each: a
    From of 1.1 MB of folded addresses (its address parser is quadratic), and 150,000 tiny
    MIME parts; then five ordinary ones. All seven reach SES within seconds. The SES route
    read From through the full parse on the delivery loop: the process missed three pings,
    was killed as hung, took the same mail again at each restart (inflight for good), the
    mails behind it waited, and those SES had taken meanwhile were sent again."""
    config = write_config(
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 500, "timeout": 5},
        retry={"schedule": [1], "max_age": 600},
    )
    relay = relay_process(config).start()
    folded = b"\r\n ".join([b"a@b, " * 190] * 1200) + b"\r\n <noreply@moodle.example.org>"
    parts = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 150_000
        + b"--b--\r\n"
    )
    plain = b"<noreply@moodle.example.org>"
    raws = [reminder(0, folded), reminder(1, plain, parts)]
    raws += [reminder(n, plain) for n in range(2, 7)]
    sender = "noreply@moodle.example.org"
    ids = [
        send(relay.port, sender, [f"s{n}@students.example.org"], raw) for n, raw in enumerate(raws)
    ]
    wait_until(lambda: len(fake_ses.sent) >= len(ids), "seven SES sends", timeout=20)
    wait_until(  # the last outcome is committed just after SES took the mail
        lambda: all(rows(config.parent / "spool")[q]["state"] != "inflight" for q in ids),
        "seven outcomes",
        timeout=10,
    )
    spool = rows(config.parent / "spool")
    assert {("sent", "ses")} == {(spool[q]["state"], spool[q]["route"]) for q in ids}
    assert "delivery_process_hung" not in relay.log()
