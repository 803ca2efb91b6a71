"""Password guessing: how long a failed SMTP AUTH waits before its 535, per connection and
per client (`caps.client_of`: an IPv4 address, an IPv6 /84).

    Handler._check --failed--> Guesses.failed(ip, on_connection) --> delay --> 535 (or 421)

Postfix sleeps 1 s per error once a session has made 10 (smtpd_soft_error_limit,
smtpd_error_sleep_time) and disconnects at 20. relay closes a connection after
`limits.max_auth_failures` and, before each 535, waits 1 s per earlier failure on
the connection or per failure beyond FREE_FAILURES from the client in
the last WINDOW seconds, whichever is more, up to MAX_DELAY. So a guesser that
reconnects is slowed too, while a Moodle with a mistyped password (one failure
per mail, from one address) is not held up for its first ten.
"""

from __future__ import annotations

import time
from collections.abc import Callable

STEP = 1.0  # seconds of delay per counted failure
MAX_DELAY = 10.0
FREE_FAILURES = 10  # failures from one client in WINDOW before the client is slowed
WINDOW = 600.0  # seconds a failure counts against its client
MAX_ADDRESSES = 10000  # clients remembered; the oldest are forgotten first

TOO_MANY_FAILURES = "421 4.7.0 {host} Error: too many authentication failures"


class Guesses:
    """Recent AUTH failures by client (bounded), and the delay they earn."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._recent: dict[str, tuple[int, float]] = {}  # ip -> (failures, first failure)

    def failed(self, ip: str, on_connection: int) -> float:
        """Count a failure from `ip` (the `on_connection`-th on its connection); the delay."""
        now = self._clock()
        count, since = self._recent.pop(ip, (0, now))
        if now - since > WINDOW:
            count, since = 0, now
        count += 1
        self._recent[ip] = (count, since)  # re-inserted: dict order is least recent first
        if len(self._recent) > MAX_ADDRESSES:
            del self._recent[next(iter(self._recent))]
        earned = max(on_connection - 1, count - FREE_FAILURES)
        return min(MAX_DELAY, STEP * earned)

    def count(self, ip: str) -> int:
        """Failures from `ip` in the current window."""
        return self._recent.get(ip, (0, 0.0))[0]
