"""`relay serve` as a real process: Moodle's own client, SIGKILL durability, safe start, stop."""

# STYLE.md asserts read `expected == actual`; ruff's SIM300 calls that Yoda.

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import signal
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from relay import service
from relay import settings as settings_mod
from relay.receive.passwords import hash_password
from relay.runtime import YOUNG_COLLECT
from relay.settings import HostPort
from relay.spool import DB_NAME
from tests.support.phpmailer import CLIENT, phpmailer_wire
from tests.support.processes import Process, relay_cli
from tests.support.relays import ConfigWriter
from tests.support.tls import TlsFiles


def spooled(spool: Path) -> dict[str, tuple[str, bytes | None, int, str]]:
    """{id: (state, body, size, message_id)} read as another process would."""
    conn = sqlite3.connect(spool / DB_NAME)
    try:
        sql = "SELECT id, state, body, size, message_id FROM messages LEFT JOIN bodies USING (id)"
        return {r[0]: (r[1], r[2] and bytes(r[2]), r[3], r[4]) for r in conn.execute(sql)}
    finally:
        conn.close()


def moodle_mails(count: int) -> list[dict[str, object]]:
    """Re-engagement-like mails: student copies (text or multipart HTML) and CC copies."""
    origin = "https://moodle.test => moodle.test:mod/reengagement/lib.php:546"
    mails: list[dict[str, object]] = []
    for n in range(count):
        cc = n % 3 == 2
        to = f"manager{n}@example.org" if cc else f"student{n}@example.org"
        mails.append(
            {
                "from": "noreply@moodle.test",
                "from_name": "Moodle Support (via Moodle Test)",
                "to": to,
                "to_name": to if cc else f"Stüdent Nümber {n}",
                "subject": f"Course réminder {n} &amp; more",
                "body": f"Dear student {n},\n.a line starting with a dot\nÄÖÜ ß – €\n\n{'x' * n}\n",
                "html": None
                if cc or n % 2
                else f'<div class="text_to_html">Hi {n} <b>ÄÖÜ</b></div>',
                "message_id": f"<{n:013x}.{n:08d}@moodle.test>",
                "headers": [["X-Moodle-Originating-Script", origin]],
            }
        )
    return mails


@pytest.mark.system
@pytest.mark.parametrize("keepalive", [False, True], ids=["connection-per-mail", "smtpmaxbulk"])
def test_phpmailer_200_mails_are_spooled_byte_identical(
    write_config: ConfigWriter, relay_process: Process, tmp_path: Path, keepalive: bool
) -> None:
    """Moodle's client (PHPMailer, AUTH LOGIN) sends 200 mails: 200 queued, every body as sent."""
    users = tmp_path / "users"
    users.write_text(f"moodle:{hash_password('moodle-pw')}\n")
    config = write_config(auth={"users_file": str(users)})
    relay = relay_process(config).start()
    job = {
        "host": "127.0.0.1",
        "port": relay.port,
        "user": "moodle",
        "pass": "moodle-pw",
        "keepalive": keepalive,
        "mails": moodle_mails(200),
    }
    run = subprocess.run(
        ["php", str(CLIENT)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == run.returncode, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(True, None)] * 200 == [(r["ok"], r["error"]) for r in results]

    # The original host (port 9) is down, so nothing leaves: all 200 are held in the spool,
    # queued or already deferred by a first delivery attempt.
    stats = relay_cli("queue", "--config", str(config), "stats", "--json")
    counts = json.loads(stats.stdout)["counts"]
    assert (200, 0) == (
        counts["queued"] + counts["deferred"] + counts["inflight"],
        counts["sent"] + counts["failed"],
    ), stats.stderr
    rows = spooled(config.parent / "spool")
    expected = {r["queue_id"]: phpmailer_wire(base64.b64decode(r["mime"])) for r in results}
    assert expected == {qid: body for qid, (_, body, _, _) in rows.items()}
    assert [m["message_id"] for m in job["mails"]] == [  # type: ignore[index]
        rows[r["queue_id"]][3] for r in results
    ]
    # A regression guard, not the benchmark: delayed ACKs would cost ~40 ms per mail.
    median = statistics.median(r["seconds"] for r in results)
    print(f"PHPMailer keepalive={keepalive}: median {median * 1000:.1f} ms per mail")
    assert median < 0.025
    assert 0 == relay.stop()


class Sender(threading.Thread):
    """Sends distinct mails one per connection until stopped; remembers what got a 250."""

    def __init__(self, port: int, number: int) -> None:
        super().__init__(daemon=True)
        self.port, self.number = port, number
        self.attempted: dict[str, bytes] = {}  # Message-ID -> body
        self.acked: dict[str, bytes] = {}  # queue id -> body
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            message_id = f"<{self.number}.{n}@moodle.test>"
            filler = b"line of body text to make DATA take a few packets\r\n" * (n % 7 * 300)
            body = (
                f"Message-ID: {message_id}\r\nSubject: {n}\r\n\r\n".encode() + filler + b"end\r\n"
            )
            self.attempted[message_id] = body
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as client:
                    client.ehlo("moodle.test")
                    client.mail("noreply@moodle.test")
                    client.rcpt(f"s{self.number}@example.org")
                    code, reply = client.data(body)
            except (OSError, smtplib.SMTPException):
                return  # the server is gone
            if code == 250:
                self.acked[reply.decode().rsplit(" ", 1)[-1]] = body


@pytest.mark.system
def test_sigkill_while_clients_send_loses_nothing_acked(
    write_config: ConfigWriter, relay_process: Process
) -> None:
    """SIGKILL under load, restart: every 250'd mail is there; no row is partial or foreign."""
    config = write_config()
    relay = relay_process(config).start()
    senders = [Sender(relay.port, number) for number in range(6)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 20
    while sum(len(s.acked) for s in senders) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert -signal.SIGKILL == relay.stop(signal.SIGKILL)
    for sender in senders:
        sender.halt.set()
        sender.join(10)

    restarted = relay_process(config).start()  # reopens the spool after the crash
    rows = spooled(config.parent / "spool")
    acked = {qid: body for s in senders for qid, body in s.acked.items()}
    attempted = {mid: body for s in senders for mid, body in s.attempted.items()}
    assert len(acked) >= 60
    assert acked == {qid: rows[qid][1] for qid in acked if qid in rows}, "a 250'd mail was lost"
    assert [] == [
        qid
        for qid, (_, body, size, mid) in rows.items()
        if body is None or len(body) != size or attempted.get(mid) != body
    ]
    assert 0 == restarted.stop()


@pytest.mark.parametrize(
    ("auth", "tls"),
    [(False, False), (True, False), (False, True)],
    ids=["neither", "auth-only", "tls-only"],
)
def test_non_loopback_listen_without_auth_and_tls_refuses_to_start(
    write_config: ConfigWriter, tmp_path: Path, tls_files: TlsFiles, auth: bool, tls: bool
) -> None:
    """0.0.0.0 without both auth and TLS: `relay serve` exits 1 saying why; nothing listens."""
    users = tmp_path / "users"
    users.write_text(f"moodle:{hash_password('pw', n=1024)}\n")
    overrides: dict[str, object] = {"listen": "0.0.0.0:0"}
    if auth:
        overrides["auth"] = {"users_file": str(users)}
    if tls:
        overrides["tls"] = {"cert": str(tls_files.cert), "key": str(tls_files.key)}
    config = write_config(**overrides)
    result = relay_cli(
        "serve",
        "--config",
        str(config),
        env={**os.environ, "RELAY_PORT_FILE": str(tmp_path / "port")},
    )
    assert (1, False) == (result.returncode, (tmp_path / "port").exists())
    assert "not a loopback address" in result.stderr and "open relay" in result.stderr


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("plain-text", "has no user:$scrypt$... line (relay hash-password makes one"),
        ("password-without-user", "upstream.password_env: needs upstream.username"),
        ("password-env-unset", "upstream.password_env: RELAY_TEST_UNSET is not set"),
    ],
)
def test_credentials_relay_could_never_use_stop_it_at_start(
    write_config: ConfigWriter, tmp_path: Path, case: str, expected: str
) -> None:
    """A users file with only a plain-text password; a password without a username; a
    password env var that is not set. Each passed every check, and
    then every mail failed (535 or 530 to Moodle, which does not retry) or waited for days.
    `relay serve` now exits 1 saying which key; `check-config` too, but for the env var
    (an admin's shell may lack the unit's environment)."""
    users = tmp_path / "users"
    users.write_text("moodle:s3cret\n" if case == "plain-text" else "moodle:$scrypt$x\n")
    overrides: dict[str, object] = {"auth": {"users_file": str(users)}}
    if case == "password-without-user":
        overrides["upstream"] = {"host": "127.0.0.1", "password_env": "RELAY_TEST_UNSET"}
    if case == "password-env-unset":
        overrides["upstream"] = {
            "host": "127.0.0.1",
            "username": "moodle",
            "password_env": "RELAY_TEST_UNSET",
        }
    config = write_config(**overrides)
    env = {k: v for k, v in os.environ.items() if k != "RELAY_TEST_UNSET"}
    served = relay_cli(
        "serve", "--config", str(config), env={**env, "RELAY_PORT_FILE": str(tmp_path / "p")}
    )
    checked = relay_cli("check-config", "--config", str(config), env=env)
    assert (1, False) == (served.returncode, (tmp_path / "p").exists()), served.stderr
    assert expected in served.stderr
    assert (case != "password-env-unset") == (expected in checked.stderr), checked.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=["world-readable", "group-only"])
def test_a_users_file_every_user_can_read_is_warned_of(
    write_config: ConfigWriter, relay_process: Process, tmp_path: Path, mode: int
) -> None:
    """A users file of mode 0644 (what `>` under umask 022 makes): every local user could
    take the scrypt hashes and guess at them offline, and nothing said so. `check-config`
    and `relay serve` warn, naming the file and its mode; relay runs on (Postfix's
    `postfix check` warns too). 0640 (root:relay, the README's) is not warned of."""
    users = tmp_path / "users"
    users.write_text(f"moodle:{hash_password('pw', n=1024)}\n")
    users.chmod(mode)
    config = write_config(auth={"users_file": str(users)})
    checked = relay_cli("check-config", "--config", str(config))
    relay = relay_process(config).start()
    assert 0 == relay.stop()
    warned = f"auth.users_file: {users} can be read by every user on this machine (mode 0644)"
    assert (0, mode == 0o644) == (checked.returncode, warned in checked.stderr), checked.stderr
    assert (mode == 0o644) == ("event=secret_file_exposed" in relay.log()), relay.log()


def test_service_refuses_open_relay_even_if_settings_let_it_through(
    write_config: ConfigWriter,
) -> None:
    """Defence in depth: serve() itself refuses a non-loopback listen without auth and tls."""
    loaded = settings_mod.load(write_config())
    unsafe = dataclasses.replace(loaded, listen=HostPort(host="0.0.0.0", port=0))
    with pytest.raises(service.StartError, match="open relay"):
        service.check_safe(unsafe)


def test_sigterm_closes_idle_sessions_and_exits_0(
    write_config: ConfigWriter, relay_process: Process
) -> None:
    """SIGTERM: an idle session gets 421, new connections are refused, exit code 0."""
    relay = relay_process(write_config()).start()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as idle:
        reader = idle.makefile("rb")
        reader.readline()
        idle.sendall(b"EHLO moodle.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        relay.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert b"421 4.3.2" == reader.readline()[:9]
    assert 0 == relay.stop(timeout=15)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
    assert "event=stopping" in relay.log()


def test_json_log_has_one_line_per_accepted_message(
    write_config: ConfigWriter, relay_process: Process
) -> None:
    """--log-format json: the accepted line has id, peer, sender, recipients, size, Message-ID."""
    relay = relay_process(write_config())
    relay.args = ["--log-format", "json"]
    relay.start()
    body = b"Message-ID: <j.1@moodle.test>\r\nSubject: j\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("noreply@moodle.test", ["a@example.org", "b@example.org"], body)
    assert 0 == relay.stop()
    lines = [json.loads(line) for line in relay.log().splitlines()]
    [accepted] = [line for line in lines if line.get("event") == "accepted"]
    assert {
        "peer": "127.0.0.1",
        "sender": "noreply@moodle.test",
        "size": len(body),
        "recipients": "a@example.org,b@example.org",
        "message_id": "<j.1@moodle.test>",
        "level": "INFO",
        "logger": "relay.receive",
    } == {k: v for k, v in accepted.items() if k not in ("ts", "event", "id")}


def test_both_processes_hide_what_they_built_at_start_from_the_collector(
    write_config: ConfigWriter, relay_process: Process
) -> None:
    """Once started, relay serve and its delivery process each freeze (gc.freeze) the
    objects of their start, so that a full collection does not walk them with the event
    loop stopped: one `settled` line each, naming the tens of thousands of objects frozen.
    relay serve collects its young objects every YOUNG_COLLECT allocations, not Python's
    700; the delivery process keeps 700."""
    relay = relay_process(write_config()).start()
    deadline = time.monotonic() + 15
    while relay.log().count("event=settled") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0 == relay.stop()
    frozen = [int(n) for n in re.findall(r"event=settled frozen_objects=(\d+)", relay.log())]
    assert 2 == len(frozen), relay.log()
    assert all(n > 10_000 for n in frozen), frozen
    young = re.findall(r"event=settled .*young_collect=(\d+)", relay.log())
    assert sorted([str(YOUNG_COLLECT), "700"]) == sorted(young), relay.log()
