"""`relay queue list/show/retry/delete/stats` on a spool with a message in every state."""

# STYLE.md asserts read `expected == actual`; ruff's SIM300 calls that Yoda.

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from relay.ops import requeue
from relay.spool import DB_NAME, Spool, lock
from relay.spool.schema import SCHEMA_VERSION
from tests.support.processes import RELAY, RelayProcess, relay_cli
from tests.support.relays import ConfigWriter
from tests.support.spools import make_spool
from tests.support.waits import wait_until

TRACE = b"Received: from moodle.test (127.0.0.1)\r\n\tby relay.test (relay) with ESMTP id X;\r\n"


def body(n: int) -> bytes:
    return f"Message-ID: <{n}@moodle.test>\r\nSubject: mail {n}\r\n\r\nbody {n}\r\n".encode()


async def add(spool: Spool, n: int) -> str:
    """Mail number `n` from Moodle, spooled; its queue id."""
    return await spool.add(
        sender="noreply@moodle.test",
        recipients=[f"u{n}@example.org"],
        raw=body(n),
        peer="127.0.0.1",
        trace=TRACE,
        message_id=f"<{n}@moodle.test>",
    )


@pytest.fixture
async def spooled(write_config: ConfigWriter) -> tuple[Path, dict[str, str]]:
    """A config and its spool holding one message per state; returns (config, {state: id})."""
    config = write_config()
    spool = await Spool.open(config.parent / "spool")
    ids = [await add(spool, n) for n in (5, 0, 1, 2, 3, 4)]
    bounced, sent, deferred, failed, inflight, queued = ids
    await spool.claim(5)
    await spool.sent(
        sent, rule="reengagement-cc", route="ses", reply="SES accepted", ses_message_id="0100-ses"
    )
    await spool.sent(bounced, rule=None, route="ses", reply="SES accepted", ses_message_id="0100-b")
    await spool.feedback(
        key="Bounce/0100-b/1",
        ses_message_id="0100-b",
        event="ses_bounce",
        detail="bounce=Permanent/General U5@Example.org (5.1.1)",
        kind="bounce",
        failed=["U5@Example.org"],  # as the receiving host spelled it
    )
    await spool.defer(
        deferred, due_at=time.time() + 600, rule=None, route="upstream", reply="451 4.3.0 try later"
    )
    await spool.fail(failed, rule=None, route="upstream", reply="550 5.1.1 no such user")
    await spool.close()
    states = {
        "sent": sent,
        "bounced": bounced,
        "deferred": deferred,
        "failed": failed,
        "inflight": inflight,
        "queued": queued,
    }
    return config, states


def queue(config: Path, *args: str) -> Result:
    """`relay queue --config CONFIG ARGS...` through click, in-process."""
    return CliRunner().invoke(main, ["queue", "--config", str(config), *args])


def delivering(config: Path, *args: str) -> Result:
    """`queue(config, *args)` while a delivery process holds the spool (its lock)."""
    with open(config.parent / "spool" / lock.DELIVERY_LOCK, "a+b") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # as relay.deliver.process holds it
        return queue(config, *args)


def test_list_json_shows_every_message_but_finished(
    spooled: tuple[Path, dict[str, str]],
) -> None:
    """list --json: one object per line, oldest first, finished rows (sent, bounced) left out."""
    config, ids = spooled
    result = queue(config, "list", "--json")
    assert 0 == result.exit_code, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = [(ids[s], s) for s in ("deferred", "failed", "inflight", "queued")]
    assert expected == [(r["id"], r["state"]) for r in records]
    assert ["u1@example.org"] == records[0]["recipients"]
    assert "451 4.3.0 try later" == records[0]["reply"]


@pytest.mark.parametrize("state", ["sent", "bounced", "failed", "queued"])
def test_list_state_filter(spooled: tuple[Path, dict[str, str]], state: str) -> None:
    """list --state S lists exactly the messages in state S (sent included on request)."""
    config, ids = spooled
    result = queue(config, "list", "--state", state, "--json")
    assert [ids[state]] == [json.loads(line)["id"] for line in result.stdout.splitlines()]


def test_list_human_table(spooled: tuple[Path, dict[str, str]]) -> None:
    """Default output: a mailq-like table with a header, one row each, the reply of
    deferred/failed messages, and a count."""
    config, ids = spooled
    lines = queue(config, "list").stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATE",
        "SIZE",
        "ARRIVED",
        "TRIES",
        "SENDER",
        "->",
        "RECIPIENTS",
    ]
    assert "-- 4 messages" == lines[-1]
    row = next(line for line in lines if line.startswith(ids["failed"]))
    assert "noreply@moodle.test -> u2@example.org" in row
    assert "(550 5.1.1 no such user)" in lines[lines.index(row) + 1]


def test_list_and_show_a_row_edited_by_hand(spooled: tuple[Path, dict[str, str]]) -> None:
    """Recipients edited by hand without their JSON brackets, and text that is no UTF-8:
    list and show print the column as it is stored. They stopped with a traceback, or
    with SQLite's decoding error for every row, so the admin could not find the row."""
    config, ids = spooled
    with closing(sqlite3.connect(config.parent / "spool" / DB_NAME)) as conn, conn:
        conn.execute(
            "UPDATE messages SET recipients = 'ada@example.net' WHERE id = ?", (ids["queued"],)
        )
        conn.execute(  # and a peer that is no UTF-8: shown with U+FFFD
            "UPDATE messages SET peer = CAST(X'FF' AS TEXT) WHERE id = ?", (ids["failed"],)
        )
    listed = queue(config, "list")
    shown = queue(config, "show", ids["queued"])
    assert (0, 0) == (listed.exit_code, shown.exit_code), listed.output + shown.output
    row = next(line for line in listed.stdout.splitlines() if line.startswith(ids["queued"]))
    assert "noreply@moodle.test -> ada@example.net" in row
    assert "ada@example.net" in shown.stdout


def test_list_unknown_state_is_a_usage_error(spooled: tuple[Path, dict[str, str]]) -> None:
    """--state with a name that is not a state: exit 2 and the valid names."""
    config, _ = spooled
    result = queue(config, "list", "--state", "delivered")
    assert 2 == result.exit_code
    assert "queued, inflight, deferred, sent, bounced, failed" in result.stderr


def test_show_json_has_fields_headers_and_history(spooled: tuple[Path, dict[str, str]]) -> None:
    """show --json: stored fields, the trace, the headers and every event in order."""
    config, ids = spooled
    record = json.loads(queue(config, "show", ids["failed"], "--json").stdout)
    assert ("failed", "upstream", "550 5.1.1 no such user", 1) == (
        record["state"],
        record["route"],
        record["reply"],
        record["attempts"],
    )
    assert "Message-ID: <2@moodle.test>\r\nSubject: mail 2\r\n" == record["headers"]
    assert TRACE.decode() == record["trace"]
    assert ["received", "failed"] == [e["event"] for e in record["events"]]


def test_show_sent_message_keeps_metadata_not_body(spooled: tuple[Path, dict[str, str]]) -> None:
    """A delivered message still answers "where did it go?": route, rule, SES id; no body."""
    config, ids = spooled
    record = json.loads(queue(config, "show", ids["sent"], "--json").stdout)
    assert ("sent", "ses", "reengagement-cc", "0100-ses", None) == (
        record["state"],
        record["route"],
        record["rule"],
        record["ses_message_id"],
        record["headers"],
    )
    text = queue(config, "show", ids["sent"]).stdout
    assert "history:" in text and "ses_message_id=0100-ses" in text


def test_show_bounced(spooled: tuple[Path, dict[str, str]]) -> None:
    """A mail SES bounced for every recipient is `bounced`; its history says so after the
    bounce event (the receiving host's spelling of the address matched without case)."""
    config, ids = spooled
    record = json.loads(queue(config, "show", ids["bounced"], "--json").stdout)
    history = [(e["event"], e["detail"]) for e in record["events"]]
    assert ("bounced", "0100-b") == (record["state"], record["ses_message_id"])
    assert ["received", "sent", "ses_bounce", "bounced"] == [e for e, _ in history]
    assert ("bounced", "every recipient: u5@example.org") == history[-1]


def test_show_unknown_id(spooled: tuple[Path, dict[str, str]]) -> None:
    """show of an id not in the spool: exit 1 and a message saying so."""
    config, _ = spooled
    result = queue(config, "show", "0000000000ZZ")
    assert (1, "relay queue show: no message 0000000000ZZ\n") == (result.exit_code, result.stderr)


@pytest.mark.parametrize(
    ("state", "exit_code", "after"),
    [
        ("failed", 0, "queued"),
        ("deferred", 0, "queued"),
        ("sent", 1, "sent"),
        ("bounced", 1, "bounced"),
        ("inflight", 1, "inflight"),
    ],
    ids=["failed", "deferred", "sent-refused", "bounced-refused", "inflight-refused"],
)
def test_retry(
    spooled: tuple[Path, dict[str, str]], state: str, exit_code: int, after: str
) -> None:
    """retry: failed/deferred -> queued (due now, event recorded); others left alone, exit 1
    (inflight: while a delivery process has it)."""
    config, ids = spooled
    result = delivering(config, "retry", ids[state])
    assert exit_code == result.exit_code, result.output
    record = json.loads(queue(config, "show", ids[state], "--json").stdout)
    assert after == record["state"]
    if exit_code == 0:
        assert "retry" == record["events"][-1]["event"]
        assert record["due_at"] <= time.time()


def test_retry_all_failed(spooled: tuple[Path, dict[str, str]]) -> None:
    """--all-failed queues every dead letter again."""
    config, ids = spooled
    assert 0 == queue(config, "retry", "--all-failed").exit_code
    assert "" == queue(config, "list", "--state", "failed", "--json").stdout
    record = json.loads(queue(config, "show", ids["failed"], "--json").stdout)
    assert ("queued", "retry") == (record["state"], record["events"][-1]["event"])


def test_delete(spooled: tuple[Path, dict[str, str]]) -> None:
    """delete removes the message, its body and its history; an inflight one is refused while
    a delivery process has it."""
    config, ids = spooled
    result = delivering(config, "delete", ids["queued"], ids["inflight"])
    assert 1 == result.exit_code
    assert f"{ids['queued']}: deleted\n" == result.stdout
    assert 1 == queue(config, "show", ids["queued"]).exit_code
    assert 0 == queue(config, "show", ids["inflight"]).exit_code
    stats = json.loads(queue(config, "stats", "--json").stdout)
    assert sum(len(body(n)) for n in (1, 2, 3)) == stats["bytes"]


def test_stats_json(spooled: tuple[Path, dict[str, str]]) -> None:
    """stats --json: counts by state, bytes of bodies held, oldest waiting age."""
    config, _ = spooled
    stats = json.loads(queue(config, "stats", "--json").stdout)
    counts = {"queued": 1, "inflight": 1, "deferred": 1, "sent": 1, "bounced": 1, "failed": 1}
    assert counts == stats["counts"]
    assert (6, sum(len(body(n)) for n in (1, 2, 3, 4))) == (stats["total"], stats["bytes"])
    assert 0 <= stats["oldest_queued_age"] < 60


def test_queue_works_after_a_bad_edit_elsewhere_in_relay_yaml(
    spooled: tuple[Path, dict[str, str]],
) -> None:
    """A typo elsewhere in relay.yaml (which a reload refuses: relay serve runs on) left the
    admin without `relay queue`, when it is needed most: `spool:` is read alone, with a
    warning that names the problem. A relay.yaml that cannot be read at all still stops it."""
    config, _ = spooled
    config.write_text(config.read_text() + "retires: 3\n")
    result = CliRunner().invoke(main, ["queue", "--config", str(config), "stats", "--json"])
    assert 0 == result.exit_code, result.output
    assert 6 == json.loads(result.stdout)["total"]
    assert f"warning: {config} has problems; its spool, read alone: " in result.stderr
    assert "retires: unknown key" in result.stderr
    # No YAML any more (a key indented by one space: the commonest bad edit): line by line.
    config.write_text(config.read_text().replace("retires: 3", " retires: 3"))
    indented = CliRunner().invoke(main, ["queue", "--config", str(config), "stats", "--json"])
    assert (0, 6) == (indented.exit_code, json.loads(indented.stdout)["total"]), indented.output
    assert "YAML syntax error" in indented.stderr
    config.write_text("spool: a\nspool: b\n  x: [\n")  # which one? none is guessed
    broken = queue(config, "stats")
    assert 1 == broken.exit_code
    assert f"{config} cannot be used:\n{config}:" in broken.output


AS_ANOTHER_USER = """
import os, sys
from relay.cli import main
from relay.ops import queueadmin, requeue  # as root: nobody may not read the installation
if os.getuid() == 0:  # root reads anything: be nobody, after relay is imported
    os.setgid(65534)
    os.setuid(65534)
sys.argv = ["relay", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("private", ["directory", "file"])
@pytest.mark.parametrize("command", ["stats", "list", "retry", "delete"])
def test_a_spool_another_user_owns_is_said_so_without_a_traceback(
    spooled: tuple[Path, dict[str, str]], command: str, private: str
) -> None:
    """The unit's StateDirectoryMode=0700: an admin who is neither the service's user nor
    root ran `relay queue ...` and got a PermissionError traceback. Now one line that says
    whose spool it is, exit 1."""
    config, states = spooled
    # As nobody, from a directory anyone can read (pytest's are the user's alone).
    open_to_all = Path(tempfile.mkdtemp())
    shutil.copytree(config.parent, open_to_all, dirs_exist_ok=True)
    open_to_all.chmod(0o755)
    config, directory = open_to_all / config.name, open_to_all / "spool"
    directory.chmod(0o755)  # copied with pytest's 0700
    mine = directory if private == "directory" else directory / DB_NAME
    mine.chmod(0o700 if os.getuid() == 0 else 0o000)
    try:
        args = [command, states["failed"]] if command in ("retry", "delete") else [command]
        ran = subprocess.run(
            [sys.executable, "-c", AS_ANOTHER_USER, "queue", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        directory.chmod(0o755)
        shutil.rmtree(open_to_all)
    assert 1 == ran.returncode, ran.stderr
    assert "Traceback" not in ran.stderr
    assert f"cannot read {directory / DB_NAME}: Permission denied: run this as the user" in (
        ran.stderr
    )


@pytest.mark.parametrize(
    ("version", "why"),
    [
        (
            1,
            f"schema version 1, older than this relay's {SCHEMA_VERSION}: start the service"
            " (relay serve) once to upgrade it",
        ),
        (
            SCHEMA_VERSION + 1,
            f"schema version {SCHEMA_VERSION + 1}; this relay knows versions"
            f" up to {SCHEMA_VERSION}: run the newer relay that wrote it",
        ),
    ],
    ids=["older-left-to-the-service", "newer-refused"],
)
def test_spool_of_another_schema_version(
    write_config: ConfigWriter, version: int, why: str
) -> None:
    """`relay queue` only works on a spool of its own schema: an older one is upgraded by
    the service (an old one may still be running on it), a newer one is refused."""
    config = write_config()
    make_spool(config.parent / "spool", version, {"0000000000Q1": ("queued", body(1))})
    result = queue(config, "stats")
    assert (1, f"relay queue: spool {config.parent / 'spool' / DB_NAME} has {why}\n") == (
        result.exit_code,
        result.stderr,
    )


def test_no_spool_yet(write_config: ConfigWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the service ever ran: exit 1 with a message naming the missing file, and,
    in a shell without systemd's $STATE_DIRECTORY, where relay serve spools without a
    `spool:` key."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    result = queue(write_config(), "stats")
    assert 1 == result.exit_code
    assert "no spool at" in result.stderr
    assert "spools in $STATE_DIRECTORY (/var/lib/relay): set `spool:`" in result.stderr


def test_ids_as_an_operator_pastes_them(spooled: tuple[Path, dict[str, str]]) -> None:
    """An id in lower case or with a space around it is the message's; an id given twice
    to delete is deleted once (it said "deleted", then "no such message" and exit 1)."""
    config, ids = spooled
    shown = queue(config, "show", f" {ids['queued'].lower()} ", "--json")
    assert (0, ids["queued"]) == (shown.exit_code, json.loads(shown.stdout)["id"])
    deleted = queue(config, "delete", ids["queued"].lower(), ids["queued"])
    assert (0, f"{ids['queued']}: deleted\n") == (deleted.exit_code, deleted.stdout)


def test_queue_commands_work_while_the_service_runs(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """A separate `relay queue` process reads and changes the spool of a running service."""
    config = write_config()
    relay = relay_process(config).start()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("noreply@moodle.test", ["a@example.org"], body(1))
    listed = relay_cli("queue", "--config", str(config), "list", "--json")
    [record] = [json.loads(line) for line in listed.stdout.splitlines()]
    deleted = relay_cli("queue", "--config", str(config), "delete", record["id"])
    stats = relay_cli("queue", "--config", str(config), "stats", "--json")
    assert (0, 0) == (deleted.returncode, json.loads(stats.stdout)["total"])
    assert 0 == relay.stop()


def test_each_id_reports_on_its_own_stream(spooled: tuple[Path, dict[str, str]]) -> None:
    """A refused id goes to stderr; a later id that was acted on still goes to stdout."""
    config, ids = spooled
    result = queue(config, "delete", "NOSUCHID0000", ids["queued"])
    assert (1, f"{ids['queued']}: deleted\n") == (result.exit_code, result.stdout)
    assert "NOSUCHID0000: no such message\n" == result.stderr


def test_retry_takes_the_spools_write_turn(
    spooled: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """retry and delete write under the write turn relay serve and the delivery process take
    (relay.spool.lock), so a big retry cannot starve relay serve's adds. Held elsewhere for
    too long: exit 1, the spool named, the ids not done listed, nothing changed."""
    config, ids = spooled
    monkeypatch.setattr(lock, "TURN_TIMEOUT", 0.3)
    spool_dir = config.parent / "spool"
    with open(spool_dir / lock.WRITE_LOCK, "a+b") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = queue(config, "retry", ids["failed"], ids["deferred"])
    assert 1 == result.exit_code
    assert f"spool {spool_dir / DB_NAME}" in result.stderr
    assert result.stderr.endswith(f"not done: {ids['failed']} {ids['deferred']}\n")
    assert "failed" == json.loads(queue(config, "show", ids["failed"], "--json").stdout)["state"]
    assert 0 == queue(config, "retry", ids["failed"], ids["deferred"]).exit_code


async def test_retry_all_failed_goes_in_steps(write_config: ConfigWriter) -> None:
    """More dead letters than one step holds: every one is queued again, each said once."""
    config = write_config()
    spool = await Spool.open(config.parent / "spool")
    count = requeue.STEP * 2 + 7
    for n in range(count):
        await add(spool, n)
    for mail in await spool.claim(count):
        await spool.fail(mail.id, rule=None, route="upstream", reply="550 5.1.1 no such user")
    await spool.close()
    result = queue(config, "retry", "--all-failed")
    assert (0, count) == (result.exit_code, result.stdout.count(": queued for delivery\n"))
    stats = json.loads(queue(config, "stats", "--json").stdout)
    assert {"queued": count} == {k: v for k, v in stats["counts"].items() if v}


@pytest.mark.parametrize("lock_file", ["held", "gone"])
def test_an_inflight_row_is_left_to_the_delivery_process_that_has_it(
    spooled: tuple[Path, dict[str, str]], lock_file: str
) -> None:
    """A delivery process holds the lock: its inflight row is left alone, and said so. So
    when the lock file is gone (unlinked under a running process): there is no lock to
    hold that would keep one from starting."""
    config, ids = spooled
    if lock_file == "held":
        result = delivering(config, "delete", ids["inflight"])
    else:
        (config.parent / "spool" / lock.DELIVERY_LOCK).unlink(missing_ok=True)
        result = queue(config, "delete", ids["inflight"])
    assert (1, f"{ids['inflight']}: {requeue.CLAIMED}\n") == (result.exit_code, result.stderr)
    assert (
        "inflight" == json.loads(queue(config, "show", ids["inflight"], "--json").stdout)["state"]
    )


@pytest.mark.parametrize("action", ["retry", "delete"])
def test_an_inflight_row_left_by_a_crash_can_be_acted_on_while_relay_is_stopped(
    spooled: tuple[Path, dict[str, str]], action: str
) -> None:
    """relay stopped (or killed) with a mail inflight, the one the admin thinks crashes it:
    `relay queue delete` deletes it and `retry` queues it, as for a queued one. Both said
    "claimed by a delivery process that is not running", and the next start sent it
    again. A delivery process starting meanwhile waits for the lock the command holds."""
    config, ids = spooled
    (config.parent / "spool" / lock.DELIVERY_LOCK).touch()  # a delivery process ran here
    result = queue(config, action, ids["inflight"])
    assert 0 == result.exit_code, result.output
    shown = queue(config, "show", ids["inflight"], "--json")
    if action == "delete":
        assert (f"{ids['inflight']}: deleted\n", 1) == (result.stdout, shown.exit_code)
    else:
        assert "queued" == json.loads(shown.stdout)["state"]


def test_a_damaged_spool_is_named_not_a_traceback(spooled: tuple[Path, dict[str, str]]) -> None:
    """The root page of every table and index overwritten (the schema left as it was): list,
    show, stats and retry --all-failed (a traceback before) each say which spool they could
    not read and why, and exit 1."""
    config, ids = spooled
    path = config.parent / "spool" / DB_NAME
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        roots = [r for (r,) in conn.execute("SELECT rootpage FROM sqlite_master WHERE rootpage")]
    with path.open("r+b") as db:
        for page in roots:
            db.seek((page - 1) * size)
            db.write(b"\xff" * size)
    for args in (["list"], ["show", ids["queued"]], ["stats", "--json"], ["retry", "--all-failed"]):
        result = queue(config, *args)
        assert 1 == result.exit_code, (args, result.output)
        assert f"relay queue: spool {path}: database disk image is malformed\n" == result.stderr


def test_queue_help_needs_no_config_and_config_goes_after_the_command_too(
    spooled: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`relay queue list --help` where no relay.yaml is found printed an error about the
    missing file, not the help; `--config` worked only before the command (`relay queue
    --config F list`), unlike every other command's."""
    config, ids = spooled
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    helped = CliRunner().invoke(main, ["queue", "list", "--help"])
    listed = CliRunner().invoke(main, ["queue", "list", "--config", str(config), "--json"])
    assert (0, True) == (helped.exit_code, "queue list [OPTIONS]" in helped.stdout)
    assert ids["queued"] in listed.stdout, listed.output


HOSTILE = (
    b"Message-ID: <x\x1b[41mRED\x1b[0m\x1b]0;pwned-title\x07@moodle.test>\r\n"
    b'From: "\x1b[2J\x1b[HEvil" <noreply@moodle.test>\r\n'
    b"Subject: \x1b[1A\x1b[2Kstate:           sent \xe2\x80\xae\r\n"
    b"\r\nbody\r\n"
)


async def test_what_a_client_wrote_reaches_the_terminal_as_text(
    write_config: ConfigWriter,
) -> None:
    """A mail whose Message-ID, From and Subject carry terminal escapes (clear the screen,
    retitle the window, move up a line and write a fake "state: sent" over the real one) and
    a bidi override, deferred with a reply that carries more: `relay queue show` and `list`
    printed them raw, and a terminal acted on them. Each is now shown as an escape
    (\\x1b, \\u202e); `--json` was safe already."""
    config = write_config()
    spool = await Spool.open(config.parent / "spool")
    queue_id = await spool.add(
        sender="noreply@moodle.test",
        recipients=["u1@example.org"],
        raw=HOSTILE,
        peer="127.0.0.1",
        trace=TRACE,
        message_id="<x\x1b[41mRED\x1b[0m\x1b]0;pwned-title\x07@moodle.test>",
    )
    await spool.claim(1)
    await spool.defer(
        queue_id, due_at=time.time() + 600, rule=None, route="upstream", reply="451 \x1b[2J\rok"
    )
    await spool.close()
    runner = CliRunner()  # color=True: as on a terminal, where click strips no escapes
    shown = {
        args[0]: runner.invoke(main, ["queue", "--config", str(config), *args], color=True)
        for args in (["show", queue_id], ["list"])
    }
    for command, result in shown.items():
        assert 0 == result.exit_code, result.output
        acted_on = {c for c in result.stdout if c in "\x1b\x07\r\u202e"}
        assert set() == acted_on, (command, result.stdout)
    assert "Subject: \\x1b[1A\\x1b[2Kstate:           sent \\u202e" in shown["show"].stdout
    assert "\\x1b]0;pwned-title\\x07@moodle.test>" in shown["show"].stdout
    assert "(451 \\x1b[2J\\rok)" in shown["list"].stdout


async def test_a_list_nobody_reads_on_holds_up_no_checkpoint(write_config: ConfigWriter) -> None:
    """`relay queue list | less`, the pager left open: the list wrote its rows from inside
    one SELECT, so its read snapshot stayed open while stdout was full, and no checkpoint
    could copy the WAL back (it grew by every mail accepted meanwhile: 130 MB for 3,000
    mails of 20 KB). It reads ECHO_EVERY rows, ends the read, then writes them: with the
    list blocked on its pipe, a checkpoint still copies every page."""
    config = write_config()
    spool = await Spool.open(config.parent / "spool", full_sync=False)
    try:
        await asyncio.gather(*(add(spool, n) for n in range(3000)))
        listing = await asyncio.create_subprocess_exec(
            *RELAY,
            *("queue", "--config", str(config), "list"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(2.0)  # the pipe is full: the list waits for a reader
            assert listing.returncode is None
            await asyncio.gather(*(add(spool, n) for n in range(3000, 3500)))
            with closing(sqlite3.connect(config.parent / "spool" / DB_NAME)) as conn:
                busy, wal_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            listing.kill()
            await listing.communicate()  # wait() alone waits for the pipe it filled
    finally:
        await spool.close()
    assert (0, wal_pages) == (busy, copied)


def failed_rows(spool_dir: Path, count: int, *, age: float = 60) -> list[str]:
    """`count` dead letters written straight into a spool (made if new), in one
    transaction, failed `age` seconds ago; their ids."""
    from relay.spool.rows import insert_mail, new_id
    from relay.spool.schema import connect, prepare

    prepare(spool_dir)
    ids = []
    with closing(connect(spool_dir / DB_NAME)) as conn:
        conn.execute("BEGIN")
        for n in range(count):
            ids.append(queue_id := new_id())
            insert_mail(
                conn,
                queue_id=queue_id,
                sender="noreply@moodle.test",
                recipients=json.dumps([f"user{n}@example.org"]),
                raw=body(n),
                peer="127.0.0.1",
                trace=b"Received: from moodle\r\n",
                message_id=f"<{n}@moodle.test>",
                detail="test",
                now=time.time() - age,
            )
            conn.execute("UPDATE messages SET state = 'failed' WHERE id = ?", (queue_id,))
        conn.execute("COMMIT")
    return ids


def test_dead_letters_go_after_failed_retention_and_the_log_says_so(
    write_config: ConfigWriter, relay_process: Callable[[Path], RelayProcess]
) -> None:
    """relay serve's delivery process drops dead letters that failed more than
    `failed_retention` ago (at start, then hourly), says how many in one line, and keeps
    the younger ones for `relay queue retry`; `failed_retention: null` keeps them all."""
    day = 86400
    config = write_config(failed_retention=30 * day)
    spool_dir = config.parent / "spool"
    old = failed_rows(spool_dir, 3, age=31 * day)
    young = failed_rows(spool_dir, 2, age=29 * day)
    relay = relay_process(config).start()
    wait_until(lambda: "event=purged_dead_letters" in relay.log(), "the dead letters' purge")
    assert 0 == relay.stop()
    assert "event=purged_dead_letters count=3 failed_retention=2592000" in relay.log()
    listed = relay_cli("queue", "--config", str(config), "list", "--state", "failed", "--json")
    assert set(young) == {json.loads(line)["id"] for line in listed.stdout.splitlines()}
    assert not set(old) & set(listed.stdout)

    # null: none goes, however old; a sent row past `retention` shows the purge ran.
    config = write_config(failed_retention=None)
    [sent] = failed_rows(spool_dir, 1, age=60)
    with closing(sqlite3.connect(spool_dir / DB_NAME)) as conn, conn:
        conn.execute("UPDATE messages SET state = 'sent' WHERE id = ?", (sent,))
        conn.execute("UPDATE messages SET updated_at = updated_at - 40 * 86400")
    relay = relay_process(config).start()
    wait_until(lambda: "event=purged count=1" in relay.log(), "the sent row's purge")
    assert 0 == relay.stop()
    assert "purged_dead_letters" not in relay.log()
    listed = relay_cli("queue", "--config", str(config), "list", "--state", "failed", "--json")
    assert set(young) == {json.loads(line)["id"] for line in listed.stdout.splitlines()}


@pytest.mark.system
def test_ctrl_z_on_a_retry_never_leaves_it_holding_the_write_turn(
    write_config: ConfigWriter,
) -> None:
    """An admin presses Ctrl-Z (SIGTSTP) on `relay queue retry --all-failed`: the command
    stops between steps, never inside one. Stopped inside a step, it held the spool's write
    turn, and relay serve answered 451 to every mail (which Moodle never sends again) until
    it was resumed: 85% of stops landed there. Five stops, each checked by taking the turn."""
    config = write_config()
    spool_dir = config.parent / "spool"
    failed_rows(spool_dir, 100 * requeue.STEP)
    command = subprocess.Popen(
        [*RELAY, "queue", "--config", str(config), "retry", "--all-failed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    state = Path(f"/proc/{command.pid}/stat")
    held = []
    try:
        for _ in range(5):
            time.sleep(0.05)
            command.send_signal(signal.SIGTSTP)
            deadline = time.monotonic() + 5
            while (now := state.read_text().rsplit(")", 1)[1].split()[0]) not in "TZ":
                assert time.monotonic() < deadline, f"the command did not stop ({now})"
                time.sleep(0.001)
            if now == "Z":
                break  # done before this stop (a fast machine): nothing more to hold
            with open(spool_dir / lock.WRITE_LOCK, "a+b") as turn:
                try:
                    fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(turn, fcntl.LOCK_UN)
                except BlockingIOError:
                    held.append(True)
            command.send_signal(signal.SIGCONT)
    finally:
        command.send_signal(signal.SIGCONT)
        _, err = command.communicate(timeout=60)
    assert ([], 0) == (held, command.returncode), err
