"""A DATA body read a chunk at a time, judged exactly as aiosmtpd 1.4.6 judges it
line by line (tests/test_session_fast.py holds the two side by side).

    Session.smtp_DATA --chunks--> Body --verdict / content--> receive.Handler

aiosmtpd reads DATA with one `readuntil(b"\\r\\n")` and one debug log per
line: half the CPU of a 20 KB mail. `Body` finds the end-of-data line, the
refusals (line too long, too much data) and the unstuffed content from whole
chunks instead.
"""

from __future__ import annotations

import asyncio

TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's replies; `push`
TOO_MUCH = "552 Error: Too much mail data"  # rewrites them to ours


class Body:
    """One DATA body fed in chunks, judged as aiosmtpd 1.4.6 judges it line by line.

    Lines end at CRLF only; the body ends at the first line that is exactly
    ".\\r\\n" (so bare-LF look-alikes stay inside). aiosmtpd refuses the body
    (`verdict`) at the first line that is too long or takes the byte count
    (raw, with CRLF and stuffing dots) past `size_limit`; a line whose text
    exceeds `line_limit` (the StreamReader limit: LimitOverrunError) is refused
    before it is counted, a shorter one only after. Once refused, only the
    last 4 bytes are kept, to find the end; before, at most `size_limit` plus
    one line plus one chunk.
    """

    def __init__(self, *, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit or 0  # aiosmtpd: None or 0 is no limit
        self.line_limit = line_limit
        self.verdict: str | None = None
        self._raw = bytearray()  # from the 354 on (until refused: then the last 4 bytes)
        self._judged = 0  # _raw[:_judged] are whole lines within both limits

    def feed(self, chunk: bytes) -> bytes | None:
        """Take the next chunk; once the end-of-data line is in, the bytes after it."""
        raw = self._raw
        start = max(len(raw) - 4, 0)  # an end marker can straddle the last chunk
        raw += chunk
        if self.verdict is None and raw.startswith(b".\r\n"):
            end = 0
        else:
            end = raw.find(b"\r\n.\r\n", start)
            end += 2 if end >= 0 else 0
        if end < 0:
            if self.verdict is None:
                last = raw.rfind(b"\r\n", self._judged)
                self._judge(last + 2 if last >= 0 else self._judged)
                if self.verdict is None and len(raw) - self._judged >= self.line_limit + 2:
                    self.verdict = TOO_LONG  # an unfinished line already past the reader's limit
            if self.verdict is not None:
                del raw[:-4]
            return None
        rest = bytes(raw[end + 3 :])
        if self.verdict is None:
            self._judge(end)
        del raw[end:]
        return rest

    def content(self) -> bytes:
        """The body without its end line, the first dot of each line removed (RFC 5321 4.5.2)."""
        text = bytes(self._raw.replace(b"\r\n.", b"\r\n"))
        return text[1:] if text.startswith(b".") else text

    def _judge(self, stop: int) -> None:
        """Judge the whole lines _raw[_judged:stop]."""
        lines = self._raw[self._judged : stop].split(b"\r\n")[:-1]
        longest = max(map(len, lines), default=0) + 2
        if longest <= self.line_limit and not (self.size_limit and stop > self.size_limit):
            self._judged = stop
            return
        count = self._judged  # the raw byte count aiosmtpd keeps
        for line in lines:  # which limit a line meets first decides the reply
            count += len(line) + 2
            if len(line) > self.line_limit:
                self.verdict = TOO_LONG
            elif self.size_limit and count > self.size_limit:
                self.verdict = TOO_MUCH
            elif len(line) + 2 > self.line_limit:
                self.verdict = TOO_LONG
            if self.verdict is not None:
                return


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put `data` back in front of what `reader` holds, for aiosmtpd's command loop.

    StreamReader has no unread(); its buffer is a private bytearray (aiosmtpd
    itself clears it at STARTTLS). The only place relay touches it.
    """
    if data:
        reader._buffer[:0] = data  # type: ignore[attr-defined]
