"""A DATA body read a chunk at a time, judged exactly as aiosmtpd 1.4.6 judges it
line by line (tests/test_session_fast.py holds the two side by side).

    Session.smtp_DATA --chunks--> Body --verdict / content--> receive.Handler

aiosmtpd reads DATA with one `readuntil(b"\\r\\n")` and one debug log per
line: half the CPU of a 20 KB mail. `Body` finds the end-of-data line, the
refusals (line too long, too much data) and the unstuffed content from whole
chunks instead.

Unfinished bodies of all sessions share one memory `Budget`
(`limits.max_data_in_memory`). Past it, a body moves what it has judged to an
unnamed temporary file in the spool directory and keeps only its last line in
memory. relay spills rather than answering 452 4.3.1: Moodle never retries a
4xx, so a 452 caused by someone else's hoarding would lose Moodle's mail, while
a spill costs disk the spool directory has anyway and a few writes, and only
past the budget. The mail is still whole in memory for a moment when its end
arrives (to be spooled), and a 250 is still given only after the spool commit. A
spilled body read back for that waits until the bodies read back and not yet
spooled leave room for it under the same limit (`Budget.load`): hoarders that all
end their data at once must not bring gigabytes back into memory together.

Spills share the disk with the spool, and a full spool loses Moodle's mail (its
adds fail with 451, and Moodle does not retry). So a spill that would leave the
spool's file system under `limits.spill_min_free` bytes, or that fails to write
(ENOSPC), refuses its body instead: 452 4.3.1 at the end of its data, as Postfix
answers when its queue file system is short of room. Hoarders meet the reserve;
Moodle's mails, small and past the budget only while hoarders hold it, are
spooled into it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import tempfile
from pathlib import Path

from relay import logs, metrics
from relay.receive.budget import Budget

TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's replies; `push`
TOO_MUCH = "552 Error: Too much mail data"  # rewrites them to ours
NO_ROOM = "452 4.3.1 Insufficient system storage"  # Postfix's words

# A client can cause these at will: one line per 10 s, with the count.
_NO_ROOM_LOG = logs.Sampled(logging.getLogger("relay.receive"), "data_no_room")


SPILL_BATCH = 256 * 1024  # once spilling, a body writes out at least this much at a time
COMMIT_COPIES = 2  # the WAL's copy of a spilled body and the database file's, as it is accepted


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

    def __init__(
        self,
        *,
        size_limit: int | None,
        line_limit: int,
        budget: Budget | None = None,
        spill_dir: Path | None = None,
        min_free: int = 0,
    ) -> None:
        """`min_free`: bytes a spill must leave free on `spill_dir`'s file system."""
        self.size_limit = size_limit or 0  # aiosmtpd: None or 0 is no limit
        self.line_limit = line_limit
        self.verdict: str | None = None
        self._raw = bytearray()  # from the 354 on (until refused: then the last 4 bytes)
        self._judged = 0  # _raw[:_judged] are whole lines within both limits
        self.budget = budget
        self.spill_dir = spill_dir
        self.min_free = min_free
        self._held = 0  # bytes counted in `budget`
        self._file: io.BufferedRandom | None = None  # the spilled start of the body
        self._spilled = 0  # bytes in _file: _raw[0] is byte _spilled of the body

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
                self._drop_file()
            if self.budget is not None:
                self._account()
            return None
        rest = bytes(raw[end + 3 :])
        if self.verdict is None:
            self._judge(end)
        del raw[end:]
        return rest

    def content(self) -> bytes:
        """The body without its end line, the first dot of each line removed (RFC 5321 4.5.2).

        Reads the spilled start back from its file when there is one (`spilled`: then
        call it on a thread), straight into one buffer: a spilled body costs its size
        twice while this runs (three times when a line starts with a dot), then once."""
        raw = self._raw
        if self._file is not None:
            raw = bytearray(self._spilled + len(self._raw))
            self._file.seek(0)
            with memoryview(raw) as view:
                self._file.readinto(view[: self._spilled])  # a regular file: all of it
                view[self._spilled :] = self._raw
        if b"\r\n." in raw:
            raw = raw.replace(b"\r\n.", b"\r\n")
        with memoryview(raw) as view:
            return bytes(view[1:] if raw.startswith(b".") else view)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    @property
    def size(self) -> int:
        """Bytes of the body so far, spilled and in memory."""
        return self._spilled + len(self._raw)

    @property
    def spill_due(self) -> bool:
        """Judged bytes should move to the file: memory is over budget, or this body has
        started spilling and has a batch ready."""
        if self.verdict is not None or self.budget is None or self._judged <= 2:
            return False
        return self.budget.over or (self._file is not None and self._judged >= SPILL_BATCH)

    async def spill(self) -> None:
        """Move the judged lines but the last CRLF (an end line starts with it) to the file,
        or refuse the body (NO_ROOM) when the disk has no room for them (see above)."""
        assert self.budget is not None  # spill_due: only a body with a budget spills
        cut = self._judged - 2
        budget, new = self.budget, self._file is None
        file: io.BufferedRandom | str = "no descriptor left for one more spill file"
        if not new or budget.max_files is None or budget.files < budget.max_files:
            if new:
                budget.files += 1  # counted before the thread opens it
            with memoryview(self._raw) as view:  # the reader waits meanwhile: _raw stays put
                writing = asyncio.ensure_future(asyncio.to_thread(self._write, view[:cut]))
                try:
                    file = await asyncio.shield(writing)
                except asyncio.CancelledError:
                    # The client went. The thread goes on writing from `view`: wait for it,
                    # then close a file it opened (its descriptor was counted, and leaked).
                    left = await writing
                    if new:
                        budget.files -= 1
                        if not isinstance(left, str):
                            left.close()
                    raise
            if new and isinstance(file, str):
                budget.files -= 1
        if isinstance(file, str):
            self.verdict = NO_ROOM
            # As any refused body, only what finds the end line; a new buffer, as below:
            # the worker thread may not have dropped its view of the old one yet.
            self._raw = bytearray(self._raw[-4:])
            self._drop_file()
            self._account()
            metrics.DATA_NO_ROOM.inc()
            _NO_ROOM_LOG(spool=self.spill_dir, min_free=self.min_free, why=file)
            return
        if self._file is None:
            self._file = file
            metrics.DATA_SPILLED.inc()
        self._raw = bytearray(self._raw[cut:])  # a new, small buffer: the big one is freed
        self._judged -= cut
        self._spilled += cut
        self.budget.spilled += cut
        self._account()

    def _write(self, data: memoryview) -> io.BufferedRandom | str:
        """On a thread: `data` appended to the spill file (made on the first call); or why
        not, with nothing kept: it would leave less than `min_free`, or the write failed.

        A spilled body costs more than its spill file: accepted, it is written again into
        the WAL, then into the database file (COMMIT_COPIES), and so is every other body
        being spilled meanwhile. Counting this spill file alone, large mails took the room
        `min_free` keeps for Moodle's small ones: the disk filled at the next checkpoint,
        and every mail after got 451."""
        directory = self.spill_dir or Path(tempfile.gettempdir())
        file = self._file
        assert self.budget is not None  # as in spill()
        commits = COMMIT_COPIES * (self.budget.spilled + len(data))
        try:
            if self.min_free and free_bytes(directory) - len(data) - commits < self.min_free:
                return "under spill_min_free"
            if file is None:
                file = _unnamed_file(directory)
            file.write(data)
        except OSError as exc:  # ENOSPC, EDQUOT, EIO: the same answer as no room
            if file is not None and file is not self._file:
                file.close()
            return str(exc)
        return file

    def close(self) -> None:
        """Give back this body's share of the budget and drop its file (done or abandoned)."""
        if self.budget is not None:
            self.budget.release(self._held)
            self._held = 0
        self._drop_file()

    def _account(self) -> None:
        assert self.budget is not None
        held = self._raw.__sizeof__()  # with what bytearray allocated ahead, not just len
        self.budget.used += held - self._held
        self._held = held

    def _drop_file(self) -> None:
        if self._file is not None:
            self._file.close()  # unnamed (O_TMPFILE): nothing is left behind, crash or not
            self._file = None
            if self.budget is not None:
                self.budget.spilled -= self._spilled
                self.budget.files -= 1

    def _judge(self, stop: int) -> None:
        """Judge the whole lines _raw[_judged:stop]."""
        size = self._spilled + stop  # bytes of the body up to `stop`
        over = bool(self.size_limit) and size > self.size_limit
        if not over and self._short(stop):
            self._judged = stop
            return
        lines = self._raw[self._judged : stop].split(b"\r\n")[:-1]
        longest = max(map(len, lines), default=0) + 2
        if longest <= self.line_limit and not over:
            self._judged = stop
            return
        count = self._spilled + self._judged  # the raw byte count aiosmtpd keeps
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

    def _short(self, stop: int) -> bool:
        """True if every line in _raw[_judged:stop] is well within `line_limit`, found
        without splitting: a CRLF starts in every stretch of `step` bytes (up to the
        last, which ends at `stop`), so no two CRLFs are 2 * step apart. False says
        nothing (`_judge` then looks line by line); lines up to half the limit always
        pass. Splitting a 20 KB body into its lines took 30 µs a mail, this takes 7."""
        step = (self.line_limit - 2) // 2
        if step < 2:
            return False
        find = self._raw.find
        starts = range(self._judged, stop - 2, step)
        return all(find(b"\r\n", at, at + step + 1) >= 0 for at in starts)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on `directory`'s file system."""
    found = os.statvfs(directory)
    return found.f_bavail * found.f_frsize


def _unnamed_file(directory: Path | None) -> io.BufferedRandom:
    """A temporary file in `directory` with no name (O_TMPFILE on Linux)."""
    return tempfile.TemporaryFile(dir=directory)


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put `data` back in front of what `reader` holds, for aiosmtpd's command loop.

    StreamReader has no unread(); its buffer is a private bytearray (aiosmtpd
    itself clears it at STARTTLS). The only place relay touches it.
    """
    if data:
        reader._buffer[:0] = data  # type: ignore[attr-defined]
