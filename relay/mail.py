"""The message value that travels the data path: queue id, envelope, raw bytes.

`raw` is exactly what the client sent after DATA (dot-unstuffed, CRLF line
ends); relay never rewrites it. `message` is a parsed view, built lazily and
only when a rule or a log line needs a header or the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def bare_line_ends(raw: bytes) -> bool:
    """True if `raw` has a CR or LF that is not part of a CRLF (C-speed counts, no copy)."""
    crlf = raw.count(b"\r\n")
    return raw.count(b"\n") != crlf or raw.count(b"\r") != crlf


def header_block(raw: bytes) -> bytes:
    """The header lines of `raw`, up to (not including) the first empty line."""
    crlf = raw.find(b"\r\n\r\n")
    # A bare "\n\n" counts only before it: not a scan of the whole body for one.
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf)
    ends = [i for i in (crlf, lf) if i >= 0]
    return raw[: min(ends) + 2] if ends else raw


def first_header(raw: bytes, name: str, limit: int) -> str:
    """The first `name:` field of `raw`'s header block, unfolded and cut to `limit`
    characters, without the email parser: its address parser took 29 s on a From of 500 KB
    of addresses, and parsing a mail of 100,000 MIME parts as long, on the delivery loop."""
    field = rb"^%s[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)" % re.escape(name.encode())
    found = re.search(field, header_block(raw), re.IGNORECASE | re.MULTILINE)
    if found is None:
        return ""
    value = _FOLD.sub(b"", found.group(1)[: limit * 4])
    return value.decode("utf-8", "replace").strip()[:limit]


@dataclass(frozen=True, kw_only=True)
class Mail:
    """One accepted message. `sender` is "" for the null sender `<>`."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    received_at: float = 0.0
    attempts: int = 0
    peer: str = ""
    message_id: str = ""  # as stored at receive time, for log lines (no parse needed)
    trace: bytes = b""  # the Received: line written at receive time, CRLF-terminated
    reports_on: str = ""  # a DSN relay wrote: the queue id of the mail it reports on
    retried_at: float | None = None  # the last `relay queue retry` of it as a dead letter
    fallback_reason: str = ""  # why its last try went upstream instead of SES, if it did

    @property
    def since(self) -> float:
        """Where retry.max_age and ses.fallback_after count from: its arrival, or the
        last time an admin queued it again as a dead letter."""
        return max(self.received_at, self.retried_at or 0.0)

    def wire_bytes(self) -> bytes:
        """What goes out: our one Received: line on top of the bytes as received."""
        return self.trace + self.raw
