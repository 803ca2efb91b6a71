"""relay.pace on virtual time: spacing, no bursts, AIMD on throttling, the daily budget."""

from __future__ import annotations

import collections
import math

import pytest

from relay.pace import DECREASE, FLOOR, HEADROOM, HOLD, INCREASE, RECOVER, Pace


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


def test_grants_are_spaced_by_recipients_over_rate(clock: Clock) -> None:
    """The first grant is immediate; each next waits its predecessor's recipients / rate."""
    pace = Pace(10.0, clock=clock)
    step = 1 / (10.0 * HEADROOM)
    assert [0.0, pytest.approx(step), pytest.approx(2 * step), pytest.approx(5 * step)] == [
        pace.reserve(1),
        pace.reserve(1),
        pace.reserve(3),
        pace.reserve(1),
    ]


def test_no_burst_after_idle(clock: Clock) -> None:
    """A long idle spell does not bank tokens: the second grant still waits one step."""
    pace = Pace(20.0, clock=clock)
    pace.reserve(1)
    clock.now += 3600
    assert (0.0, pytest.approx(1 / (20.0 * HEADROOM))) == (pace.reserve(1), pace.reserve(1))


def test_large_message_goes_then_holds_the_next(clock: Clock) -> None:
    """A message with more recipients than the rate is not stuck; the next one waits it out."""
    pace = Pace(20.0, clock=clock)
    assert 0.0 == pace.reserve(50)
    assert pytest.approx(50 / (20.0 * HEADROOM)) == pace.reserve(1)


async def test_acquire_sleeps_on_the_injected_clock(clock: Clock) -> None:
    """acquire() waits through the injected sleep, never a busy loop, never when not needed."""
    pace = Pace(4.0, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        await pace.acquire(1)
    assert [pytest.approx(1 / (4.0 * HEADROOM))] * 2 == clock.slept


async def test_never_more_than_the_rate_in_any_second(clock: Clock) -> None:
    """Whatever the mix of sizes, no 1-second window holds more recipients than the rate."""
    pace = Pace(20.0, clock=clock, sleep=clock.sleep)
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
    _accept(pace, clock, 30)
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
    pace = Pace(40.0, clock=clock)
    _accept(pace, clock, 5)
    clock.now += 1.0  # those five are older than the last second now: not counted
    _accept(pace, clock, 22, over=0.9)
    pace.throttled()
    assert 22.0 == pace.rate


def test_cut_is_at_most_half(clock: Clock) -> None:
    """Even when SES took little, one throttle at most halves the rate."""
    pace = Pace(40.0, clock=clock)
    pace.throttled()
    assert 20.0 == pace.rate


def test_rate_has_a_floor(clock: Clock) -> None:
    """However many throttles, the rate stays above a small fraction of the ceiling."""
    pace = Pace(20.0, clock=clock)
    for _ in range(100):
        pace.throttled()
        clock.now += HOLD
    assert 20.0 * FLOOR == pytest.approx(pace.rate)


def test_success_returns_quickly_toward_the_rate_before_the_cut(clock: Clock) -> None:
    """After a cut, each second of success closes a quarter of the gap to the old rate."""
    pace = Pace(50.0, clock=clock)
    pace.throttled()
    assert 25.0 == pace.rate
    clock.now += 0.5
    pace.succeeded()
    assert 25.0 == pace.rate  # still inside the throttled window
    rates = []
    for _ in range(3):
        clock.now += 1.0
        pace.succeeded()
        rates.append(pace.rate)
    gap = 25.0
    expected = [50 - gap * (1 - 1 / RECOVER) ** k for k in (1, 2, 3)]
    assert expected == pytest.approx(rates)


def test_success_climbs_additively_past_it(clock: Clock) -> None:
    """Past the old rate, each second of success adds a fixed step, never beyond the ceiling."""
    pace = Pace(20.0, clock=clock)
    pace.throttled()  # 20 -> 10, the old rate is 20
    for _ in range(60):
        clock.now += 1.0
        pace.succeeded()
    pace.set_ceiling(50.0)
    start = pace.rate
    rates = []
    for _ in range(3):
        clock.now += 1.0
        pace.succeeded()
        rates.append(pace.rate - start)
    step = INCREASE * 50.0
    assert [step, 2 * step, 3 * step] == pytest.approx(rates)
    clock.now += 60
    pace.succeeded()  # an idle minute counts as one second, not sixty
    assert start + 4 * step == pytest.approx(pace.rate)
    for _ in range(100):
        clock.now += 1.0
        pace.succeeded()
    assert 50.0 == pace.rate


def test_set_ceiling_clamps_the_rate(clock: Clock) -> None:
    """A lower ceiling applies at once; a higher one is climbed to."""
    pace = Pace(20.0, clock=clock)
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


def simulate(ceiling: float, limit: float, seconds: float) -> tuple[int, int, float]:
    """Send one recipient at a time through Pace into a sliding-window limiter (virtual time).

    Returns (sent, throttled, rate over the last half).
    """
    clock = Clock()
    start = clock.now
    pace = Pace(ceiling, clock=clock)
    window: collections.deque[float] = collections.deque()
    sent, throttled, late = 0, 0, 0
    while clock.now - start < seconds:
        clock.now += pace.reserve(1)
        while window and window[0] <= clock.now - 1.0:
            window.popleft()
        if len(window) + 1 > limit:
            throttled += 1
            pace.throttled()
            continue
        window.append(clock.now)
        sent += 1
        late += clock.now - start >= seconds / 2
        pace.succeeded()
    return sent, throttled, late / (seconds / 2)


def test_aimd_settles_under_a_lower_limit() -> None:
    """With the ceiling at 50/s and SES at 20/s, the pace settles near 20 with few throttles."""
    sent, throttled, settled = simulate(ceiling=50.0, limit=20.0, seconds=120.0)
    assert 17.0 <= settled <= 20.0
    assert throttled <= 0.015 * sent


def test_ceiling_at_the_limit_is_never_throttled() -> None:
    """With the ceiling equal to the SES limit, HEADROOM keeps every window under it."""
    _, throttled, settled = simulate(ceiling=20.0, limit=20.0, seconds=60.0)
    assert 0 == throttled
    assert settled >= 19.0
