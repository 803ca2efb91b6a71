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
import gc
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

AGAIN = 0.01  # seconds: the alarm once more, when it came at a moment it cannot raise


class TooSlow(BaseException):
    """A rule's test ran past its time limit. Not an Exception: code that reads a mail
    leniently (`except Exception`, the view's and the email package's own) must not swallow
    it, or the rule goes on past its limit, or sees a mail cut short (no headers: the
    re-engagement rules did not hold and the mail went upstream, without a word)."""


class Timebox:
    """`with timebox.limit(seconds):` raises TooSlow in the block past `seconds`. Built
    for a whole classification (one SIGALRM handler), limiting each rule on its own."""

    def __init__(self) -> None:
        self._armed = False

    def _expire(self, signum: int, frame: FrameType | None) -> None:
        if not self._armed:  # a late alarm, after the limited block ended
            return
        if _in_finalizer(frame):  # Python would print and drop TooSlow there: again soon
            signal.setitimer(signal.ITIMER_REAL, AGAIN)
            return
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


def _in_finalizer(frame: FrameType | None) -> bool:
    """Is `frame` (or a caller) a gc callback or a __del__? An exception raised there is
    printed and dropped ("Exception ignored in ..."), and the rule's test would go on."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


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
