"""`relay demo` shows what happens after the 250 too: an SES Delivery event and a Permanent
Bounce come back through the SQS feedback queue (moto), are recorded, and the bounce's DSN
reaches the original host; no AWS account, nothing configured."""

from __future__ import annotations

import re

import pytest

from tests.support.processes import relay_cli


@pytest.mark.system
def test_demo_shows_a_delivery_event_and_a_bounce_with_its_dsn() -> None:
    """Must-show 5. The demo's "SES events" section: the student copy's Delivery recorded,
    the CC copy's Permanent bounce recorded (the mail now `bounced`), and a DSN from <> to
    the envelope sender delivered to the original host; exit 0."""
    done = relay_cli("demo", timeout=60)
    assert 0 == done.returncode, done.stdout + done.stderr
    section = done.stdout[done.stdout.index("SES events") :]
    found = [
        bool(re.search(pattern, section))
        for pattern in (
            r"\w{12}  Delivery  ada@student\.example\.net: recorded",
            r"\w{12}  Bounce    tutor@school\.example\.net: Permanent, 5\.1\.1 .*: recorded,"
            r" mail bounced",
            r"\w{12}  DSN       from <> to noreply@moodle\.example\.org: delivered to the original",
        )
    ]
    assert [True, True, True] == found, section
