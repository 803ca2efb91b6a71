"""A time limit on a rule's test of one mail: Python's `re` has no match limit.

A rule whose pattern backtracks without bound (`(a+)+$`, `(\\s*\\w+)*x`) meets a mail
that sets it off: the test never ends. In the delivery process that stops the event
loop; the process is killed as hung, started again, claims the same mail and hangs
again, for good, while the mails in flight beside it are sent again at each restart.
Postfix's PCRE tables have a match limit for this. Here SIGALRM interrupts the match
(the regex engine checks for signals as it runs); the rule then does not hold.

Only in the main thread, where Python runs signal handlers; elsewhere no limit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


class TooSlow(Exception):
    """A rule's test ran past its time limit."""


class Timebox:
    """`with timebox.limit(seconds):` raises TooSlow in the block past `seconds`. Built
    for a whole classification (one SIGALRM handler), limiting each rule on its own."""

    def __init__(self) -> None:
        self._armed = False

    def _expire(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:  # not a late alarm, after the limited block ended
            self._armed = False
            raise TooSlow

    @contextlib.contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


@contextlib.contextmanager
def timebox() -> Iterator[Timebox | None]:
    """A Timebox with its SIGALRM handler set (the previous one back after); None outside
    the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    box = Timebox()
    previous: Callable[..., object] | int | None = signal.signal(signal.SIGALRM, box._expire)
    try:
        yield box
    finally:
        signal.signal(signal.SIGALRM, previous)
