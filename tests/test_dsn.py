"""Delivery status notifications (RFC 3464): a mail that fails for good is reported to its
envelope sender, from `<>`, through the original host, and recorded on both rows.

The end-to-end tests run the service in the test's loop, send over real SMTP and let the
capture server (the original host) refuse recipients; the DSN comes back to the same
capture server. `notice()` is also checked alone, parsed with the stdlib email parser.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from pathlib import Path

import aiosmtplib
import pytest

from relay import settings as settings_mod
from relay.deliver import report
from relay.errors import ConfigError
from relay.mail import Mail
from relay.spool import DB_NAME, Spool
from relay.spool.schema import SCHEMA_VERSION
from tests.support.capture import Captured, CaptureServer
from tests.support.processes import relay_cli
from tests.support.relays import ConfigWriter, Running
from tests.support.smtp import asend, queue_id_of
from tests.support.spools import await_rows, rows

VERP = "mdl+b1a2c3@moodle.example.org"  # Moodle's VERP envelope sender, bounce handling on
RAW = (
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b'To: "Ann Student" <gone@students.example.org>\r\n'
    b'From: "Moodle Support (via Example)" <noreply@moodle.example.org>\r\n'
    b"Subject: We miss you in BIO101\r\n"
    b"Message-ID: <5f1a2b3c4d5e63.12345678@moodle.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Come back.\r\n"
)
REFUSED = "550 5.1.1 <gone@students.example.org>: Recipient address rejected"


async def send_any(port: int, sender: str, recipients: list[str], raw: bytes) -> str:
    """`asend` that also takes the null sender "" (aiosmtplib.send refuses it)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
        await client.mail(sender)
        for rcpt in recipients:
            await client.rcpt(rcpt)
        reply = await client.data(raw)
    return queue_id_of(reply.message)


def parse(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def report_parts(message: Message) -> tuple[str, list[Message], Message]:
    """(human text, per-message then per-recipient status blocks, headers part) of a DSN."""
    human, status, headers = message.get_payload()
    assert isinstance(human, EmailMessage) and isinstance(headers, EmailMessage)
    blocks = status.get_payload()
    return human.get_content(), blocks, headers


def dsn_summary(captured: Captured) -> dict[str, object]:
    """What a DSN at the original host says, in the terms RFC 3464 uses."""
    message = parse(captured.content)
    _, blocks, headers = report_parts(message)
    return {
        "mail_from": captured.mail_from,
        "rcpt_tos": captured.rcpt_tos,
        "type": message.get_content_type(),
        "report_type": message.get_param("report-type"),
        "parts": [p.get_content_type() for p in message.iter_parts()],
        "reporting_mta": blocks[0]["Reporting-MTA"],
        "recipients": [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]],
        "original_message_id": parse(headers.get_payload(decode=True))["Message-ID"],
    }


async def test_a_refused_mail_is_a_dead_letter_and_its_sender_gets_a_dsn(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    write_config: ConfigWriter,
) -> None:
    """Must-show 1. The original host refuses the recipient with 550: the mail ends `failed`,
    and a DSN reaches the envelope sender over SMTP: MAIL FROM:<>, multipart/report with
    Final-Recipient, Action failed, Status 5.1.1, the 550 as Diagnostic-Code, and the
    original headers. `relay queue show` links both ways."""
    capture.refuse_rcpt("gone@students.example.org", REFUSED)
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
    )
    queue_id = await asend(relay.port, VERP, ["gone@students.example.org"], RAW)
    failed = (await await_rows(relay.settings.spool, [queue_id], {"failed"}))[queue_id]
    assert REFUSED in failed["reply"]
    dsn_ids = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    assert 1 == len(dsn_ids)
    notice = (await await_rows(relay.settings.spool, dsn_ids, {"sent"}))[dsn_ids[0]]
    assert ("", (VERP,), "upstream") == (notice["sender"], notice["recipients"], notice["route"])
    config = str(relay.settings.source)
    [delivered] = capture.messages
    assert {
        "mail_from": "<>",  # aiosmtpd's spelling of MAIL FROM:<>
        "rcpt_tos": (VERP,),
        "type": "multipart/report",
        "report_type": "delivery-status",
        "parts": ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        "reporting_mta": "dns; relay.test",
        "recipients": [("rfc822; gone@students.example.org", "failed", "5.1.1")],
        "original_message_id": "<5f1a2b3c4d5e63.12345678@moodle.example.org>",
    } == dsn_summary(delivered)
    human, blocks, _ = report_parts(parse(delivered.content))
    assert f"smtp; {REFUSED}" == blocks[1]["Diagnostic-Code"]
    assert queue_id in human and REFUSED in human

    shown = json.loads(relay_cli("queue", "--config", config, "show", queue_id, "--json").stdout)
    shown_dsn = json.loads(
        relay_cli("queue", "--config", config, "show", dsn_ids[0], "--json").stdout
    )
    assert (dsn_ids, None, "dsn") == (
        shown["dsns"],
        shown["reports_on"],
        shown["events"][-1]["event"],
    )
    assert ([], queue_id) == (shown_dsn["dsns"], shown_dsn["reports_on"])
    everything = rows(relay.settings.spool)
    assert [queue_id, dsn_ids[0]] == sorted(everything, key=lambda q: everything[q]["received_at"])


async def test_a_dsn_refused_for_good_produces_nothing_further(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """Never a DSN about a DSN: the sender's address refused too, the DSN is a dead letter
    and the spool holds exactly the mail and its one DSN; the capture server got nothing."""
    capture.refuse_rcpt("gone@students.example.org", REFUSED)
    capture.refuse_rcpt(VERP, "550 5.1.1 no such VERP address")
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
    )
    queue_id = await asend(relay.port, VERP, ["gone@students.example.org"], RAW)
    await await_rows(relay.settings.spool, [queue_id], {"failed"})
    [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    await await_rows(relay.settings.spool, [dsn_id], {"failed"})
    await asyncio.sleep(0.5)  # a second DSN would have been queued in the same transaction; be sure
    assert {queue_id: "failed", dsn_id: "failed"} == {
        q: r["state"] for q, r in rows(relay.settings.spool).items()
    }
    assert ([], 0) == (capture.messages, capture.data_attempts)


async def test_partial_refusal_reports_only_the_refused_recipient(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """Two recipients, one refused with 550: the mail is `sent` to the other, and one DSN
    names only the refused one."""
    capture.refuse_rcpt("gone@students.example.org", REFUSED)
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
    )
    rcpts = ["gone@students.example.org", "here@students.example.org"]
    queue_id = await asend(relay.port, VERP, rcpts, RAW)
    await await_rows(relay.settings.spool, [queue_id], {"sent"})
    [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    await await_rows(relay.settings.spool, [dsn_id], {"sent"})
    by_from = {m.mail_from: m for m in capture.messages}
    assert (("here@students.example.org",), (VERP,)) == (
        by_from[VERP].rcpt_tos,
        by_from["<>"].rcpt_tos,
    )
    assert [("rfc822; gone@students.example.org", "failed", "5.1.1")] == dsn_summary(by_from["<>"])[
        "recipients"
    ]


async def test_mail_that_expires_gets_a_dsn_with_the_last_temporary_status(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """`retry.max_age` runs out while the host answers 451: the mail fails, and its DSN
    says Action failed with the last 4.x.x status (RFC 3464: delivery time expired)."""
    capture.refuse_rcpt("slow@students.example.org", "451 4.2.0 mailbox busy", times=2)
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
        retry={"schedule": [1], "max_age": 1},
    )
    queue_id = await asend(relay.port, VERP, ["slow@students.example.org"], RAW)
    failed = await await_rows(relay.settings.spool, [queue_id], {"failed"}, within=10)
    assert "retry.max_age" in failed[queue_id]["reply"]
    [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    await await_rows(relay.settings.spool, [dsn_id], {"sent"})
    [delivered] = capture.messages
    assert [("rfc822; slow@students.example.org", "failed", "4.2.0")] == dsn_summary(delivered)[
        "recipients"
    ]


NO_DSN = {
    "null-sender": ("", {}, "none: null sender <>"),
    "bounces-dsn-false": (VERP, {"bounces": {"dsn": False}}, "none: bounces.dsn is off"),
}


@pytest.mark.parametrize(("sender", "overrides", "said"), NO_DSN.values(), ids=NO_DSN.keys())
async def test_no_dsn_for_the_null_sender_or_when_turned_off(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    caplog: pytest.LogCaptureFixture,
    sender: str,
    overrides: dict[str, object],
    said: str,
) -> None:
    """A refused mail from `<>` (a bounce itself), or with `bounces.dsn: false`: a dead
    letter and nothing else, its failed line saying that no DSN went (it read as any
    failure whose sender was told)."""
    capture.refuse_rcpt("gone@students.example.org", REFUSED)
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
        **overrides,
    )
    queue_id = await send_any(relay.port, sender, ["gone@students.example.org"], RAW)
    await await_rows(relay.settings.spool, [queue_id], {"failed"})
    assert [queue_id] == list(rows(relay.settings.spool))
    for _ in range(100):  # logged just after the outcome is committed
        lines = [r.getMessage() for r in caplog.records if "event=failed" in r.getMessage()]
        if lines:
            break
        await asyncio.sleep(0.05)
    assert [True] == [f'dsn="{said}"' in line for line in lines], lines


def test_notice_alone_reads_as_rfc_3464() -> None:
    """`notice()` for two failures: headers of a DSN (From the configured address, To the
    sender, Auto-Submitted), Arrival-Date, one block per recipient, Remote-MTA when known,
    a Diagnostic-Code already `smtp;` not doubled; one CRLF-ended line each."""
    mail = Mail(id="0123456789AB", sender=VERP, recipients=("a@x.org", "b@x.org"), raw=RAW)
    failures = [
        report.Failure(recipient="a@x.org", reply="550 5.7.1 policy\r\n550 more", remote="dns; mx"),
        report.Failure(recipient="b@x.org", reply="smtp; 552 mailbox full", status="5.2.2"),
    ]
    built = report.notice(mail, failures, hostname="relay.test", from_address="bounce@relay.test")
    message = parse(built.raw)
    _, blocks, _ = report_parts(message)
    assert (
        "Mail Delivery System <bounce@relay.test>",
        VERP,
        "auto-replied",
        built.message_id,
    ) == (message["From"], message["To"], message["Auto-Submitted"], message["Message-ID"])
    assert [
        ("rfc822; a@x.org", "5.7.1", "dns; mx", "smtp; 550 5.7.1 policy 550 more"),
        ("rfc822; b@x.org", "5.2.2", None, "smtp; 552 mailbox full"),
    ] == [
        (b["Final-Recipient"], b["Status"], b["Remote-MTA"], b["Diagnostic-Code"])
        for b in blocks[1:]
    ]
    assert blocks[0]["Arrival-Date"]
    assert b"\n" not in built.raw.replace(b"\r\n", b"")
    assert (VERP, "failed: a@x.org, b@x.org") == (built.recipient, built.summary)


def test_a_status_block_stays_within_what_mail_allows() -> None:
    """A Diagnostic-Code of 100 recipients' replies joined (a partial send that expired)
    ran to 10,000 characters on one line, in a part labelled 7bit; a Latin-1 reply's
    U+FFFD and a non-ASCII recipient went in as 8-bit bytes; relay's own words were labelled
    `smtp;`. Now: at most DIAGNOSTIC_MAX characters, ASCII, `X-Relay;` for relay's words
    (as Postfix writes `X-Postfix;`), and RFC 6533's global form for a UTF-8 address."""
    joined = "; ".join(f"user{n:03}@x.org: 451 4.2.1 mailbox busy" for n in range(100))
    mail = Mail(id="0123456789AB", sender=VERP, recipients=("a@x.org", "jü@exämple.de"), raw=RAW)
    failures = [
        report.Failure(recipient="a@x.org", reply=f"gave up after 432000s: {joined}"),
        report.Failure(recipient="jü@exämple.de", reply="550 5.1.1 Empf\ufffdnger unbekannt"),
    ]
    built = report.notice(mail, failures, hostname="relay.test", from_address="bounce@relay.test")
    message = parse(built.raw)
    status_part = message.get_payload()[1]
    # Python's parser splits message/delivery-status into blocks, not the global form
    text = built.raw.split(b"Content-Transfer-Encoding: 8bit\r\n\r\n")[1].split(b"\r\n--")[0]
    blocks = [parse(block) for block in text.split(b"\r\n\r\n") if block.strip()]
    codes = [b["Diagnostic-Code"] for b in blocks[1:]]
    assert (
        "global-delivery-status",
        "message/global-delivery-status",
        "8bit",
        ["utf-8; a@x.org", "utf-8; jü@exämple.de"],
    ) == (
        message.get_param("report-type"),
        status_part.get_content_type(),
        status_part["Content-Transfer-Encoding"],
        [b["Final-Recipient"] for b in blocks[1:]],
    )
    assert codes[0].startswith("X-Relay; gave up after 432000s: user000@x.org")
    assert (report.DIAGNOSTIC_MAX + len("X-Relay; "), True) == (len(codes[0]), codes[0].isascii())
    assert "smtp; 550 5.1.1 Empf?nger unbekannt" == codes[1]
    assert max(len(line) for line in built.raw.split(b"\r\n")) <= 998
    ascii_only = report.notice(
        mail, failures[:1], hostname="relay.test", from_address="bounce@relay.test"
    )
    assert "delivery-status" == parse(ascii_only.raw).get_param("report-type")


def test_an_ses_bounce_cannot_add_fields_to_the_dsn() -> None:
    """SES's status and address go into the DSN's status block: one with a line break in it
    is not copied as it is (Status falls back to 5.0.0 for a permanent bounce), and the
    block holds the fields relay wrote, no others."""
    from relay.deliver import dsn
    from relay.deliver.ses.events import parse as parse_event

    injected = "\r\nAction: delivered\r\nX-Injected: yes"
    bounce = {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "feedbackId": "f1",
        "bouncedRecipients": [
            {"emailAddress": "a@x.org", "status": f"5.1.1{injected}"},
            {"emailAddress": f"c@x.org{injected}", "status": "5.1.1"},  # not the mail's
            {"emailAddress": "b@x.org", "status": "5.1.2"},
        ],
    }
    event = {"eventType": "Bounce", "mail": {"messageId": "ses-1"}, "bounce": bounce}
    notice_for = dsn.for_ses_event(parse_event(json.dumps(event)), ses_settings())
    assert notice_for is not None
    mail = Mail(id="Q1", sender=VERP, recipients=("a@x.org", "b@x.org"), raw=RAW)
    notice = notice_for(mail, frozenset(), frozenset())
    assert notice is not None
    _, blocks, _ = report_parts(parse(notice.raw))
    assert [
        ["Final-Recipient", "Action", "Status", "Diagnostic-Code"],
        ["Final-Recipient", "Action", "Status", "Diagnostic-Code"],
    ] == [list(b.keys()) for b in blocks[1:]]
    assert ["5.0.0", "5.1.2"] == [b["Status"] for b in blocks[1:]]
    assert ["rfc822; a@x.org", "rfc822; b@x.org"] == [b["Final-Recipient"] for b in blocks[1:]]
    assert "failed" == blocks[1]["Action"]


def ses_settings() -> settings_mod.Settings:
    return settings_mod.Settings(
        source=Path("relay.yaml"),
        listen=settings_mod.HostPort(host="127.0.0.1", port=2525),
        spool=Path("spool"),
        rules=Path("rules.yaml"),
        upstream=settings_mod.Upstream(host="smtp.example.org"),
        hostname="relay.test",
    )


def test_the_headers_an_ses_event_brings_stay_header_lines() -> None:
    """A mail sent through SES has no body left when its bounce comes: the DSN attaches the
    headers SES sent in the event, which are any JSON text. A value with CR LF CR LF ended
    the header part early (the To: after it was lost), a bare LF went into the DSN as it
    was, a name with a space or a colon made a line no parser reads as a field. Now each
    value is one line of at most 998 characters, and a field with no valid name is left
    out."""
    from relay.deliver import dsn
    from relay.deliver.ses.events import parse as parse_event

    headers = [
        {"name": "Subject", "value": "line1\nX-Bare: lf"},
        {"name": "From", "value": "a@b\r\n\r\nbody-ish"},
        {"name": "Bad Name", "value": "x"},
        {"name": "X-Long", "value": "v" * 5000},
        {"name": "To", "value": "a@x.org"},
    ]
    bounce = {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "feedbackId": "f1",
        "bouncedRecipients": [{"emailAddress": "a@x.org", "status": "5.1.1"}],
    }
    event = {
        "eventType": "Bounce",
        "mail": {"messageId": "ses-1", "headers": headers},
        "bounce": bounce,
    }
    notice_for = dsn.for_ses_event(parse_event(json.dumps(event)), ses_settings())
    assert notice_for is not None
    mail = Mail(id="Q1", sender=VERP, recipients=("a@x.org",), raw=b"")
    notice = notice_for(mail, frozenset(), frozenset())
    assert notice is not None
    attached = parse(notice.raw).get_payload()[2].get_payload()
    lines = attached.replace("\r\n", "\n").strip("\n").split("\n")
    assert [
        "Subject: line1 X-Bare: lf",
        "From: a@b body-ish",
        "X-Long: " + "v" * (998 - len("X-Long: ")),
        "To: a@x.org",
    ] == lines
    assert b"\n" not in notice.raw.replace(b"\r\n", b"")


def test_a_dsn_carries_at_most_50_kb_of_the_mails_headers() -> None:
    """A mail with 4.7 MB of header lines (60,000 X- fields) gave a DSN of 4.9 MB, which
    the original host may refuse for its size; then the notice from `<>` is a dead letter
    and the sender never hears. As Postfix's bounce_size_limit, the attached headers are
    cut after a whole line within 50,000 bytes."""
    fields = b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 70) for n in range(60_000))
    raw = b"Subject: big\r\n" + fields + b"\r\nbody\r\n"
    mail = Mail(id="0123456789AB", sender=VERP, recipients=("a@x.org",), raw=raw)
    failures = [report.Failure(recipient="a@x.org", reply="550 5.1.1 no")]
    built = report.notice(mail, failures, hostname="relay.test", from_address="bounce@relay.test")
    attached = parse(built.raw).get_payload()[2].get_payload().encode()
    assert len(built.raw) < report.HEADERS_MAX + 5_000
    assert attached.startswith(b"Subject: big\r\nX-H0: ")
    assert report.HEADERS_MAX - 100 < len(attached) <= report.HEADERS_MAX
    assert attached.endswith(b"v" * 70 + b"\r\n")


STATUS = {
    "enhanced-code": ("550 5.1.1 no such user", False, "5.1.1"),
    "ses-diagnostic": ("smtp; 552 5.2.2 mailbox full", False, "5.2.2"),
    "multiline": ("550-5.7.1 policy", False, "5.7.1"),
    "basic-5xx": ("554 go away", False, "5.0.0"),
    "digits-in-text": ("554 Client host [192.5.4.21] blocked", False, "5.0.0"),
    "temporary": ("451 4.3.0 try later", False, "4.3.0"),
    "no-code": ("connection refused", False, "4.4.7"),
    "no-code-delayed": ("Unexpected EOF received", True, "4.0.0"),
    "5xx-delayed": ("554 5.7.1 go away", True, "4.7.1"),
    "upper-case-smtp": ("SMTP; 550 5.1.1 gone", False, "5.1.1"),
}


@pytest.mark.parametrize(("reply", "delayed", "status"), STATUS.values(), ids=STATUS.keys())
def test_status_comes_from_the_reply(reply: str, delayed: bool, status: str) -> None:
    """The Status field: the enhanced code right after the reply code (not digits further
    on: an IP address read 5.4.21), else 5.0.0 for a 5xx, else 4.4.7 (delivery time
    expired) for a failure and 4.0.0 for a delay (4.4.7 contradicted `Action: delayed`),
    and a delay is never 5.x.x (a 554 banner relay retries past: Postfix's soft_bounce)."""
    failure = report.Failure(recipient="a@x.org", reply=reply)
    assert status == report.status_of(failure, delayed=delayed)


def test_bounces_settings_are_validated_with_file_line_and_key(
    write_config: ConfigWriter,
) -> None:
    """`bounces:` defaults (DSNs on, From MAILER-DAEMON@hostname); a `from` that is not an
    address and a `dsn` that is not a boolean are reported with file:line and key."""
    default = settings_mod.load(write_config("ok.yaml"))
    assert (True, "MAILER-DAEMON@relay.test") == (
        default.bounces.dsn,
        default.bounces.sender(default.hostname),
    )
    path = write_config("bad.yaml", bounces={"dsn": "sometimes", "from": "not an address"})
    with pytest.raises(ConfigError) as raised:
        settings_mod.load(path)
    problems = [(p.key, p.line) for p in raised.value.problems]
    assert 2 == len(problems) and all(line for _, line in problems), problems
    assert "from" in str(raised.value) and "dsn" in str(raised.value)


V2_SCHEMA = """
CREATE TABLE messages (
    id TEXT PRIMARY KEY NOT NULL, state TEXT NOT NULL, sender TEXT NOT NULL,
    recipients TEXT NOT NULL, size INTEGER NOT NULL, message_id TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '', received_at REAL NOT NULL, due_at REAL NOT NULL,
    claimed_at REAL, attempts INTEGER NOT NULL DEFAULT 0, rule TEXT, route TEXT,
    ses_message_id TEXT, reply TEXT, fallback_reason TEXT, updated_at REAL NOT NULL,
    trace BLOB NOT NULL
);
CREATE INDEX messages_due ON messages (state, due_at);
CREATE INDEX messages_ready ON messages (due_at, id) WHERE state IN ('queued', 'deferred');
CREATE TABLE bodies (id TEXT PRIMARY KEY NOT NULL, body BLOB NOT NULL);
CREATE TABLE events (queue_id TEXT NOT NULL, at REAL NOT NULL, event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '');
CREATE INDEX events_queue_id ON events (queue_id, at);
PRAGMA user_version = 2;
"""


async def test_a_version_2_spool_is_upgraded_to_3_and_keeps_its_mail(tmp_path: Path) -> None:
    """A spool of schema 2 (before DSN links): opening it adds `reports_on`, the SES
    MessageId index and the `feedback` table in one step; waiting mail is claimable with
    its body, and a DSN can then be recorded against it."""
    directory = tmp_path / "spool"
    directory.mkdir()
    conn = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    conn.executescript(V2_SCHEMA)
    past = time.time() - 60
    conn.execute(
        "INSERT INTO messages (id, state, sender, recipients, size, received_at, due_at,"
        " updated_at, trace) VALUES ('0000000000Q1', 'queued', ?, ?, ?, ?, ?, ?, ?)",
        (VERP, '["gone@students.example.org"]', len(RAW), past, past, past, b"Received: x\r\n"),
    )
    conn.execute("INSERT INTO bodies VALUES ('0000000000Q1', ?)", (RAW,))
    conn.close()

    spool = await Spool.open(directory)
    try:
        [mail] = await spool.claim(5)
        failure = report.Failure(recipient="gone@students.example.org", reply=REFUSED)
        built = report.notice(mail, [failure], hostname="relay.test", from_address="m@relay.test")
        await spool.fail(mail.id, rule=None, route="upstream", reply=REFUSED, notice=built)
    finally:
        await spool.close()
    assert (RAW, "") == (mail.raw, mail.reports_on)
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert {"feedback", "messages_reporting", "messages_by_ses_id"} <= tables
        assert (SCHEMA_VERSION, 3) == (conn.execute("PRAGMA user_version").fetchone()[0], 3)
        linked = conn.execute(
            "SELECT id, state, sender FROM messages WHERE reports_on = ?", (mail.id,)
        )
        assert [(built.id, "queued", "")] == linked.fetchall()
    finally:
        conn.close()


@pytest.mark.system
async def test_a_delay_warning_is_sent_once_when_asked_for(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """`bounces.delay_warning: 1`: a mail the host defers (451) for a few tries gets one
    "Delayed Mail" DSN (Action delayed, the 4.x.x status, Will-Retry-Until), not one per
    try, and is then delivered; off by default (the other tests get no such DSN)."""
    capture.refuse_rcpt("slow@students.example.org", "451 4.2.0 mailbox busy", times=4)
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
        retry={"schedule": [1], "max_age": 600},
        bounces={"delay_warning": 1},
    )
    queue_id = await asend(relay.port, VERP, ["slow@students.example.org"], RAW)
    await await_rows(relay.settings.spool, [queue_id], {"sent"}, within=15)
    [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    await await_rows(relay.settings.spool, [dsn_id], {"sent"})
    by_from = {m.mail_from: m for m in capture.messages}
    assert {"<>", VERP} == set(by_from)
    warning = parse(by_from["<>"].content)
    _, blocks, _ = report_parts(warning)
    assert (
        "Delayed Mail (still being retried)",
        "rfc822; slow@students.example.org",
        "delayed",
        "4.2.0",
        True,
    ) == (
        warning["Subject"],
        blocks[1]["Final-Recipient"],
        blocks[1]["Action"],
        blocks[1]["Status"],
        bool(blocks[1]["Will-Retry-Until"]),
    )
    events = [e for e, _ in rows(relay.settings.spool)[queue_id]["events"]]
    counts = (events.count("dsn_delayed"), events.count("dsn"), events.count("deferred"))
    assert (1, 0, 4) == counts  # four 451s, one warning


def dsn_blocks(captured: Captured) -> list[tuple[str, str, str]]:
    """(Final-Recipient, Status, Diagnostic-Code) of each recipient a DSN reports on."""
    _, blocks, _ = report_parts(parse(captured.content))
    return [(b["Final-Recipient"], b["Status"], b["Diagnostic-Code"]) for b in blocks[1:]]


async def test_recipients_refused_with_different_replies_each_get_their_own_status(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """The host refuses both recipients for good, one as unknown and one as over quota: the
    DSN reports each with its own Status and reply (RFC 3464 2.3.4, 2.3.6), as Postfix does.
    Both got the first one's: the sender read "no such user" for a full mailbox."""
    capture.refuse_rcpt("a@x.example", "550 5.1.1 <a@x.example>: no such user")
    capture.refuse_rcpt("b@y.example", "552 5.2.2 <b@y.example>: mailbox over quota")
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
    )
    queue_id = await asend(relay.port, VERP, ["a@x.example", "b@y.example"], RAW)
    await await_rows(relay.settings.spool, [queue_id], {"failed"})
    [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    await await_rows(relay.settings.spool, [dsn_id], {"sent"})
    [notice] = capture.messages
    assert [
        ("rfc822; a@x.example", "5.1.1", "smtp; 550 5.1.1 <a@x.example>: no such user"),
        ("rfc822; b@y.example", "5.2.2", "smtp; 552 5.2.2 <b@y.example>: mailbox over quota"),
    ] == dsn_blocks(notice)


async def expired(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
    replies: dict[str, str],
) -> Captured:
    """The DSN the sender gets for a mail whose recipients the host keeps refusing with
    `replies` (4xx) until `retry.max_age` (1 s) runs out."""
    for rcpt, reply in replies.items():
        capture.refuse_rcpt(rcpt, reply)
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": capture.port, "timeout": 5},
        ses={"enabled": False},
        retry={"schedule": [1], "max_age": 1},
    )
    queue_id = await asend(relay.port, VERP, list(replies), RAW)
    await await_rows(relay.settings.spool, [queue_id], {"failed"}, within=10)
    [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    await await_rows(relay.settings.spool, [dsn_id], {"sent"})
    [notice] = [m for m in capture.messages if m.mail_from == "<>"]
    return notice


async def test_mail_that_expires_reports_each_recipients_last_reply(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """`retry.max_age` runs out while the host defers one recipient as full and greylists
    the other: each is reported with its own last status and the host's reply as the host
    said it (`smtp;`, Remote-MTA), and "gave up" is in the text for people. Both were
    reported with the first one's 4.2.2, under `X-Relay;`."""
    notice = await expired(
        start_relay,
        capture,
        {
            "a@x.example": "451 4.2.2 <a@x.example>: mailbox full",
            "b@y.example": "450 4.7.1 <b@y.example>: greylisted, try later",
        },
    )
    assert [
        ("rfc822; a@x.example", "4.2.2", "smtp; 451 4.2.2 <a@x.example>: mailbox full"),
        ("rfc822; b@y.example", "4.7.1", "smtp; 450 4.7.1 <b@y.example>: greylisted, try later"),
    ] == dsn_blocks(notice)
    human, blocks, _ = report_parts(parse(notice.content))
    assert "<a@x.example>: gave up after" in human
    assert ["dns; 127.0.0.1"] * 2 == [b["Remote-MTA"] for b in blocks[1:]]


@pytest.mark.system
async def test_a_delay_warning_for_a_host_that_does_not_answer_says_4_4_1(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """The original host refuses connections: the "still being retried" DSN says 4.4.1 (no
    answer from host: Postfix's status for a refused connect), not 4.4.7 (delivery time
    expired), which contradicted its own `Action: delayed`."""
    port = capture.port
    capture.stop()
    relay = await start_relay(
        deliver=True,
        upstream={"host": "127.0.0.1", "port": port, "timeout": 5},
        ses={"enabled": False},
        retry={"schedule": [1], "max_age": 600},
        bounces={"delay_warning": 1},
    )
    queue_id = await asend(relay.port, VERP, ["a@x.example"], RAW)
    deadline = time.monotonic() + 15
    while not [r for r in rows(relay.settings.spool).values() if r["reports_on"] == queue_id]:
        assert time.monotonic() < deadline, rows(relay.settings.spool)[queue_id]
        await asyncio.sleep(0.2)
    capture.start()
    [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
    await await_rows(relay.settings.spool, [dsn_id], {"sent"}, within=20)
    [warning] = [m for m in capture.messages if m.mail_from == "<>"]
    [(recipient, status, diagnostic)] = dsn_blocks(warning)
    assert ("rfc822; a@x.example", "4.4.1") == (recipient, status)
    assert diagnostic.startswith("X-Relay; ")


def ses_bounce_notice(recipient: dict[str, str], event_type: str = "Bounce") -> EmailMessage:
    """The DSN `dsn.for_ses_event` writes for one SES Bounce (or Reject) of a@x.org."""
    from relay.deliver import dsn
    from relay.deliver.ses.events import parse as parse_event

    inner = {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "feedbackId": "f1",
        "bouncedRecipients": [{"emailAddress": "a@x.org", **recipient}],
    }
    event: dict[str, object] = {
        "eventType": event_type,
        "mail": {"messageId": "ses-1", "destination": ["a@x.org"]},
        "bounce": inner,
        "reject": {"reason": "Bad content"},
    }
    notice_for = dsn.for_ses_event(parse_event(json.dumps(event)), ses_settings())
    assert notice_for is not None
    mail = Mail(id="Q1", sender=VERP, recipients=("a@x.org",), raw=RAW)
    notice = notice_for(mail, frozenset(), frozenset())
    assert notice is not None
    return parse(notice.raw)


def test_an_ses_bounce_without_a_status_takes_the_one_in_its_diagnostic() -> None:
    """SES left `status` out but its diagnostic says 5.2.2: the DSN says 5.2.2, not 5.0.0."""
    message = ses_bounce_notice({"diagnosticCode": "smtp; 552 5.2.2 mailbox full"})
    _, blocks, _ = report_parts(message)
    assert ("5.2.2", "smtp; 552 5.2.2 mailbox full") == (
        blocks[1]["Status"],
        blocks[1]["Diagnostic-Code"],
    )


def test_an_ses_reject_is_reported_in_relays_words_not_as_a_host_reply() -> None:
    """A Reject is SES's verdict, not a reply a host gave: `X-Relay;` (RFC 3464 2.3.6: `smtp;`
    is for what a remote MTA said), Status 5.7.1."""
    _, blocks, _ = report_parts(ses_bounce_notice({}, event_type="Reject"))
    assert ("5.7.1", "X-Relay; SES rejected the message (Bad content)") == (
        blocks[1]["Status"],
        blocks[1]["Diagnostic-Code"],
    )


def test_8_bit_headers_come_back_as_global_headers_under_a_short_boundary() -> None:
    """The reported mail's headers in UTF-8 go in a message/global-headers part (RFC 6533
    6.3: text/rfc822-headers is ASCII), and the boundary stays within RFC 2046's 70
    characters with an EC2 host name (it was 73)."""
    raw = RAW.replace(b"We miss you", "Wir vermissen dich – Übung".encode())
    mail = Mail(id="0123456789AB", sender=VERP, recipients=("a@x.org",), raw=raw)
    failure = report.Failure(recipient="a@x.org", reply="550 5.1.1 no such user")
    hostname = "ip-172-31-45-123.eu-west-1.compute.internal"
    built = report.notice(mail, [failure], hostname=hostname, from_address="b@relay.test")
    message = parse(built.raw)
    headers = message.get_payload()[2]
    assert "message/global-headers" == headers.get_content_type()
    assert len(message.get_boundary() or "") <= 70
    assert [p.get_content_type() for p in message.iter_parts()][:2] == [
        "text/plain",
        "message/delivery-status",
    ]


async def test_one_temporary_reply_to_every_recipient_is_reported_as_the_hosts(
    start_relay: Callable[..., Awaitable[Running]],
    capture: CaptureServer,
) -> None:
    """The host greylists both recipients with the same words until `retry.max_age`: the
    reply is the host's, so each recipient's block names it (Remote-MTA) with its status,
    as when the replies differ. With the same words it had no Remote-MTA."""
    greylisted = "450 4.7.1 Greylisted, please try again later"
    notice = await expired(
        start_relay, capture, {"a@x.example": greylisted, "b@y.example": greylisted}
    )
    _, blocks, _ = report_parts(parse(notice.content))
    assert [("4.7.1", "dns; 127.0.0.1", f"smtp; {greylisted}")] * 2 == [
        (b["Status"], b["Remote-MTA"], b["Diagnostic-Code"]) for b in blocks[1:]
    ]


async def test_a_mail_over_the_hosts_size_is_reported_in_relays_words(
    start_relay: Callable[..., Awaitable[Running]],
) -> None:
    """The original host offers SIZE 4000 and the mail is 12 KB: relay refuses it before MAIL
    (RFC 1870), so the DSN says 5.3.4 in relay's words (X-Relay;), as Postfix says it in its
    own (X-Postfix;). It read `smtp; 552 5.3.4 ...`: a reply the host never gave."""
    with CaptureServer(size=4000) as host:
        relay = await start_relay(
            deliver=True,
            upstream={"host": "127.0.0.1", "port": host.port, "timeout": 5},
            ses={"enabled": False},
        )
        raw = RAW.replace(b"Come back.\r\n", b"Come back.\r\n" * 1200)
        queue_id = await asend(relay.port, VERP, ["a@x.example"], raw)
        await await_rows(relay.settings.spool, [queue_id], {"failed"})
        [dsn_id] = [q for q, r in rows(relay.settings.spool).items() if r["reports_on"] == queue_id]
        await await_rows(relay.settings.spool, [dsn_id], {"sent"})
    [notice] = host.messages
    [(recipient, status, diagnostic)] = dsn_blocks(notice)
    assert ("rfc822; a@x.example", "5.3.4") == (recipient, status)
    assert diagnostic.startswith("X-Relay; 5.3.4 message size "), diagnostic
    assert diagnostic.endswith(f" exceeds size limit 4000 of upstream 127.0.0.1:{host.port}")
