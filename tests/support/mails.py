"""Mails to send through the relay or to classify, built in code.

- `mail(raw)`, `message(*headers)`: a `Mail` and a simple message for the rules tests;
- `make_mail(**changes)`: a re-engagement-like `Mail` from the SES-verified domain;
- `MailFactory`: distinct Moodle mails from the corpus (re-engagement -> SES, look-alikes
  -> upstream), each with a fresh Message-ID, so every delivery can be matched to its mail.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass
from typing import Any

from relay.mail import Mail
from tests.support.aws import VERIFIED_DOMAIN
from tests.support.corpus import expectations

NOREPLY = "noreply@moodle.example.org"
ORIGIN = "https://moodle.example.org => web01:mod/reengagement/lib.php:564"
_MESSAGE_ID = re.compile(rb"(?im)^Message-ID:[^\r\n]*\r\n")


def mail(
    raw: bytes | str,
    *,
    sender: str = NOREPLY,
    recipients: tuple[str, ...] = ("anna@example.org",),
) -> Mail:
    """A Mail of `raw` (a str is written with CRLF line ends, UTF-8)."""
    if isinstance(raw, str):
        raw = raw.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
    return Mail(id="test", sender=sender, recipients=recipients, raw=raw)


def message(*headers: str, body: str = "Hello.\n", ctype: str = "text/plain; charset=UTF-8") -> str:
    """A simple single-part message: the given header lines, then MIME headers and `body`."""
    lines = [*headers, "MIME-Version: 1.0", f"Content-Type: {ctype}", "", body]
    return "\n".join(lines)


RAW = (
    b"Date: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
    b'To: "Ada Student" <ada@example.net>\r\n'
    b'From: "Support (via Example Moodle)" <noreply@moodle.example.org>\r\n'
    b"Subject: We miss you in COURSE101\r\n"
    b"Message-ID: <5f1a2b3c4d5e63.12345678@moodle.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Ada,\r\n"
    b".a line that starts with a dot\r\n"
    b"Come back to the course.\r\n"
)
TRACE = (
    b"Received: from moodle (localhost [127.0.0.1]) by relay; Mon, 2 Mar 2026 10:00:00 +0000\r\n"
)


def make_mail(**changes: Any) -> Mail:
    """A re-engagement-like mail from the verified domain; keyword arguments override fields."""
    fields: dict[str, Any] = {
        "id": "Q1",
        "sender": f"noreply@{VERIFIED_DOMAIN}",
        "recipients": ("ada@example.net",),
        "raw": RAW,
        "trace": TRACE,
    }
    fields.update(changes)
    return Mail(**fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """One mail a client sends, and where it must end up."""

    message_id: str
    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    route: str  # "ses" or "upstream", from tests/corpus/expected.yaml


class MailFactory:
    """Distinct Moodle mails, cycling over the re-engagement and look-alike corpus."""

    def __init__(self, tag: str, *, pad: int = 0) -> None:
        """`pad`: bytes of filler lines appended to each body (bigger mails fill a disk)."""
        chosen = [e for e in expectations() if not e.name.startswith("marker/")]
        self._corpus = [(e, e.path.read_bytes()) for e in chosen]
        self._tag = tag
        line = b"x" * 76 + b"\r\n"
        self._pad = line * (pad // len(line))
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def __call__(self) -> Outgoing:
        with self._lock:
            n = next(self._counter)
        expected, raw = self._corpus[n % len(self._corpus)]
        message_id = f"<{self._tag}.{n:06d}@moodle.example.org>"
        header = f"Message-ID: {message_id}\r\n".encode()
        fresh, count = _MESSAGE_ID.subn(lambda _: header, raw, count=1)
        assert 1 == count, f"{expected.name} has no Message-ID header"
        fresh += self._pad
        return Outgoing(
            message_id=message_id,
            sender=expected.sender,
            recipients=expected.recipients,
            raw=fresh,
            route=expected.route,
        )
