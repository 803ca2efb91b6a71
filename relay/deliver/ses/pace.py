"""Pacing of the SES route: recipients per second, adaptive on throttling, and a daily budget.

SES counts recipients, not calls, against a per-second rate and a 24-hour quota.
`Pace` spaces grants evenly (no burst: a grant of n recipients holds the next one
back by n / rate, even right after an idle spell) and also never books more than
the rate into any window of WINDOW + JITTER seconds, so mixed message sizes
cannot pile up inside one of SES's 1-second windows either. It spaces grants a
few percent under its target (HEADROOM) because SES's window and our clock
never agree to the millisecond: a limiter exactly at the quota still gets
throttled.

Several relays may share one SES account, with no coordinator between them and
often another sender beside them. They share it the way TCP flows share a link,
by additive increase and multiplicative decrease: Chiu and Jain (1989, "Analysis
of the Increase and Decrease Algorithms for Congestion Avoidance in Computer
Networks") show that AIMD converges to fair shares, because a multiplicative cut
takes more from a larger share while an additive climb adds the same to every
share. Here the congestion signal is neither synchronous nor proportional: SES
refuses whichever call arrives at a full window: mostly a call of whichever
relay just added calls (see Fairness below).

Start: slow start, as TCP's (RFC 5681, section 3.1). A new Pace sends at
START (a third) of its ceiling and, until its first throttle, adds GROWTH
recipients/s for every recipient SES accepts: its rate grows by half of itself
per second of success, clocked by what SES accepts, as TCP's window grows by
one segment per acknowledged segment. Three relays starting together at the
whole quota each overshot it threefold, in two throttle events; starting at a
third they meet the quota growing, and one event finds each its share.

Decrease: on a rate throttle ("Maximum sending rate exceeded") the target is cut
once per window (HOLD) to rate * DECREASE (less under SHARE, see Fairness), or,
after a large overshoot, down to what SES accepted from this relay in the last
second; never by more than half (KEEP), TCP Reno's decrease (RFC 5681). Grants
booked ahead at the old rate are cancelled, and the window rule above holds the
next grant until enough of what we sent has left SES's window: after a burst
the window drains instead of being hammered.

Joining: a relay throttled within SAMPLE seconds of its first send met a window
that others had already filled. SES took next to nothing from it, so what it
accepted is no sample of its share, and SES's sliding window favours the
senders already in it: each of their calls takes the place one of their own
left a second before, and the newcomer's calls meet a full window. Cut to what
it got, a joining relay stayed the smallest for minutes. So for JOINING seconds
it keeps its (slow-start) rate through throttles, and the relays already
sending, throttled in turn, make room.

Regrow: a relay first throttled between SAMPLE and WINDOW after its first send
is cut to what SES accepted in the last second, but it sent for only part of
that second: a relay starting 0.6 s late was cut to half that way and stayed
the smallest for minutes (tests/test_pace.py). For relays starting together
the deep cut is what ends the overshoot, so it stays, and the relay
slow-starts again up to REGROW of the rate that overshot, as TCP does up to
ssthresh (RFC 5681, 3.1). REGROW is CUBIC's decrease (RFC 9438, 4.6:
beta_cubic = 0.7): at 93%, relays that started together all overshot again,
and the second deep cut set an uneven split that lasted the run
(bench/README.md). Any throttle on the way ends it.

Increase: after a cut the rate climbs by INCREASE * ceiling per second of
success, doubled for every PROBE seconds without a cut. Barely at first, since
the rate that overshot is just above; within half a minute fast enough to take
back what a relay that stopped, or another sender, left idle. Growth as a
function of the time since the last congestion event rather than of the rate,
slow near the rate that overshot and faster the longer no throttle comes, is
how BIC (Xu, Harfoush and Rhee, INFOCOM 2004) and CUBIC (RFC 9438) probe. There
is no quick climb back to the rate before the cut: on a shared account that
rate is what overshot.

Fairness: SES's sliding window refuses whichever relay adds calls, not the
largest, and equal steps with 7% cuts left an uneven split for minutes. Chiu
and Jain's condition for converging to fairness is that the smaller share
gains on the larger at every step. So both steps depend on the rate against
SHARE * ceiling, a guess of the fair share: the climb is scaled by (SHARE *
ceiling / rate) ** STEEP, at most BOOST; and under the guess a cut is smaller,
1 - DECREASE times (rate / (SHARE * ceiling)) ** SOFTEN (3.1% at two-thirds of
it), since the relay climbing fastest, the smallest, is the one cut most often
(bench/README.md). Over the guess a cut is DECREASE whatever the rate: a deeper
one took a relay alone on the account but held under its ceiling to 70% of
what the quota left (tests/test_pace.py). The guess is wrong wherever three
relays are not alone: beside another sender all are under SHARE, so the boost
favours none (it is mild: a strong one only added probes), and the smaller
cuts keep the quota fuller. The constants come from the simulator.

What this costs and achieves, simulated (tests/test_pace.py) and measured
(bench/sesbench.py), is in bench/README.md.

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
DECREASE = 0.93  # on a throttle: rate *= DECREASE, or down to what SES just accepted ...
SOFTEN = 2.0  # ... but under SHARE of the ceiling, 1 - DECREASE times (rate / share) ** SOFTEN
KEEP = 0.5  # one cut keeps at least half of the rate in any case (TCP Reno's decrease)
HOLD = WINDOW  # seconds after a cut in which further throttles are the same event
INCREASE = 0.00005  # per second of success right after a cut: rate += INCREASE * ceiling
MIN_INCREASE = 0.005  # recipients/s per second, so tiny ceilings still recover
FLOOR = 0.05  # the rate never drops below FLOOR * ceiling
PROBE = 3.0  # seconds: the increase doubles for every PROBE seconds without a cut
SHARE = 1 / 3  # at SHARE of the ceiling the climb is as above; ...
STEEP = 6.0  # ... times (SHARE * ceiling / rate) ** STEEP elsewhere, ...
BOOST = 1.5  # ... but at most BOOST times as fast
START = 1 / 3  # a new Pace starts at START * ceiling (slow start) ...
GROWTH = 0.5  # ... and adds GROWTH recipients/s per recipient accepted until its first cut
SAMPLE = 0.5  # seconds: throttled sooner after its first send, a relay joined a full window
JOINING = 2.0  # seconds for which such a relay keeps its rate through throttles
REGROW = 0.7  # after a cut on part of a second, slow start again up to REGROW * rate
# Seconds ahead a grant is booked at most in slow start: sixteen senders (`deliverers`)
# booked at its first rate would hold their places for seconds after the rate has grown.
AHEAD = 0.25


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
        self._rate = float(rate) * START
        self._slow_start = True  # until the first cut
        now = clock()
        self._next = now  # earliest start of the next grant
        self._granted: collections.deque[tuple[float, int]] = collections.deque()
        self._granted_sum = 0
        self._accepted: collections.deque[tuple[float, int]] = collections.deque()
        self._accepted_sum = 0
        self._last_cut = -math.inf
        self._calm_since = now  # the start or the last cut: how long the rate has held
        self._epoch = 0  # counts cuts, so grants booked at the old rate are booked again
        self._last_success = now
        self._first_send: float | None = None
        self._joining_until = -math.inf
        self._regrow_to = math.inf  # slow start again after a cut on a short sample, up to this
        self._max_24h = math.inf
        self._sent_24h = 0.0
        self._stopped = False
        self._waiting: set[asyncio.Task[object]] = set()  # in acquire(): cancelled by stop()

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

    def reserve(self, recipients: int, *, within: float = math.inf) -> float | None:
        """Book a grant for `recipients`; return how many seconds to wait before sending.
        None, and nothing booked, when that would be more than `within` seconds away."""
        now = self._clock()
        if self._first_send is None:
            self._first_send = now
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
        if start - now > within:
            return None
        granted.append((start, recipients))
        self._granted_sum += recipients
        self._next = start + max(recipients, 0) / (self._rate * HEADROOM)
        return start - now

    async def acquire(self, recipients: int) -> None:
        """Wait until `recipients` may be sent without exceeding the rate; cancelled once
        the service stops (see stop)."""
        while True:
            if self._stopped:
                raise asyncio.CancelledError
            epoch = self._epoch
            growing = self._slow_start and self._rate < self._ceiling
            delay = self.reserve(recipients, within=AHEAD if growing else math.inf)
            if delay is None:  # the rate will have grown by then: ask again later
                await self._wait(AHEAD)
                continue
            if delay <= 0:
                return
            await self._wait(delay)
            if self._epoch == epoch:
                return
            # A cut while we waited cancelled this booking: it was spaced at the old rate.

    def stop(self) -> None:
        """The service stops: sends waiting for their turn, and any later acquire(), are
        cancelled. Their mail was never offered to SES: in flight, it is taken back at the
        next start (sent during the drain, a stop cut short caught the calls under way)."""
        self._stopped = True
        for task in list(self._waiting):
            task.cancel()

    async def _wait(self, seconds: float) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop: the simulator's own scheduler
            task = None
        if task is not None:
            self._waiting.add(task)
        try:
            await self._sleep(seconds)
        finally:
            if task is not None:
                self._waiting.discard(task)

    def throttled(self) -> None:
        """SES said "Maximum sending rate exceeded": cut the rate, once per window."""
        now = self._clock()
        if now - self._last_cut < HOLD:
            return  # the same overshoot, reported by the other sends in flight
        self._last_cut = self._calm_since = now
        first = now if self._first_send is None else self._first_send
        if self._slow_start and self._regrow_to == math.inf and now - first < SAMPLE:
            self._joining_until = now + JOINING
        self._slow_start = False
        self._regrow_to = math.inf
        before = self._rate
        if now < self._joining_until:
            cut = self._rate  # no sample of our share yet: the relays already sending make room
        else:
            accepted = float(self._accepted_since(now - WINDOW))
            cut = max(min(self._rate * self._decrease(), accepted), self._rate * KEEP)
            if now - first < WINDOW:  # accepted counts only part of a second: see Regrow
                self._slow_start = True
                self._regrow_to = before * REGROW
        self._rate = max(cut, self._ceiling * FLOOR)
        # Grants booked ahead at the old rate are cancelled (acquire() books them again).
        # What is left in the ledger is what we sent in the last window; at the new rate
        # the window rule in reserve() holds the next grant until enough of it has aged
        # out, so the pause after a burst lasts until SES's window has drained.
        self._epoch += 1
        granted = self._granted
        while granted and granted[-1][0] > now:
            self._granted_sum -= granted.pop()[1]
        last, n = granted[-1] if granted else (now, 0)
        self._next = max(now, last + max(n, 0) / (self._rate * HEADROOM))

    def succeeded(self, recipients: int = 1) -> None:
        """SES took `recipients`: climb additively, in proportion to the time sending went well."""
        now = self._clock()
        if self._first_send is None:
            self._first_send = now
        self._accepted_since(now - WINDOW)
        self._accepted.append((now, recipients))
        self._accepted_sum += recipients
        elapsed = min(now - self._last_success, 1.0)
        self._last_success = now
        if self._slow_start:  # RFC 5681's slow start, clocked by what SES accepts
            self._rate = min(self._rate + GROWTH * recipients, self._ceiling, self._regrow_to)
            if self._rate >= self._regrow_to:  # back where a full sample would have cut to
                self._slow_start, self._regrow_to, self._calm_since = False, math.inf, now
            return
        if now - self._last_cut < HOLD:
            return  # successes inside the throttled window prove nothing yet
        # Slow right after a cut (the rate that overshot is close), faster the longer no
        # throttle comes: capacity that other relays left idle is taken back in seconds.
        doublings = min((now - self._calm_since) / PROBE, 30.0)
        step = max(INCREASE * self._ceiling, MIN_INCREASE) * 2.0**doublings
        # The smaller share climbs faster (see the module docstring: fairness).
        step *= min((SHARE * self._ceiling / self._rate) ** STEEP, BOOST)
        self._rate = min(self._rate + step * elapsed, self._ceiling)

    def _decrease(self) -> float:
        """DECREASE, or a smaller cut under the guessed fair share (see Fairness)."""
        under = min(self._rate / (SHARE * self._ceiling), 1.0)
        return 1.0 - (1.0 - DECREASE) * math.pow(under, SOFTEN)

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
