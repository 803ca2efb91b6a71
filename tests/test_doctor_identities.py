"""`relay doctor` on SES identities, the sandbox, SPF and sample mail, against the fake SES.

Each row runs the doctor as a process (fake SES, fakedns, a capture server as the original
host) and compares the lines of the checks it is about, exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay import spool as spool_mod
from relay.spool import DB_NAME
from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakedns import FakeDns
from tests.support.fakeses import FakeSes
from tests.support.mails import ORIGIN
from tests.support.processes import relay_cli
from tests.support.relays import ConfigWriter

pytestmark = pytest.mark.usefixtures("aws_env")

LMS = "lms.example.edu"
SENDER = f"noreply@{LMS}"
SIGNED = "v=1; a=rsa-sha256; c=relaxed/relaxed; d=lms.example.edu; s=moodle; h={h}; bh=x; b=y"


def sample(from_: str = f'"Admin User (via LMS)" <{SENDER}>', dkim: str | None = None) -> bytes:
    """A re-engagement mail as Moodle writes it, From `from_`, with a DKIM-Signature if given."""
    signature = f"DKIM-Signature: {dkim}\r\n" if dkim else ""
    return (
        f"{signature}Date: Fri, 4 Dec 2026 10:00:00 +0000\r\nTo: Student <s@students.example.org>"
        f"\r\nFrom: {from_}\r\nSubject: We miss you\r\nMessage-ID: <5f1a.1@{LMS}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nCome back.\r\n"
    ).encode()


@dataclass(frozen=True, kw_only=True)
class Row:
    """The fake's state, the doctor's arguments, DNS; the lines of `checks` expected."""

    fake: dict[str, Any]
    senders: tuple[str, ...] = (SENDER,)
    samples: dict[str, bytes] = field(default_factory=dict)
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    checks: tuple[str, ...]
    expected: list[str]
    lookups: int | None = None  # GetIdentityVerificationAttributes calls


IN_PRODUCTION = [  # the fake's account lines, out of the sandbox
    f"ok    ses       credentials valid ({REGION}); max send rate 14/s; sent 0 of unlimited in"
    " the last 24 h",
    "ok    ses       sending enabled",
    f"ok    ses       production access ({REGION}): not in the sandbox",
]
LOOKUPS_ALLOWED = "ok    ses       suppression list lookups allowed (ses.suppressed: upstream)"

ROWS = {
    "verified-parent-domain-accepted": Row(
        fake={"verified": {"example.edu"}},
        checks=("identity",),
        expected=[
            f"ok    identity  {LMS} (Source): covered by verified example.edu (1 address seen)"
        ],
    ),
    "verp-senders-checked-once-per-domain": Row(
        fake={"verified": {LMS}},
        senders=tuple(f"bounce+{n:04x}@{LMS}" for n in range(40)),
        checks=("identity",),
        expected=[f"ok    identity  {LMS} (Source): verified (40 addresses seen)"],
        lookups=1,
    ),
    "unverified-from-identity-fails": Row(
        fake={"verified": {LMS}},
        samples={"reminder.eml": sample(from_="Ada Teacher <ada@staff.example.edu>")},
        checks=("identity",),
        expected=[
            f"ok    identity  {LMS} (Source): verified (1 address seen)",
            "FAIL  identity  staff.example.edu (From of reminder.eml): not verified in SES:"
            f" verify domain staff.example.edu in {REGION}",
        ],
    ),
    "unverified-source-says-what-to-do": Row(
        fake={"verified": {"other.example.org"}},
        checks=("identity",),
        expected=[
            f"FAIL  identity  {LMS} (Source): not verified in SES: verify domain {LMS} in"
            f" {REGION}, or set ses.source to an address of a verified domain"
        ],
    ),
    "only-an-address-verified-warns": Row(
        fake={"verified": {SENDER}},
        checks=("identity",),
        expected=[
            f"warn  identity  {LMS} (Source): only the addresses {SENDER} are verified, not the"
            f" domain: any other address (VERP) is refused; verify domain {LMS} in {REGION}"
        ],
    ),
    "sandbox-reported": Row(
        fake={"verified": {LMS}, "production_access": False, "daily_quota": 200},
        checks=("ses",),
        expected=[
            f"ok    ses       credentials valid ({REGION}); max send rate 14/s; sent 0 of 200 in"
            " the last 24 h",
            "ok    ses       sending enabled",
            f"FAIL  ses       in the SES sandbox in {REGION} (at most 200 a day, only to verified"
            " addresses): students' mail is refused and goes upstream; request production"
            " access",
            LOOKUPS_ALLOWED,
        ],
    ),
    "production-access-ok": Row(
        fake={"verified": {LMS}},
        checks=("ses",),
        expected=[*IN_PRODUCTION, LOOKUPS_ALLOWED],
    ),
    "suppression-lookups-refused-fails": Row(
        fake={"verified": {LMS}, "suppression_denied": True},
        checks=("ses",),
        expected=[
            *IN_PRODUCTION,
            "FAIL  ses       suppression list lookups refused (ses.suppressed: upstream;"
            " GetSuppressedDestination: AccessDeniedException): grant"
            " ses:GetSuppressedDestination, or set ses.suppressed: send; until then SES drops"
            " listed recipients",
        ],
    ),
    "no-spf-needed-without-custom-mail-from": Row(
        fake={"verified": {LMS}},
        checks=("spf",),
        expected=[
            f"ok    spf       {LMS}: SES's own MAIL FROM (amazonses.com); no SPF record needed"
        ],
    ),
    "custom-mail-from-spf-checked": Row(
        fake={"verified": {LMS}, "mail_from": {LMS: f"bounce.{LMS}"}},
        records={(f"bounce.{LMS}", "TXT"): ['"v=spf1 include:amazonses.com ~all"']},
        checks=("spf",),
        expected=[f"ok    spf       bounce.{LMS}: v=spf1 include:amazonses.com ~all"],
    ),
    "custom-mail-from-without-spf-fails": Row(
        fake={"verified": {LMS}, "mail_from": {LMS: f"bounce.{LMS}"}},
        checks=("spf",),
        expected=[f"FAIL  spf       bounce.{LMS} TXT: does not exist (NXDOMAIN)"],
    ),
    "dkim-signature-over-rewritten-headers-warned": Row(
        fake={"verified": {LMS}},
        samples={
            "signed.eml": sample(dkim=SIGNED.format(h="From:To:Subject:Date:Message-ID")),
            "fine.eml": sample(dkim=SIGNED.format(h="From:To:Subject:MIME-Version")),
            "plain.eml": sample(),
        },
        checks=("sample",),
        expected=[
            f"warn  sample    signed.eml: DKIM-Signature d={LMS} signs message-id, date, which SES"
            " rewrites: the signature breaks; sign without them, or leave signing to SES (Easy"
            " DKIM)",
            f"ok    sample    fine.eml: DKIM-Signature d={LMS} survives SES",
            "ok    sample    plain.eml: no DKIM-Signature (SES signs with Easy DKIM)",
        ],
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_doctor_ses_lines(write_config: ConfigWriter, tmp_path: Path, row: Row) -> None:
    """Each sender and From domain is checked once and a verified parent domain covers it,
    as SES does; what is not verified fails with what to do; the sandbox is reported; SPF is
    checked only for a custom MAIL FROM domain; a sample's DKIM-Signature over headers SES
    rewrites is warned about."""
    args: list[str] = []
    for sender in row.senders:
        args += ["--sender", sender]
    for name, raw in row.samples.items():
        (tmp_path / name).write_bytes(raw)
        args += ["--sample", str(tmp_path / name)]
    with FakeSes(**row.fake) as fake, FakeDns(row.records) as dns, CaptureServer() as host:
        config = write_config(
            upstream={"host": "127.0.0.1", "port": host.port},
            ses={"region": REGION, "endpoint_url": fake.url},
        )
        done = relay_cli("doctor", "--config", str(config), "--nameserver", dns.address, *args)
        lookups = fake.verification_lookups
    lines = done.stdout.splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    actual = [line for line in lines if line[6:16].strip() in row.checks]
    print("\n".join(lines))
    assert row.expected == actual, "\n".join(lines)
    assert (row.lookups or lookups) == lookups
    assert int(any(line.startswith("FAIL") for line in lines)) == done.returncode


def test_doctor_takes_samples_from_the_spool(write_config: ConfigWriter, tmp_path: Path) -> None:
    """Without --sample, the From identity of SES-bound mail still in the spool (queued,
    deferred or dead letters keep their bytes) is checked; mail the rules send upstream is
    not."""
    reminder = sample(from_="Ada Teacher <ada@staff.example.edu>").replace(
        b"MIME-Version", f"X-Moodle-Originating-Script: {ORIGIN}\r\nMIME-Version".encode(), 1
    )
    forum = sample(from_="Forum <forum@forum.example.edu>")

    async def seed() -> list[str]:
        spool = await spool_mod.Spool.open(tmp_path / "spool")
        try:
            return [
                await spool.add(
                    sender=SENDER,
                    recipients=["s@students.example.org"],
                    raw=raw,
                    peer="127.0.0.1",
                    trace=b"",
                    message_id="<m@x>",
                )
                for raw in (reminder, forum, reminder)
            ]
        finally:
            await spool.close()

    queued = asyncio.run(seed())
    # The newest, edited by hand into no JSON list, is passed over (doctor stopped on it).
    with contextlib.closing(sqlite3.connect(tmp_path / "spool" / DB_NAME)) as conn, conn:
        conn.execute("UPDATE messages SET recipients = 'x' WHERE id = ?", (queued[2],))
    with FakeSes(verified={LMS}) as fake, FakeDns() as dns, CaptureServer() as host:
        config = write_config(
            upstream={"host": "127.0.0.1", "port": host.port},
            ses={"region": REGION, "endpoint_url": fake.url},
        )
        done = relay_cli("doctor", "--config", str(config), "--nameserver", dns.address)
    identity = [line for line in done.stdout.splitlines() if line[6:16].strip() == "identity"]
    assert [
        f"ok    identity  {LMS} (Source): verified (1 address seen)",
        f"FAIL  identity  staff.example.edu (From of spool mail {queued[0]}): not verified in"
        f" SES: verify domain staff.example.edu in {REGION}",
    ] == identity
