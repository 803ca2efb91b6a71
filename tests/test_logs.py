"""Log lines: formats, written at exit and in bursts; a stalled stderr never blocks logging."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys

from tests.support.processes import Process
from tests.support.relays import ConfigWriter

SCRIPT = """
import logging, sys
from relay import logs
logs.setup(sys.argv[1])
log = logging.getLogger("relay.test")
for i in range(int(sys.argv[2])):
    logs.event(log, "accepted", id=f"q{i}", peer="127.0.0.1", sender="a b", pad="x" * 1000)
print("logged", flush=True)
"""


def _run(fmt: str, count: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt, str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _unread(count: int) -> subprocess.Popen[str]:
    """SCRIPT logging `count` lines, its stdout and stderr pipes left to the caller."""
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "text", str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_text_lines_are_all_written_by_exit() -> None:
    done = _run("text", 500)
    lines = done.stderr.splitlines()
    assert len(lines) == 500
    assert ' INFO relay.test event=accepted id=q0 peer=127.0.0.1 sender="a b" pad=' in lines[0]
    assert "id=q499 " in lines[-1]


def test_json_lines_carry_the_fields() -> None:
    done = _run("json", 3)
    first = json.loads(done.stderr.splitlines()[0])
    assert first["event"] == "accepted"
    assert first["id"] == "q0"
    assert first["sender"] == "a b"
    assert first["level"] == "INFO"


def test_a_stalled_stderr_does_not_block_logging() -> None:
    # 2,000 lines of 1 KB are 30 times a pipe's buffer; nobody reads stderr until the
    # script says it has logged them all. A handler writing on the caller's thread
    # would block on the full pipe and never print "logged".
    with _unread(2000) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        if not ready:
            proc.kill()
        assert ready, "logging blocked on the unread stderr"
        assert proc.stdout.readline().strip() == "logged"
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    assert len(err.splitlines()) == 2000


COUNTING = """
import atexit, logging, sys

class Counting:
    def __init__(self, real):
        self.real, self.writes = real, 0
    def write(self, text):
        self.writes += 1
        return self.real.write(text)
    def flush(self):
        self.real.flush()

sys.stderr = counting = Counting(sys.stderr)
atexit.register(lambda: print("writes", counting.writes, flush=True))  # runs after logs' own
"""


def test_a_burst_of_lines_is_written_together() -> None:
    # One wake of the writer thread and one write per burst, not per line: 300 lines
    # logged in a few ms go out in a handful of writes (one per line before).
    done = subprocess.run(
        [sys.executable, "-c", COUNTING + SCRIPT, "text", "300"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    writes = int(done.stdout.split("writes ")[1])
    assert len(done.stderr.splitlines()) == 300
    assert 1 <= writes <= 30, writes


def test_a_stderr_nobody_reads_does_not_hold_the_exit() -> None:
    """2,000 lines to a stderr nobody ever reads (journald stalled): the process still ends
    a few seconds after its last line. The writer was joined without a deadline at exit, and
    relay serve, stopped with SIGTERM, ran until systemd's SIGKILL."""
    with _unread(2000) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "logged"
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        proc.communicate()
    assert 0 == code


def test_lines_past_the_limit_of_a_stream_nobody_reads_are_dropped_and_counted() -> None:
    """30,000 lines of 1 KB to a stderr nobody reads until the script has logged them all
    (journald stalled): every one was kept in memory (1.7 KB a line, without end, a
    flooding client's worth). Now at most MAX_QUEUED wait; the rest are dropped, and once
    the stream drains a line says how many: the lines written and the count add up."""
    from relay.logs import MAX_QUEUED

    with _unread(30_000) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().strip() == "logged"
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    lines = err.splitlines()
    said = [line for line in lines if "event=log_lines_dropped" in line]
    dropped = sum(int(line.split("count=")[1].split()[0]) for line in said)
    written = sum("event=accepted" in line for line in lines)
    print(f"written {written}, dropped {dropped} in {len(said)} line(s)")
    assert (30_000, True) == (written + dropped, dropped > 0)
    assert written <= 2 * MAX_QUEUED + 1000  # the queue, and the burst the writer holds


def test_a_value_that_could_end_a_line_is_escaped() -> None:
    """A client's AUTH name with U+2028 or NEL (U+0085) went into the line as it was,
    where str.splitlines() and some log viewers end a line: the rest read as a line of
    its own ("... event=delivered id=FORGED"). Such a value is quoted with every
    non-ASCII character escaped, and DEL too."""
    from relay.logs import _quote

    forged = "a\u2028X 2026-01-01T00:00:00.000Z INFO relay.deliver event=delivered"
    quoted = [_quote(v) for v in (forged, "b\x85Y", "c\x7fZ", "Grüße", "Grüße\n")]
    assert [1, 1, 1, 1, 1] == [len(q.splitlines()) for q in quoted]
    assert [
        '"a\\u2028X 2026-01-01T00:00:00.000Z INFO relay.deliver event=delivered"',
        '"b\\u0085Y"',
        '"c\\u007fZ"',
        "Grüße",
        '"Gr\\u00fc\\u00dfe\\n"',
    ] == quoted


def test_a_command_aiosmtpd_does_not_know_cannot_forge_a_line(
    write_config: ConfigWriter, relay_process: Process
) -> None:
    """aiosmtpd warns of a command it does not know with the client's words in the line
    ("%r unrecognised: %s"): a CR, a NUL or an ESC in them went to the log as they were, so
    a terminal printed a forged line over the real one and journald split a record of the
    client's choosing off at the NUL. Escaped now, as relay's own fields are."""
    relay = relay_process(write_config()).start()
    forged = b"X\x00\r2026-12-07T14:00:00.000Z\tINFO\trelay.deliver\tevent=sent\x1b[2K\r\n"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as client:
        client.recv(512)
        client.sendall(forged)
        assert client.recv(512).startswith(b"500 ")
        client.sendall(b"QUIT\r\n")
        client.recv(512)
    assert 0 == relay.stop()
    raw = relay.log_path.read_bytes()
    line = next(line for line in raw.split(b"\n") if b"unrecognised" in line)
    assert not any(c in line for c in b"\x00\r\x1b"), line
    assert b"X\\u0000\\r2026-12-07T14:00:00.000Z" in line, line
