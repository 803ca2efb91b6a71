"""Load generators: smtp-source, a sequential timing client, PHPMailer under php-cli.

Each returns plain numbers (dicts of floats) for the report; none of them
knows whether it talks to relay, Postfix or smtp-sink.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import time
from pathlib import Path

from bench import tools

FROM = "from@example.org"
TO = "to@example.org"
PHP_SCRIPT = Path(__file__).with_name("phpmailer_latency.php")


def summary(ms: list[float]) -> dict[str, float]:
    """median / p99 / mean / max of a list of milliseconds."""
    if not ms:
        return {}
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "median_ms": statistics.median(ordered),
        "p99_ms": p99,
        "mean_ms": statistics.fmean(ordered),
        "max_ms": ordered[-1],
    }


def smtp_source_argv(port: int, *, messages: int, sessions: int, size: int) -> list[str]:
    """smtp-source: one connection per message (no -d), `sessions` in parallel."""
    return [
        tools.tool("smtp-source"),
        "-l",
        str(size),
        "-m",
        str(messages),
        "-s",
        str(sessions),
        "-f",
        FROM,
        "-t",
        TO,
        "-M",
        "bench.invalid",
        f"{tools.HOST}:{port}",
    ]


def smtp_source(
    port: int, *, messages: int, sessions: int, size: int, timeout: float
) -> dict[str, float]:
    """Run smtp-source to completion; accepted mails per second (wall clock)."""
    argv = smtp_source_argv(port, messages=messages, sessions=sessions, size=size)
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return {"messages": messages, "seconds": seconds, "per_second": messages / seconds}


class _Client:
    """A minimal blocking SMTP client with TCP_NODELAY: the server's time, not Nagle's."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((tools.HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self, expect: bytes) -> None:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            if line[3:4] != b"-":
                if not line.startswith(expect):
                    raise RuntimeError(f"expected {expect.decode()}, got {line!r}")
                return

    def command(self, line: bytes, expect: bytes) -> None:
        self.sock.sendall(line + b"\r\n")
        self.reply(expect)

    def close(self) -> None:
        self.sock.close()


def _message(size: int) -> bytes:
    header = (
        f"From: {FROM}\r\nTo: {TO}\r\nSubject: bench\r\nMessage-ID: <bench@bench.invalid>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return header + line * max(1, size // len(line))


def sequential(port: int, *, count: int, size: int, timeout: float = 30) -> list[float]:
    """Milliseconds per transaction: connect, EHLO, MAIL, RCPT, DATA, QUIT, one at a time."""
    body = _message(size) + b".\r\n"
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client = _Client(port, timeout)
        try:
            client.reply(b"220")
            client.command(b"EHLO bench.invalid", b"250")
            client.command(f"MAIL FROM:<{FROM}>".encode(), b"250")
            client.command(f"RCPT TO:<{TO}>".encode(), b"250")
            client.command(b"DATA", b"354")
            client.sock.sendall(body)
            client.reply(b"250")
            client.command(b"QUIT", b"221")
        finally:
            client.close()
        times.append((time.perf_counter() - start) * 1000)
    return times


def phpmailer(port: int, *, count: int, timeout: float) -> dict[str, object]:
    """Moodle's path: PHPMailer, one connection per mail; the PHP side does the timing."""
    # Debian's php-cli has /usr/share/php (libphp-phpmailer) on its default include_path.
    argv = [tools.tool("php"), str(PHP_SCRIPT), tools.HOST, str(port), str(count)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"php exited {done.returncode}: {(done.stderr or done.stdout)[-500:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if result.get("ok") == 0:
        raise RuntimeError(f"PHPMailer sent nothing: {result.get('errors')}")
    return result
