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


class SpoolBusy(SpoolError):
    """The other relay process held the write lock for too long (stopped, or stuck)."""


class Turn:
    """The write lock of one spool directory, for one writer (not thread-safe)."""

    def __init__(self, directory: Path, *, poll: float = POLL) -> None:
        self.path = directory / WRITE_LOCK
        self.poll = poll  # seconds between looks for the first 10 ms
        self._fd: int | None = None  # opened on first use

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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _file(self) -> int | None:
        if self._fd is None:
            with contextlib.suppress(OSError):
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def _wait(self, fd: int, limit: float) -> None:
        """Look every `poll` seconds for 10 ms (the other side's transactions take a
        fraction of a millisecond), then every 1 ms, up to `limit` seconds."""
        start = time.monotonic()
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
                time.sleep(self.poll if waited < 0.01 else 0.001)


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
