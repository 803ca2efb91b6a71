"""Whose turn it is to write the spool: an flock of `write.lock` in its directory.

    relay serve (adds) --Turn.held()--> BEGIN ... COMMIT <--Turn.held()-- the delivery process
                                                                   (claims, outcomes)

Two processes write the spool. SQLite's busy handler would make the one that
finds the database locked sleep 1, 2, 5, 10 ms and more before it looks
again, a stall no 250 reply can afford. So each writer takes its turn on this
lock around every transaction, looking for it every 50 µs (the delivery process
every 500 µs: see DELIVERY_POLL), and gives up
(SpoolBusy: a 451 for the client) after TURN_TIMEOUT. Not a blocking flock: a
process stopped while it holds the lock would hold up every add for good.
`relay queue retry` and `delete` take it too, in steps (relay.ops.queueadmin).

Next: looking now and then is not a queue. While relay serve receives flat out, its
adds hold the lock most of the time and take it again at once, and a look every
500 µs finds it taken: the delivery process waited a long time for each turn and
delivered a fraction of what came in (bench/README.md, "The delivery process's
write turn"). So a writer that waited
NEXT_AFTER takes `next.lock` (`Turn(claims_next=True)`: the delivery process, the
queue commands), and relay serve lets it write first: before its turn it waits for
`next.lock` to be free, at most NEXT_MAX; a holder stopped or stuck is skipped
until it lets go (the flock goes with its process).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from relay.errors import SpoolError
from relay.spool.schema import BUSY_TIMEOUT_MS

WRITE_LOCK = "write.lock"
DELIVERY_LOCK = "delivery.lock"  # held by the one delivery process (relay.deliver.process)
TURN_TIMEOUT = BUSY_TIMEOUT_MS / 1000  # seconds to wait for the turn, then SpoolBusy
POLL = 0.00005  # seconds between looks for the turn: relay serve's adds, a 250 waits
# The delivery process looks ten times less often: its writes can wait, every look is
# a wake-up and a system call on a machine that is receiving, and when both wait for
# the turn, the add tends to get it first.
DELIVERY_POLL = 0.0005
NEXT_LOCK = "next.lock"  # held by a writer that claims the next turn (see Next above)
NEXT_AFTER = 0.002  # seconds a claims_next writer waits before it claims the next turn
NEXT_MAX = 0.05  # seconds relay serve lets a claimed next turn hold up an add


class SpoolBusy(SpoolError):
    """The other relay process held the write lock for too long (stopped, or stuck)."""


class Turn:
    """The write lock of one spool directory, for one writer (not thread-safe)."""

    def __init__(self, directory: Path, *, poll: float = POLL, claims_next: bool = False) -> None:
        """`claims_next`: a writer whose turn may wait, but not for long (the delivery
        process): it claims the next turn after NEXT_AFTER. Without it, the writer lets a
        claimed next turn go first (relay serve)."""
        self.path = directory / WRITE_LOCK
        self.poll = poll  # seconds between looks for the first 10 ms
        self.claims_next = claims_next
        self._fd: int | None = None  # opened on first use
        self._next: int | None = None
        self._skipping = False  # the claimed next turn held us up NEXT_MAX: skip it till free

    @contextlib.contextmanager
    def held(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock for one transaction; SpoolBusy after `timeout` (TURN_TIMEOUT).

        Without the lock file (a read-only spool directory, say) SQLite's own
        locking and busy_timeout still keep the database consistent, only slower.
        """
        fd = self._file()
        if fd is None:
            yield
            return
        self._wait(fd, TURN_TIMEOUT if timeout is None else timeout)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._next):
            if fd is not None:
                os.close(fd)
        self._fd = self._next = None

    def _file(self) -> int | None:
        if self._fd is None:
            with contextlib.suppress(OSError):
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            with contextlib.suppress(OSError):
                self._next = os.open(self.path.with_name(NEXT_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def _wait(self, fd: int, limit: float) -> None:
        """Look every `poll` seconds for 10 ms (the other side's transactions take a
        fraction of a millisecond), then every 1 ms, up to `limit` seconds; claim the
        next turn on the way, or let a claimed one go first (see Next above)."""
        start = time.monotonic()
        if not self.claims_next:
            self._after_next(start, limit)
        claimed = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited >= limit:
                        raise SpoolBusy(
                            f"spool: the other relay process held {self.path} for {limit:g} s"
                        ) from None
                    if self.claims_next and not claimed and waited >= NEXT_AFTER:
                        claimed = self._flock(self._next, fcntl.LOCK_EX)
                    time.sleep(POLL if claimed else self.poll if waited < 0.01 else 0.001)
        finally:
            if claimed and self._next is not None:
                fcntl.flock(self._next, fcntl.LOCK_UN)

    def _after_next(self, start: float, limit: float) -> None:
        """Wait while another writer claims the next turn: up to NEXT_MAX, after which
        it is skipped until it lets go, or SpoolBusy past a shorter `limit`."""
        while not self._flock(self._next, fcntl.LOCK_SH):
            waited = time.monotonic() - start
            if self._skipping or waited >= NEXT_MAX:
                self._skipping = True
                return
            if waited >= limit:
                raise SpoolBusy(f"spool: another writer claimed the next turn for {limit:g} s")
            time.sleep(POLL)
        self._skipping = False
        if self._next is not None:
            fcntl.flock(self._next, fcntl.LOCK_UN)

    @staticmethod
    def _flock(fd: int | None, operation: int) -> bool:
        """Whether `operation` (without waiting) took the lock; True without the file."""
        if fd is None:
            return True
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def delivering(directory: Path) -> bool:
    """Whether a delivery process holds `directory`'s DELIVERY_LOCK (is running on it)."""
    with delivery_free(directory) as free:
        return free is False


@contextlib.contextmanager
def delivery_free(directory: Path) -> Iterator[bool | None]:
    """True, with DELIVERY_LOCK held shared for the block (a delivery process starting
    meanwhile waits for it), when no delivery process runs on `directory`; False when one
    does; None when the lock file is not there (none ever ran, or it was unlinked). Never
    creates the file: made by an admin's root, the service's user could not open it."""
    try:
        fd = os.open(directory / DELIVERY_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # and with it the shared lock, if we took it
