"""End to end over real sockets: Moodle's mails in, SES (moto) and the original host out.

`relay serve` runs as a process with the shipped rules; SES is moto in server mode
in its own process (its own send counters, so the 200-a-day sandbox quota moto
reports is not shared with other tests); the original host is a capture server.
The corpus goes in with its Moodle envelopes (smtplib: PHPMailer cannot send a
prepared .eml), and a batch built by PHPMailer itself goes in too. Shadow mode and
the SES kill switch run the service in the test's loop against the fake SES.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from email.parser import BytesHeaderParser
from email.utils import formataddr, getaddresses
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.corpus import expectations
from tests.support.fakeses import FakeSes
from tests.support.mails import NOREPLY, ORIGIN
from tests.support.phpmailer import CLIENT, PHPMAILER, phpmailer_wire
from tests.support.processes import RelayProcess, relay_cli
from tests.support.relays import ConfigWriter, Running
from tests.support.smtp import asend, send
from tests.support.spools import await_rows, wait_rows

pytestmark = pytest.mark.usefixtures("aws_env")

CORPUS = expectations()
RAW = {e.name: e.path.read_bytes() for e in CORPUS}
MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@pytest.fixture
def moto_process() -> Iterator[str]:
    """moto's SES in a process of its own; yields its URL. Stopped by closing its stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def moto_messages(url: str) -> list[dict[str, Any]]:
    """What moto stored for SendRawEmail: id, source, destinations, raw_data."""
    with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=10) as response:
        data = json.load(response)
    messages: list[dict[str, Any]] = data["ses"]["RawMessage"]
    return messages


def phpmailer_batch() -> list[dict[str, Any]]:
    """Mails as Moodle builds them: re-engagement student (text, HTML) and CC copies, and
    mails without the re-engagement header; with the rule each one must get."""
    mails: list[dict[str, Any]] = []
    for n in range(8):
        kind = ("student", "student-html", "cc", "forum")[n % 4]
        to = f"tutor{n}@example.org" if kind == "cc" else f"student{n}@students.example.org"
        mails.append(
            {
                "from": NOREPLY,
                "from_name": "Moodle Support (via Example Moodle)",
                "to": to,
                "to_name": to if kind == "cc" else f"Student Number {n}",
                "subject": f"We miss you in BIO10{n} &amp; friends"
                if kind != "forum"
                else f"BIO10{n}: new forum post",
                "body": f"Dear student {n},\n.a line starting with a dot\nCome back.\n",
                "html": f'<div class="text_to_html">Hi {n}</div>'
                if kind == "student-html"
                else None,
                "message_id": f"<67c6d0{n:08x}.{n:08d}@moodle.example.org>",
                "headers": [] if kind == "forum" else [["X-Moodle-Originating-Script", ORIGIN]],
                "rule": {"cc": "reengagement-cc", "forum": None}.get(kind, "reengagement-student"),
            }
        )
    return mails


def header_addresses(raw: bytes) -> list[str]:
    """To/Cc/Bcc of `raw` as moto appends them to Destinations (formataddr of each)."""
    headers = BytesHeaderParser().parsebytes(raw)
    values = [headers[name] for name in ("TO", "CC", "BCC") if name in headers]
    return [formataddr(pair) for pair in getaddresses(values) if pair[1]]


@pytest.mark.system
@pytest.mark.parametrize("api", ["v1", "v2"], ids=["api-v1", "api-v2"])
def test_moodle_mails_reach_ses_and_original_host_intact(
    write_config: ConfigWriter,
    relay_process: Callable[[Path], RelayProcess],
    capture: CaptureServer,
    moto_process: str,
    api: str,
) -> None:
    """`relay serve` with the shipped rules and `ses.api` v1 (SendRawEmail) or v2 (SESv2
    SendEmail, Content.Raw; moto keeps both in the same store): the 42 corpus mails
    (smtplib, Moodle envelopes) and 8 PHPMailer-built mails. Re-engagement student and CC
    copies arrive at SES (moto)
    with Source and Destinations = the envelope and the raw bytes = relay's one Received:
    line + exactly the bytes sent; every other mail arrives at the original host with the
    envelope unchanged and the same bytes. Each mail exactly once (by queue id and by
    Message-ID); `relay queue` shows rule, route and the SES MessageId or the host's reply."""
    ses = boto3.client("ses", region_name=REGION, endpoint_url=moto_process)
    for domain in sorted({e.sender.rpartition("@")[2] for e in CORPUS} | {"moodle.example.org"}):
        ses.verify_domain_identity(Domain=domain)
    config = write_config(
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 10},
        ses={
            "api": api,
            "region": REGION,
            "endpoint_url": moto_process,
            "max_send_rate": 50,
            "fallback_after": 60,
            "timeout": 10,
        },
        retry={"schedule": [1], "max_age": 600},
    )
    relay = relay_process(config).start()

    # queue id -> (sender, recipients, bytes sent, expected rule, expected route)
    sent: dict[str, tuple[str, tuple[str, ...], bytes, str | None, str]] = {}
    for e in CORPUS:
        queue_id = send(relay.port, e.sender, e.recipients, RAW[e.name])
        sent[queue_id] = (e.sender, e.recipients, RAW[e.name], e.rule, e.route)
    assert PHPMAILER.is_file(), "Debian's libphp-phpmailer is needed"
    batch = phpmailer_batch()
    job = {
        "host": "127.0.0.1",
        "port": relay.port,
        "user": None,
        "keepalive": False,
        "mails": batch,
    }
    run = subprocess.run(
        ["php", str(CLIENT)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == run.returncode, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(True, None)] * len(batch) == [(r["ok"], r["error"]) for r in results]
    for mail, result in zip(batch, results, strict=True):
        route = "upstream" if mail["rule"] is None else "ses"
        wire = phpmailer_wire(base64.b64decode(result["mime"]))
        sent[result["queue_id"]] = (NOREPLY, (mail["to"],), wire, mail["rule"], route)
    assert 50 == len(sent)

    done = wait_rows(config.parent / "spool", sent, {"sent"}, timeout=30)
    listed = relay_cli("queue", "--config", str(config), "list", "--state", "sent", "--json")
    assert 0 == listed.returncode, listed.stderr
    records = {r["id"]: r for r in map(json.loads, listed.stdout.splitlines())}
    traces = {q: row["trace"] for q, row in done.items()}
    assert [] == [
        q
        for q, t in traces.items()
        if not t.startswith(b"Received: ") or t.count(b"\r\n") != 1 + t.count(b"\r\n\t")
    ]

    expected_rows = {q: (s[3], s[4]) for q, s in sent.items()}
    assert expected_rows == {q: (records[q]["rule"], records[q]["route"]) for q in sent}
    ses_ids = [q for q, s in sent.items() if s[4] == "ses"]
    upstream_ids = [q for q, s in sent.items() if s[4] == "upstream"]
    assert [("SES accepted", None, True)] * len(ses_ids) == [
        (records[q]["reply"], records[q]["fallback_reason"], bool(records[q]["ses_message_id"]))
        for q in ses_ids
    ]
    assert [("250 2.0.0 Ok: captured", None, None)] * len(upstream_ids) == [
        (records[q]["reply"], records[q]["fallback_reason"], records[q]["ses_message_id"])
        for q in upstream_ids
    ]

    at_ses = {m["id"]: m for m in moto_messages(moto_process)}
    by_ses_id = {records[q]["ses_message_id"]: q for q in ses_ids}
    assert sorted(by_ses_id) == sorted(at_ses)  # nothing else, nothing twice
    expected_ses = {
        q: (sent[q][0], [*sent[q][1], *header_addresses(sent[q][2])], traces[q] + sent[q][2])
        for q in ses_ids
    }
    actual_ses = {
        by_ses_id[i]: (m["source"], m["destinations"], m["raw_data"].encode("utf-8"))
        for i, m in at_ses.items()
    }
    assert expected_ses == actual_ses

    at_host = [(m.queue_id or "", m.mail_from, m.rcpt_tos, m.content) for m in capture.messages]
    expected_host = sorted(
        (q, sent[q][0], sent[q][1], traces[q] + sent[q][2]) for q in upstream_ids
    )
    assert expected_host == sorted(at_host)

    message_ids = Counter(BytesHeaderParser().parsebytes(s[2])["Message-ID"] for s in sent.values())
    delivered = Counter(
        [
            BytesHeaderParser().parsebytes(m["raw_data"].encode())["Message-ID"]
            for m in at_ses.values()
        ]
        + [m.message_id for m in capture.messages]
    )
    assert message_ids == delivered
    assert {1} == set(delivered.values())

    for queue_id in (ses_ids[0], upstream_ids[0]):
        shown = relay_cli("queue", "--config", str(config), "show", queue_id, "--json")
        record = json.loads(shown.stdout)
        assert (records[queue_id]["ses_message_id"], records[queue_id]["reply"], "sent") == (
            record["ses_message_id"],
            record["reply"],
            record["events"][-1]["event"],
        )
    assert 0 == relay.stop()
    print(
        f"e2e: sent {len(sent)} (42 corpus + {len(batch)} PHPMailer), 250s {len(sent)}, "
        f"delivered: SES {len(at_ses)}, original host {len(capture.messages)}; "
        f"duplicates {sum(delivered.values()) - len(delivered)}, "
        f"lost {len(message_ids - delivered)}"
    )


MODES = {
    "shadow": ({"mode": "shadow"}, {}, "shadow mode: classified for SES, sent upstream"),
    "ses-disabled": ({}, {"enabled": False}, "ses.enabled is false"),
}


@pytest.mark.parametrize(("top", "ses", "reason"), MODES.values(), ids=MODES.keys())
async def test_shadow_and_kill_switch_send_everything_upstream(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    fake_ses: FakeSes,
    top: dict[str, Any],
    ses: dict[str, Any],
    reason: str,
) -> None:
    """`mode: shadow` and `ses.enabled: false`: SES gets no SendRawEmail; all 42 corpus mails
    reach the original host once, intact; every row still records the rule it matched, and
    the SES-routed ones say why they went upstream."""
    relay = await start_relay(
        deliver=True,
        **top,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"region": REGION, "endpoint_url": fake_ses.url, "max_send_rate": 100, **ses},
    )
    sent = {await asend(relay.port, e.sender, e.recipients, RAW[e.name]): e for e in CORPUS}
    found = await await_rows(relay.settings.spool, sent, {"sent"})
    assert (0, 0) == (fake_ses.calls, len(fake_ses.sent))
    expected = {
        q: (e.rule, "upstream", reason if e.route == "ses" else None) for q, e in sent.items()
    }
    assert expected == {q: (r["rule"], r["route"], r["fallback_reason"]) for q, r in found.items()}
    at_host = sorted(
        (m.queue_id or "", m.mail_from, m.rcpt_tos, m.content) for m in capture.messages
    )
    assert (
        sorted(
            (q, e.sender, e.recipients, found[q]["trace"] + RAW[e.name]) for q, e in sent.items()
        )
        == at_host
    )
    classified_ses = sum(e.route == "ses" for e in sent.values())
    print(
        f"{'/'.join(f'{k}={v}' for k, v in (top | ses).items())}: sent {len(sent)}, 250s "
        f"{len(sent)}, SES calls 0, original host {len(capture.messages)} "
        f"({classified_ses} classified for SES), duplicates 0, lost 0"
    )
