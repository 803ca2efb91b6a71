"""relay.deliver.ses.pace on virtual time: spacing, no bursts, AIMD on throttling, the daily
budget, and simulated relays sharing one SES account (a sliding 1-second window, as
tests/support/fakeses.py)."""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import random
import statistics
import sys
from collections.abc import Coroutine, Generator, Sequence
from dataclasses import dataclass, field

import pytest

from bench.sesbench import shares
from relay.deliver.ses.pace import (
    BOOST,
    DECREASE,
    FLOOR,
    GROWTH,
    HEADROOM,
    HOLD,
    INCREASE,
    JITTER,
    JOINING,
    KEEP,
    MIN_INCREASE,
    PROBE,
    REGROW,
    SAMPLE,
    SHARE,
    SOFTEN,
    START,
    STEEP,
    WINDOW,
    Pace,
)


class Clock:
    """Virtual time: `sleep` advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    """A virtual clock starting at t=1000."""
    return Clock()


def _at_ceiling(pace: Pace) -> Pace:
    """Report successes until slow start has brought the rate up to the ceiling."""
    while pace.rate < pace.ceiling:
        pace.succeeded()
    return pace


def _due(pace: Pace, recipients: int = 1) -> float:
    """Book a grant that has no deadline: the seconds until it may go."""
    wait = pace.reserve(recipients)
    assert wait is not None
    return wait


def test_slow_start(clock: Clock) -> None:
    """A new Pace sends at START of its ceiling and adds GROWTH per recipient accepted, up to the
    ceiling, until its first throttle (RFC 5681's slow start); after it, the climb is AIMD's."""
    pace = Pace(60.0, clock=clock)
    assert pytest.approx(60.0 * START) == pace.rate
    pace.succeeded(10)
    assert pytest.approx(60.0 * START + 10 * GROWTH) == pace.rate
    assert 60.0 == _at_ceiling(pace).rate
    clock.now += 1.0
    pace.succeeded(10)
    pace.throttled()
    cut = pace.rate
    clock.now += HOLD
    pace.succeeded(10)
    assert cut < pace.rate < cut + 0.01 * 60.0


def test_grants_are_spaced_by_recipients_over_rate(clock: Clock) -> None:
    """The first grant is immediate; each next waits its predecessor's recipients / rate."""
    pace = _at_ceiling(Pace(10.0, clock=clock))
    step = 1 / (10.0 * HEADROOM)
    assert [0.0, pytest.approx(step), pytest.approx(2 * step), pytest.approx(5 * step)] == [
        pace.reserve(1),
        pace.reserve(1),
        pace.reserve(3),
        pace.reserve(1),
    ]


def test_no_burst_after_idle(clock: Clock) -> None:
    """A long idle spell does not bank tokens: the second grant still waits one step."""
    pace = _at_ceiling(Pace(20.0, clock=clock))
    pace.reserve(1)
    clock.now += 3600
    first, second = _due(pace), _due(pace)
    assert 0.0 == first
    assert pytest.approx(1 / (20.0 * HEADROOM)) == second


def test_large_message_goes_then_holds_the_next(clock: Clock) -> None:
    """A message with more recipients than the rate is not stuck; the next one waits it out."""
    pace = _at_ceiling(Pace(20.0, clock=clock))
    assert 0.0 == pace.reserve(50)
    assert pytest.approx(50 / (20.0 * HEADROOM)) == pace.reserve(1)


async def test_acquire_sleeps_on_the_injected_clock(clock: Clock) -> None:
    """acquire() waits through the injected sleep, never a busy loop, never when not needed."""
    pace = _at_ceiling(Pace(4.0, clock=clock, sleep=clock.sleep))
    for _ in range(3):
        await pace.acquire(1)
    assert [pytest.approx(1 / (4.0 * HEADROOM))] * 2 == clock.slept


async def test_never_more_than_the_rate_in_any_second(clock: Clock) -> None:
    """Whatever the mix of sizes, no 1-second window holds more recipients than the rate."""
    pace = _at_ceiling(Pace(20.0, clock=clock, sleep=clock.sleep))
    grants: list[tuple[float, int]] = []
    for size in [1, 1, 3, 1, 7, 1, 1, 2] * 40:
        await pace.acquire(size)
        grants.append((clock.now, size))
    windows = [sum(n for t, n in grants if start <= t < start + 1.0) for start, _ in grants]
    assert 20 == max(windows)


def _accept(pace: Pace, clock: Clock, recipients: int, over: float = 0.5) -> None:
    """Report `recipients` single-recipient successes spread over `over` seconds."""
    for _ in range(recipients):
        clock.now += over / recipients
        pace.succeeded()


def test_throttle_cuts_once_per_window(clock: Clock) -> None:
    """Throttles reported by sends already in flight count as one overshoot."""
    pace = Pace(20.0, clock=clock)
    _accept(pace, clock, 30, over=1.0)
    pace.throttled()
    pace.throttled()
    assert 20.0 * DECREASE == pace.rate
    clock.now += HOLD
    _accept(pace, clock, 30)
    before = pace.rate  # a little higher: a second of successes since the cut
    pace.throttled()
    assert before * DECREASE == pytest.approx(pace.rate)


def test_cut_to_what_ses_accepted(clock: Clock) -> None:
    """Far above the real limit, the cut goes straight down to what SES took in the last second."""
    pace = _at_ceiling(Pace(40.0, clock=clock))
    _accept(pace, clock, 5)
    clock.now += 1.0  # those five are older than the last second now: not counted
    _accept(pace, clock, 22, over=0.9)
    pace.throttled()
    assert 22.0 == pace.rate


def test_one_cut_at_most_halves(clock: Clock) -> None:
    """A relay at the full quota that got a third of it: the first cut halves (TCP Reno's
    decrease), the next overshoot, after a whole second at that rate, cuts to the third."""
    pace = _at_ceiling(Pace(60.0, clock=clock))
    clock.now += 1.0
    _accept(pace, clock, 20, over=0.9)
    pace.throttled()
    assert 60.0 * KEEP == pace.rate
    clock.now += HOLD
    _accept(pace, clock, 20, over=0.9)
    pace.throttled()
    assert 20.0 == pace.rate


def test_one_cut_keeps_half(clock: Clock) -> None:
    """Even when SES took nothing from this relay in the last second, one throttle keeps KEEP,
    half of the rate."""
    pace = _at_ceiling(Pace(40.0, clock=clock))
    clock.now += 2.0
    pace.throttled()
    assert 40.0 * KEEP == pace.rate


def test_a_relay_under_its_share_cuts_less(clock: Clock) -> None:
    """Under SHARE of its ceiling, a cut takes DECREASE's 7% times (rate / share) ** SOFTEN: at 15
    of a 60/s ceiling, three quarters of a third, 3.9%. Over it, DECREASE (above)."""
    pace = Pace(60.0, clock=clock)
    _accept(pace, clock, 20, over=1.0)
    clock.now += 1.0
    pace.throttled()  # nothing accepted in the last second: KEEP, half of the 30 slow start reached
    assert 15.0 == pace.rate
    clock.now += HOLD
    _accept(pace, clock, 15, over=1.0)
    before = pace.rate
    pace.throttled()
    share = SHARE * 60.0
    assert before * (1 - (1 - DECREASE) * (before / share) ** SOFTEN) == pytest.approx(pace.rate)
    assert before * 0.96 < pace.rate


def test_a_relay_joining_a_full_window_keeps_its_rate(clock: Clock) -> None:
    """Throttled within SAMPLE of its first send, a relay met a window others had filled: what SES
    took from it is no sample of its share. It keeps its rate through throttles for JOINING
    seconds (the relays already sending make room), then cuts as any other."""
    pace = Pace(60.0, clock=clock)
    start = pace.rate
    clock.now += _due(pace)
    clock.now += SAMPLE / 2
    pace.throttled()
    clock.now += HOLD
    pace.throttled()
    assert start == pace.rate
    clock.now += JOINING
    pace.throttled()
    assert start * KEEP == pace.rate  # and SES took nothing in the last second


def test_a_cut_on_part_of_a_second_is_grown_back_by_slow_start(clock: Clock) -> None:
    """Throttled between SAMPLE and WINDOW after its first send, a relay is cut to what SES took
    (at most by half), though it sent for only part of that second. It then slow-starts again,
    GROWTH per recipient accepted, up to REGROW of the rate that overshot, and climbs
    additively from there."""
    pace = Pace(60.0, clock=clock)
    clock.now += _due(pace)
    _accept(pace, clock, 10, over=0.7)
    before = pace.rate  # slow start: START * 60 + 10 * GROWTH
    assert SAMPLE < 0.7 < WINDOW
    pace.throttled()
    assert before * KEEP == pace.rate  # SES took 10 in that second: the cut halves
    _accept(pace, clock, 4)
    assert before * KEEP + 4 * GROWTH == pytest.approx(pace.rate)
    _accept(pace, clock, 30)
    assert before * REGROW == pytest.approx(pace.rate)  # and no further
    clock.now += HOLD
    _accept(pace, clock, 10)
    assert before * REGROW < pace.rate < before * REGROW + 0.1  # additive, slow


def test_rate_has_a_floor(clock: Clock) -> None:
    """However many throttles, the rate stays above a small fraction of the ceiling."""
    pace = Pace(20.0, clock=clock)
    for _ in range(100):
        clock.now += HOLD
        pace.throttled()
    assert 20.0 * FLOOR == pytest.approx(pace.rate)


def test_after_a_burst_the_window_drains(clock: Clock) -> None:
    """40 grants in two thirds of a second, then a throttle: the next waits until they left SES's
    window (one WINDOW + JITTER after the first), not just one step at the new rate."""
    pace = _at_ceiling(Pace(60.0, clock=clock))
    clock.now += WINDOW  # what slow start accepted has left the last second
    first = clock.now
    for _ in range(40):
        clock.now += _due(pace)
        pace.succeeded()
    pace.throttled()
    assert 40.0 == pace.rate
    assert pytest.approx(first + WINDOW + JITTER) == clock.now + _due(pace)


async def test_a_cut_rebooks_grants_waiting_at_the_old_rate(clock: Clock) -> None:
    """A send already waiting for its grant when the rate is cut waits again, at the new rate."""
    pace = _at_ceiling(Pace(20.0, clock=clock))
    for _ in range(20):  # a second at full rate: the window is full of our own grants
        clock.now += _due(pace)
        pace.succeeded()

    async def sleep(seconds: float) -> None:
        clock.slept.append(seconds)
        if len(clock.slept) == 1:
            pace.throttled()  # reported by another send while this one waits
        clock.now += seconds

    pace._sleep = sleep
    await pace.acquire(1)
    assert 2 == len(clock.slept)
    assert pace.rate == pytest.approx(20.0 * DECREASE)


def test_climb_is_slow_after_a_cut_and_doubles_every_probe(clock: Clock) -> None:
    """No climb inside the throttled window; then INCREASE * ceiling per second, doubled for
    every PROBE seconds without a cut and scaled by the relay's share of its ceiling; an idle
    spell counts as one second."""
    pace = Pace(50.0, clock=clock)
    clock.now += 1.0
    pace.succeeded()
    pace.throttled()
    cut = pace.rate
    clock.now += 0.5
    pace.succeeded()
    assert cut == pace.rate  # still inside the throttled window
    rates = []
    for _ in range(2 * int(PROBE)):
        clock.now += 1.0
        pace.succeeded()
        rates.append(pace.rate)
    base = max(INCREASE * 50.0, MIN_INCREASE)
    expected, rate = [], cut
    for s in range(2, 2 * int(PROBE) + 2):
        share = min((SHARE * 50.0 / rate) ** STEEP, BOOST)
        rate += base * 2 ** ((s - 0.5) / PROBE) * share
        expected.append(rate)
    assert expected == pytest.approx(rates)
    assert rates[-1] - cut < 0.01 * 50.0  # after a cut, a few seconds of success add little
    clock.now += 600
    pace.succeeded()  # a calm of ten minutes: the next step reaches the ceiling
    assert 50.0 == pace.rate


def test_set_ceiling_clamps_the_rate(clock: Clock) -> None:
    """A lower ceiling applies at once; a higher one is climbed to."""
    pace = _at_ceiling(Pace(20.0, clock=clock))
    pace.set_ceiling(10.0)
    assert (10.0, 10.0) == (pace.ceiling, pace.rate)
    pace.set_ceiling(30.0)
    assert (30.0, 10.0) == (pace.ceiling, pace.rate)
    with pytest.raises(ValueError, match="positive"):
        pace.set_ceiling(0)
    with pytest.raises(ValueError, match="positive"):
        Pace(-1.0)


def test_daily_budget(clock: Clock) -> None:
    """The 24-hour budget follows GetSendQuota plus what was spent since; -1 is unlimited."""
    pace = Pace(1.0, clock=clock)
    assert (True, math.inf) == (pace.budget_left(10**9), pace.remaining)
    pace.set_budget(200.0, 190.0)
    assert (True, False) == (pace.budget_left(10), pace.budget_left(11))
    pace.spend(10)
    assert (False, 0.0) == (pace.budget_left(1), pace.remaining)
    pace.set_budget(-1.0, 5000.0)
    assert pace.budget_left(1)


class Sleep:
    """What the simulated sends await: resumed by `Sim` after `seconds` of virtual time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __await__(self) -> Generator[Sleep]:
        yield self


@dataclass(kw_only=True)
class Sim:
    """Relays (a Pace and `deliverers` senders each, a backlog of `mails`) against one SES
    account that allows `limit` recipients in any sliding 1-second window, counted at arrival
    (as tests/support/fakeses.py does), or, with `bucket`, a token bucket refilled at `limit`/s
    and holding `bucket` seconds' worth (AWS does not document which SES uses). Latency is split
    evenly each way with seeded jitter, and a throttled mail goes back to its relay's backlog."""

    ceilings: tuple[float, ...]
    limit: float
    mails: tuple[int, ...] | None = None  # per relay; None: an endless backlog
    starts: tuple[float, ...] | None = None  # per relay: seconds until its first send
    background: float = 0.0  # another sender on the account: recipients/s, evenly spaced
    bucket: float | None = None  # seconds' worth of tokens, instead of the sliding window
    deliverers: int = 4
    latency: float = 0.020
    jitter: float = 0.010
    seed: int = 1
    now: float = 1000.0
    calls: int = 0
    throttles: int = 0
    accepted: list[tuple[float, int]] = field(default_factory=list)  # (when, relay or -1)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._order = itertools.count()  # FIFO among events at the same instant
        self._heap: list[tuple[float, int, Coroutine[Sleep, None, None]]] = []
        self._window: collections.deque[float] = collections.deque()
        self._tokens, self._filled = self.limit * (self.bucket or 0.0), self.now
        self.paces = [Pace(c, clock=lambda: self.now, sleep=Sleep) for c in self.ceilings]
        self._left = list(self.mails or [sys.maxsize] * len(self.ceilings))
        starts = self.starts or (0.0,) * len(self.ceilings)
        for relay in range(len(self.ceilings)):
            for _ in range(self.deliverers):
                self._push(self.now + starts[relay], self._deliverer(relay))
        if self.background > 0:
            self._push(self.now, self._other_sender())
        self.start = self.now

    def _push(self, at: float, coro: Coroutine[Sleep, None, None]) -> None:
        heapq.heappush(self._heap, (at, next(self._order), coro))

    def _half_latency(self) -> float:
        return self.latency / 2 + self._rng.random() * self.jitter

    async def _deliverer(self, relay: int) -> None:
        pace = self.paces[relay]
        while self._left[relay] > 0:
            self._left[relay] -= 1
            await pace.acquire(1)
            await Sleep(self._half_latency())
            self.calls += 1
            ok = self._admit()
            if ok:
                self.accepted.append((self.now, relay))
            else:
                self.throttles += 1
            await Sleep(self._half_latency())
            if ok:
                pace.succeeded(1)
            else:
                pace.throttled()
                self._left[relay] += 1

    async def _other_sender(self) -> None:
        """Not a relay: one recipient every 1 / background seconds, throttled or not."""
        while True:
            if self._admit():
                self.accepted.append((self.now, -1))
            await Sleep(1.0 / self.background)

    def _admit(self) -> bool:
        """Whether SES takes one more recipient now (and counts it)."""
        if self.bucket is not None:
            full = self.limit * self.bucket
            self._tokens = min(full, self._tokens + (self.now - self._filled) * self.limit)
            self._filled = self.now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True
        while self._window and self._window[0] <= self.now - 1.0:
            self._window.popleft()
        if len(self._window) + 1 > self.limit:
            return False
        self._window.append(self.now)
        return True

    def run(self, seconds: float) -> Sim:
        until = self.start + seconds
        while self._heap and self._heap[0][0] < until:
            at, _, coro = heapq.heappop(self._heap)
            self.now = at
            try:
                request = coro.send(None)
            except StopIteration:
                continue
            self._push(at + max(request.seconds, 0.0), coro)
        return self

    def rate(self, since: float = 0.0, until: float | None = None) -> float:
        """Recipients SES accepted per second between `since` and `until` (from the start)."""
        end = self.now - self.start if until is None else until
        n = sum(since <= at - self.start < end and relay >= 0 for at, relay in self.accepted)
        return n / (end - since)

    def finished(self, relay: int) -> float:
        """When SES accepted the last mail of `relay` (seconds from the start)."""
        return max(at for at, r in self.accepted if r == relay) - self.start

    def figures(self, since: float, until: float, relays: Sequence[int]) -> Figures:
        """The issue's measures over [since, until): relays' share of what the other sender left,
        the smallest relay against the fair share of it, and throttles over the whole run."""
        sent = [[at - self.start for at, r in self.accepted if r == relay] for relay in relays]
        other = [at - self.start for at, r in self.accepted if r < 0]
        use, least = shares(sent, other, self.limit, since, until)  # as the bench measures
        return Figures(use=use, least=least, throttled=self.throttles / self.calls)

    def lost(self) -> int:
        """Mails of a finite backlog that SES has not accepted (yet)."""
        assert self.mails is not None
        got = collections.Counter(r for _, r in self.accepted)
        return sum(m - got[r] for r, m in enumerate(self.mails))


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    use: float  # recipients the relays got / what the quota left them
    least: float  # the smallest relay's rate / the fair share of what the quota left
    throttled: float  # throttle replies / calls, over the whole run

    def meets_the_goals(self) -> bool:
        """Issue 14: at least 95% of what the quota leaves, under 1% of calls throttled, no relay
        under 70% of the fair share."""
        return self.use >= 0.95 and self.throttled < 0.01 and self.least >= 0.70


@pytest.mark.parametrize("bucket", [None, 1.0], ids=["window", "bucket"])
@pytest.mark.parametrize("deliverers", [4, 16])
def test_ceiling_at_the_limit_is_never_throttled(deliverers: int, bucket: float | None) -> None:
    """One relay with its ceiling equal to the SES limit: HEADROOM and the window rule keep every
    window under it, at 97% of the limit once slow start is done, whether SES counts in a sliding
    window or a bucket. Sixteen senders ramp up as fast as four: none is booked more than AHEAD
    ahead while the rate grows."""
    sim = Sim(ceilings=(20.0,), limit=20.0, deliverers=deliverers, bucket=bucket).run(60.0)
    assert 0 == sim.throttles
    assert sim.rate() >= 0.95 * 20.0


def test_settles_under_a_lower_limit() -> None:
    """Ceiling 50/s, SES at 20/s: one cut at the start goes to about 20, then a throttle every
    twenty-odd seconds."""
    sim = Sim(ceilings=(50.0,), limit=20.0).run(300.0)
    assert 0.85 * 20.0 <= sim.rate(since=150.0) <= 20.0
    assert sim.throttles <= 0.005 * sim.calls


@pytest.mark.parametrize(
    ("ceiling", "limit", "background"),
    [(54.0, 60.0, 20.0), (60.0, 45.0, 0.0)],
    ids=["other", "low"],
)
def test_one_relay_under_its_ceiling_keeps_what_the_quota_leaves(
    ceiling: float, limit: float, background: float
) -> None:
    """The common site: one relay, held under its ceiling by another sender on the account (20 of
    60/s) or by a limit lower than it was told (45 against 60). It is far over SHARE of its
    ceiling all the time, so a cut that deepened with the share of the ceiling took it to 70% of
    what is left (bench/README.md, 'Smaller cuts under the share'). Cut by DECREASE, it keeps
    94-96%."""
    sim = Sim(ceilings=(ceiling,), limit=limit, background=background, deliverers=16).run(120.0)
    assert sim.rate(since=30.0) >= 0.93 * (limit - background)
    assert sim.throttles <= 0.005 * sim.calls


SEEDS = [1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", SEEDS)
def test_three_relays_share_one_quota(seed: int) -> None:
    """Three relays, each with the whole quota as ceiling, no coordinator, for five minutes:
    issue 14's goals."""
    sim = Sim(ceilings=(60.0, 60.0, 60.0), limit=60.0, seed=seed).run(300.0)
    figures = sim.figures(0.0, 300.0, range(3))
    assert figures.meets_the_goals(), figures


def test_three_relays_start_with_one_event() -> None:
    """All three start at a third of the quota each (slow start) and meet it growing: one event,
    a couple of throttles in all (there were 33 when each started at the whole quota), then
    the third SES gave each."""
    sim = Sim(ceilings=(60.0, 60.0, 60.0), limit=60.0).run(5.0)
    assert sim.throttles <= 6
    assert [pytest.approx(20.0, abs=1.5)] * 3 == [pace.rate for pace in sim.paces]


def test_capacity_left_by_idle_relays_is_taken_back() -> None:
    """Two relays run out of mail; the third grows into the whole quota within a minute."""
    sim = Sim(ceilings=(60.0, 60.0, 60.0), limit=60.0, mails=(300, 300, 10**6)).run(90.0)
    assert sim.rate(since=70.0) >= 0.9 * 60.0
    assert sim.throttles < 0.02 * sim.calls


@pytest.mark.parametrize("late", [0.3, 0.6, 0.9])
def test_a_relay_that_starts_late_still_gets_a_fair_share(late: float) -> None:
    """One of three relays starts `late` seconds after the others. Over the first half minute,
    the smallest relay gets on average at least 70% of the largest share (the issue's fairness
    goal, against the largest rather than the fair share), over twenty seeds.

    One seed proves little either way: the split a start leaves differs from seed to seed
    (at 0.6 s late, 0.47-0.92 of the largest over seeds 1-20; bench/README.md, 'Regrow to
    70%, a milder boost'), so this holds the mean, and no relay starved."""
    ratios = []
    for seed in range(1, 21):
        sim = Sim(ceilings=(60.0,) * 3, limit=60.0, starts=(0.0, 0.0, late), seed=seed).run(30.0)
        got = collections.Counter(relay for at, relay in sim.accepted if at - sim.start >= 5.0)
        ratios.append(min(got.values()) / max(got.values()))
    assert statistics.mean(ratios) >= 0.70, sorted(round(r, 2) for r in ratios)
    assert min(ratios) >= 0.40, sorted(round(r, 2) for r in ratios)


@pytest.mark.xfail(
    strict=True,
    reason="known: 86% of the limit on average (83% before Regrow): the relays that start last"
    " are still the smallest when the others run out (bench/README.md, 'Regrow'); issue 6's"
    " shared-quota row in the bench",
)
def test_three_relays_with_a_short_backlog_and_slightly_late_starts_use_the_quota() -> None:
    """Issue 6's bench row as it really starts: three relays with 600 mails each, whose first
    sends come 0-0.5 s apart (each gets its mail from its own client), finish at 90% of the
    limit or better, on average over ten seeds."""
    rates = []
    for seed in range(1, 11):
        rng = random.Random(seed)
        starts = (0.0, rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.5))
        sim = Sim(
            ceilings=(60.0,) * 3,
            limit=60.0,
            mails=(600,) * 3,
            starts=starts,
            deliverers=16,
            seed=seed,
        ).run(100.0)
        first = min(at for at, _ in sim.accepted) - sim.start
        last = max(sim.finished(relay) for relay in range(3))
        rates.append((1800 - 1) / (last - first) / 60.0)
    assert statistics.mean(rates) >= 0.90, sorted(round(r, 2) for r in rates)


# Issue 14's scenarios: relays with the whole quota as ceiling (max_send_rate: auto on one
# account) and a finite backlog each, so that "nothing lost" means SES accepted every mail.


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "starts", [(0.0, 1.0, 2.0), (0.0, 0.4, 1.7), (0.0, 2.0, 1.1)], ids=["1s", "0.4-1.7s", "2-1.1s"]
)
def test_staggered_starts(starts: tuple[float, ...], seed: int) -> None:
    """Three relays starting 0-2 s apart, each meeting a window the others filled."""
    sim = Sim(ceilings=(60.0,) * 3, limit=60.0, mails=(4000,) * 3, starts=starts, seed=seed)
    sim.run(330.0)
    until = min(sim.finished(r) for r in range(3))
    figures = sim.figures(max(starts), until, range(3))
    assert figures.meets_the_goals(), figures
    assert 0 == sim.lost()


def test_a_relay_joining_mid_run() -> None:
    """Two relays share the quota for a minute; a third joins a full window. Over ten seeds,
    every run uses the quota, is rarely throttled and loses nothing, and the smallest relay
    gets 70% of the fair share in at least nine: how even the split a join leaves is differs
    from seed to seed (0.69-0.95 over seeds 1-30, one of thirty under 0.70, on the pacing of
    bench/README.md's 'Regrow to 70%, a milder boost'; on the pacing before it, also one)."""
    runs = []
    for seed in range(1, 11):
        sim = Sim(
            ceilings=(60.0,) * 3, limit=60.0, mails=(4000,) * 3, starts=(0.0, 0.0, 60.0), seed=seed
        )
        sim.run(330.0)
        until = min(sim.finished(r) for r in range(3))
        runs.append(sim.figures(60.0, until, range(3)))
        assert 0 == sim.lost()
    assert all(f.use >= 0.95 and f.throttled < 0.01 for f in runs), runs
    assert sum(f.least >= 0.70 for f in runs) >= 9, sorted(round(f.least, 2) for f in runs)
    assert min(f.least for f in runs) >= 0.60, sorted(round(f.least, 2) for f in runs)


TAKE_UP = 30.0  # seconds after a relay leaves until the others fill the quota again


@pytest.mark.parametrize("seed", SEEDS)
def test_a_relay_leaving_mid_run(seed: int) -> None:
    """One of three relays runs out of mail after about two minutes: the other two take up its
    share (the probe) within TAKE_UP seconds, and share the whole quota fairly after."""
    sim = Sim(ceilings=(60.0,) * 3, limit=60.0, mails=(8000, 8000, 2400), seed=seed).run(400.0)
    left = sim.finished(2)
    until = min(sim.finished(0), sim.finished(1))
    full = (t for t in range(int(left), int(until)) if sim.rate(t, t + 5.0) >= 0.95 * 60.0)
    taken = next(full, math.inf) - left
    before, after = sim.figures(0.0, left, range(3)), sim.figures(left + TAKE_UP, until, (0, 1))
    assert (True, True) == (before.meets_the_goals(), after.meets_the_goals()), (before, after)
    assert taken <= TAKE_UP
    assert 0 == sim.lost()


@pytest.mark.parametrize("seed", SEEDS)
def test_another_sender_takes_a_third(seed: int) -> None:
    """Something else on the account sends 20 of the 60 recipients/s, evenly and regardless of
    throttles; the three relays share what it leaves."""
    sim = Sim(ceilings=(60.0,) * 3, limit=60.0, mails=(4000,) * 3, background=20.0, seed=seed)
    sim.run(420.0)
    until = min(sim.finished(r) for r in range(3))
    figures = sim.figures(0.0, until, range(3))
    assert figures.meets_the_goals(), figures
    assert 0 == sim.lost()


def test_beside_another_sender_the_relays_keep_the_quota_full() -> None:
    """bench/sesbench.py's scenario beside another sender, in the simulator, seeds 1-20. Every
    relay is under SHARE there, so its cuts are smaller than DECREASE (SOFTEN): the relays use
    95.5% of what the other sender leaves on average (95.3% with every cut at 7%, bench/README.md,
    'Smaller cuts under the share'), and no seed is throttled on 1% of its calls."""
    from bench import sharesim

    runs = [sharesim.scenario(sharesim.SCENARIOS["other"], seed) for seed in range(1, 21)]
    assert statistics.mean(run.figures.use for run in runs) >= 0.9545
    assert max(run.figures.throttled for run in runs) < 0.01
    assert 0 == sum(run.lost for run in runs)


def test_the_bench_scenarios_run_in_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/sharesim.py: the bench's shared-quota scenarios on this simulator, measured as the
    bench measures them, one line per scenario."""
    from bench import sharesim

    sharesim.main(["--seeds", "1", "leaving", "other"])
    lines = capsys.readouterr().out.splitlines()
    assert ["leaving", "other", "all"] == [line.split()[0] for line in lines]
    outcome = sharesim.scenario(sharesim.SCENARIOS["leaving"], 1)
    assert 0 == outcome.lost
    assert 0.9 < outcome.figures.use <= 1.0
    assert 0 == sharesim.scenario(sharesim.SCENARIOS["together"], 1, bucket=1.0).lost
    with pytest.raises(SystemExit):
        sharesim.main(["nowhere"])
