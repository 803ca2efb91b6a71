"""SMTP clients that send into the relay, as Moodle does, and read the queue id of its 250.

- `send` (smtplib, blocking) and `asend` (aiosmtplib, for a test whose event loop runs
  the relay): one transaction that must succeed; they return the queue id.
- `try_send`: one transaction that may fail; returns the `Reply` that ended it.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from tests.support.mails import Outgoing

_QUEUED_AS = re.compile(r"queued as (\w+)")


def queue_id_of(reply: str) -> str:
    """The queue id from relay's "250 2.0.0 Ok: queued as ID"."""
    found = _QUEUED_AS.search(reply)
    assert found, f"not a queued reply: {reply!r}"
    return found.group(1)


def send(port: int, sender: str, recipients: Sequence[str], raw: bytes) -> str:
    """One SMTP transaction with smtplib (blocking); returns the queue id of the 250."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="moodle.test", timeout=10) as client:
        client.ehlo()
        code, reply = client.mail(sender)
        assert 250 == code, reply
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert 250 == code, reply
        code, reply = client.data(raw)
    assert 250 == code, reply
    return queue_id_of(reply.decode())


async def asend(port: int, sender: str, recipients: Sequence[str], raw: bytes) -> str:
    """One SMTP transaction with aiosmtplib (for tests whose loop runs the relay)."""
    _, reply = await aiosmtplib.send(
        raw,
        sender=sender,
        recipients=list(recipients),
        hostname="127.0.0.1",
        port=port,
        local_hostname="moodle.test",
        timeout=10,
    )
    return queue_id_of(reply)


@dataclass(frozen=True, slots=True)
class Reply:
    """How one transaction ended: `code` 0 when the connection failed or broke."""

    code: int
    text: str

    @property
    def queue_id(self) -> str | None:
        return queue_id_of(self.text) if self.code == 250 else None


def try_send(port: int, mail: Outgoing, *, timeout: float = 10.0) -> Reply:
    """One SMTP transaction; the reply to DATA, or the refusal that ended it earlier."""
    client = smtplib.SMTP(local_hostname="moodle.test", timeout=timeout)
    try:
        client.connect("127.0.0.1", port)
        client.ehlo()
        code, text = client.mail(mail.sender)
        for rcpt in mail.recipients:
            if code == 250:
                code, text = client.rcpt(rcpt)
        if code == 250:
            code, text = client.data(mail.raw)
    except (OSError, smtplib.SMTPException) as exc:
        return Reply(0, repr(exc))
    finally:
        # The mail is queued (or not) by now; a lost QUIT reply changes nothing.
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.quit()
        client.close()
    return Reply(code, f"{code} {text.decode(errors='replace')}")
