"""Pacing of the SES route: recipients per second, adaptive on throttling, and a daily budget.

SES counts recipients, not calls, against a per-second rate and a 24-hour quota.
`Pace` spaces grants evenly (no burst: a grant of n recipients holds the next one
back by n / rate), so no 1-second window ever sees more than the rate, even
right after an idle spell; several relays sharing one account each pace their
own share. It runs a few percent under its target (HEADROOM) because SES's
window and our clock never agree to the millisecond: a limiter exactly at the
quota still gets throttled.

On a rate throttle the target drops multiplicatively, once per window; each
success lets it climb back additively toward the ceiling (AIMD, so relays
sharing an account converge on fair shares instead of oscillating).

The clock and the sleep are injected, so tests run on virtual time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

HEADROOM = 0.97  # pace at 97% of the target rate
DECREASE = 0.8  # on a throttle: rate *= DECREASE
HOLD = 1.0  # seconds after a cut in which further throttles are the same event (SES's window)
INCREASE = 0.01  # per second of steady success: rate += INCREASE * ceiling
MIN_INCREASE = 0.05  # recipients/s per second, so tiny ceilings still recover
FLOOR = 0.05  # the rate never drops below FLOOR * ceiling


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
        self._last_cut = -math.inf
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
        self._rate = max(self._rate * DECREASE, self._ceiling * FLOOR)

    def succeeded(self) -> None:
        """A send went through: climb additively, in proportion to the time sending went well."""
        now = self._clock()
        elapsed = min(now - self._last_success, 1.0)
        self._last_success = now
        if now - self._last_cut < HOLD:
            return  # successes inside the throttled window prove nothing yet
        step = max(INCREASE * self._ceiling, MIN_INCREASE)
        self._rate = min(self._rate + step * elapsed, self._ceiling)

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
