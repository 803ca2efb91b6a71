"""Pacing of the SES route: recipients per second, adaptive on throttling, and a daily budget.

SES counts recipients, not calls, against a per-second rate and a 24-hour quota.
`Pace` spaces grants evenly (no burst: a grant of n recipients holds the next one
back by n / rate, even right after an idle spell) and also never books more than
the rate into any window of WINDOW + JITTER seconds, so mixed message sizes
cannot pile up inside one of SES's 1-second windows either. It spaces grants a
few percent under its target (HEADROOM) because SES's window and our clock
never agree to the millisecond: a limiter exactly at the quota still gets
throttled.

On a rate throttle the target drops multiplicatively, once per window, and
never above what SES accepted in the last second. Successes bring it back
quickly toward the rate before the cut (a stray throttle from clock jitter costs
little), then additively past it toward the ceiling (AIMD, so relays sharing an
account converge on fair shares instead of oscillating).

The clock and the sleep are injected, so tests run on virtual time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable

HEADROOM = 0.97  # space grants at 97% of the target rate
WINDOW = 1.0  # seconds: SES counts recipients per second
JITTER = 0.025  # seconds of disagreement between our clock and SES's window we absorb
DECREASE = 0.85  # on a throttle: rate *= DECREASE, or down to what SES just accepted
MAX_DECREASE = 0.5  # but never cut more than this at once
HOLD = 1.0  # seconds after a cut in which further throttles are the same event (SES's window)
INCREASE = 0.01  # per second of steady success: rate += INCREASE * ceiling
MIN_INCREASE = 0.05  # recipients/s per second, so tiny ceilings still recover
FLOOR = 0.05  # the rate never drops below FLOOR * ceiling
RECOVER = 4.0  # seconds: time constant of the climb back toward the rate before the last cut


class Pace:
    """Token spacing on recipients/s with AIMD on throttling and a daily recipient budget."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"pace rate must be positive, got {rate!r}")
        self._clock = clock
        self._sleep = sleep
        self._ceiling = float(rate)
        self._rate = float(rate)
        now = clock()
        self._next = now  # earliest start of the next grant
        self._granted: collections.deque[tuple[float, int]] = collections.deque()
        self._granted_sum = 0
        self._accepted: collections.deque[tuple[float, int]] = collections.deque()
        self._accepted_sum = 0
        self._last_cut = -math.inf
        self._peak = 0.0  # the rate before the last cut
        self._last_success = now
        self._max_24h = math.inf
        self._sent_24h = 0.0

    @property
    def rate(self) -> float:
        """The current target in recipients/s (grants are spaced at HEADROOM of it)."""
        return self._rate

    @property
    def ceiling(self) -> float:
        """The rate AIMD climbs back to: configured, or 90% of SES's MaxSendRate."""
        return self._ceiling

    def set_ceiling(self, rate: float) -> None:
        """A new ceiling (config reload or GetSendQuota); the rate is clamped under it."""
        if not rate > 0:
            raise ValueError(f"pace ceiling must be positive, got {rate!r}")
        self._ceiling = float(rate)
        self._rate = min(self._rate, self._ceiling)

    def reserve(self, recipients: int) -> float:
        """Book a grant for `recipients`; return how many seconds to wait before sending."""
        now = self._clock()
        start = max(now, self._next)
        span = WINDOW + JITTER
        granted = self._granted
        while granted and granted[0][0] <= start - span:
            self._granted_sum -= granted.popleft()[1]
        # Over the rate within the span: wait until enough earlier grants leave it. A lone
        # grant larger than the rate still goes when the span is empty. SES rates are whole
        # recipients; a fractional target must not round a 12.6/s account down to 12.
        total, limit = self._granted_sum, math.ceil(self._rate)
        for at, n in granted:
            if total == 0 or total + recipients <= limit:
                break
            total -= n
            start = max(start, at + span)
        granted.append((start, recipients))
        self._granted_sum += recipients
        self._next = start + max(recipients, 0) / (self._rate * HEADROOM)
        return start - now

    async def acquire(self, recipients: int) -> None:
        """Wait until `recipients` may be sent without exceeding the rate."""
        delay = self.reserve(recipients)
        if delay > 0:
            await self._sleep(delay)

    def throttled(self) -> None:
        """SES said "Maximum sending rate exceeded": cut the rate, once per window."""
        now = self._clock()
        if now - self._last_cut < HOLD:
            return  # the same overshoot, reported by the other sends in flight
        self._last_cut = now
        self._peak = self._rate
        accepted = self._accepted_since(now - WINDOW)
        cut = max(min(self._rate * DECREASE, float(accepted)), self._rate * MAX_DECREASE)
        self._rate = max(cut, self._ceiling * FLOOR)

    def succeeded(self, recipients: int = 1) -> None:
        """SES took `recipients`: climb additively, in proportion to the time sending went well."""
        now = self._clock()
        self._accepted_since(now - WINDOW)
        self._accepted.append((now, recipients))
        self._accepted_sum += recipients
        elapsed = min(now - self._last_success, 1.0)
        self._last_success = now
        if now - self._last_cut < HOLD:
            return  # successes inside the throttled window prove nothing yet
        # Quickly back toward the rate that last worked (one stray throttle costs little),
        # then additively past it, probing for more.
        step = max(INCREASE * self._ceiling, MIN_INCREASE, (self._peak - self._rate) / RECOVER)
        self._rate = min(self._rate + step * elapsed, self._ceiling)

    def _accepted_since(self, since: float) -> int:
        while self._accepted and self._accepted[0][0] <= since:
            self._accepted_sum -= self._accepted.popleft()[1]
        return self._accepted_sum

    def set_budget(self, max_24h: float, sent_last_24h: float) -> None:
        """From GetSendQuota: the daily maximum (-1 or inf: none) and what SES has counted."""
        self._max_24h = math.inf if max_24h < 0 else float(max_24h)
        self._sent_24h = float(sent_last_24h)

    def budget_left(self, recipients: int) -> bool:
        """True when `recipients` more still fit in the 24-hour quota."""
        return self._sent_24h + recipients <= self._max_24h

    def spend(self, recipients: int) -> None:
        """Count recipients SES accepted against the daily budget."""
        self._sent_24h += recipients

    @property
    def remaining(self) -> float:
        """Recipients left in the 24-hour quota (inf when unlimited)."""
        return max(self._max_24h - self._sent_24h, 0.0)


__all__ = ["Pace"]
