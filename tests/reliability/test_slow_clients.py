"""Slow and idle clients do not stall the others (DESIGN 3.4: accept fast; 1: cron waits).

While `relay serve` holds a client that sends DATA one byte every 100 ms, a
client that said EHLO and then idles without QUIT, and 200 idle connections,
another client's transactions are still answered within a normal time.

Sessions time out after aiosmtpd's idle timeout, which relay sets to 300 s
(RFC 5321 4.5.3.2.7: at least 5 minutes awaiting a command); the test only
checks that idle sessions cost the others nothing, not the timeout itself.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.mails import MailFactory, Outgoing
from tests.support.processes import RelayProcess
from tests.support.relays import ConfigWriter
from tests.support.smtp import try_send
from tests.support.spools import DONE, wait_rows

# system: a reliability scenario, `relay serve` as a process holding 200 idle clients.
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("aws_env")]

IDLE = 200
NORMAL = 10  # transactions of the normal client while the others hang around
TRANSACTION_LIMIT = 1.0  # seconds per transaction


class Line:
    """A raw SMTP client socket: send bytes, read one (multi-line) reply."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"closed after {lines!r}")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return lines[-1]

    def command(self, text: str) -> str:
        self.sock.sendall(f"{text}\r\n".encode())
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def slow_client(port: int, mail: Outgoing, result: dict[str, str]) -> None:
    """MAIL, RCPT, DATA, then the message one byte every 100 ms; the DATA reply in `result`."""
    client = Line(port)
    try:
        client.reply()
        client.command("EHLO slow.test")
        assert client.command(f"MAIL FROM:<{mail.sender}>").startswith("250")
        assert client.command(f"RCPT TO:<{mail.recipients[0]}>").startswith("250")
        assert client.command("DATA").startswith("354")
        for byte in mail.raw + b".\r\n":
            client.sock.sendall(bytes([byte]))
            time.sleep(0.1)
        result["data"] = client.reply()
        client.command("QUIT")
    except (OSError, AssertionError) as exc:
        result["data"] = f"error: {exc!r}"
    finally:
        client.close()


def test_slow_and_idle_clients_do_not_delay_a_normal_client(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    fake_ses: FakeSes,
) -> None:
    """A byte-per-100-ms DATA sender, an EHLO-then-idle client and 200 idle connections
    are all open while a normal client sends 10 mails: each of its transactions takes
    under 1 s, all 200 idle connections got their 220 greeting, the idle EHLO client
    still answers NOOP, the slow client's mail is accepted, and everything is delivered."""
    config = write_config(
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 500, "timeout": 5},
        retry={"schedule": [1], "max_age": 600},
        # All from 127.0.0.1: room for them under the per-client cap (the caps themselves
        # are tests/reliability/test_hostile.py's).
        limits={"max_sessions_per_ip": 300},
    )
    spool = config.parent / "spool"
    relay = relay_process(config).start()
    factory = MailFactory("slow")
    slow_mail = Outgoing(
        message_id="<slow.0@moodle.example.org>",
        sender="noreply@moodle.example.org",
        recipients=("slow@students.example.org",),
        raw=b"Subject: slow client\r\n\r\nHi.\r\n",  # ~3 s at a byte per 100 ms
        route="upstream",
    )
    slow_result: dict[str, str] = {}
    slow = threading.Thread(target=slow_client, args=(relay.port, slow_mail, slow_result))
    idle: list[Line] = []
    try:
        slow.start()
        quiet = Line(relay.port)
        idle.append(quiet)
        quiet_greeting = quiet.reply()
        assert "250 HELP" == quiet.command("EHLO quiet.test")
        greetings = 0
        for _ in range(IDLE):
            conn = Line(relay.port)
            idle.append(conn)
            greetings += conn.reply().startswith("220 ")
        timings, acked = [], {}
        for _ in range(NORMAL):
            mail = factory()
            started = time.monotonic()
            reply = try_send(relay.port, mail)
            timings.append(time.monotonic() - started)
            acked[reply.queue_id or f"refused: {reply.text}"] = mail.route
        slow_open = slow.is_alive()
        noop = quiet.command("NOOP")
        slow.join(30)
    finally:
        for conn in idle:
            conn.close()
    final = wait_rows(spool, [q for q in acked if not q.startswith("refused")], DONE, timeout=20)
    slow_queue_id = slow_result.get("data", "").rsplit(" ", 1)[-1]
    capture.wait_for(1 + sum(1 for r in acked.values() if r == "upstream"))
    assert 0 == relay.stop()

    print(
        f"slow clients: {IDLE} idle connections greeted {greetings}; normal client "
        f"{NORMAL} transactions, slowest {max(timings):.3f}s, mean "
        f"{sum(timings) / len(timings):.3f}s; slow client still sending during them: "
        f"{slow_open}, its DATA reply {slow_result.get('data')!r}; idle EHLO client "
        f"{quiet_greeting[:3]} then NOOP {noop!r}"
    )
    assert (IDLE, True) == (greetings, slow_open)
    assert [] == [t for t in timings if t >= TRANSACTION_LIMIT]
    assert NORMAL == len(final)
    assert {q: "sent" for q in final} == {q: row["state"] for q, row in final.items()}
    assert "250 2.0.0 Ok: queued as" == slow_result.get("data", "")[:23]
    assert ("220", "250 OK") == (quiet_greeting[:3], noop)
    assert slow_queue_id in {m.queue_id for m in capture.messages}
