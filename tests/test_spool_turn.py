"""The spool's write turn between relay serve and the delivery process (relay.spool.lock).

flock between two open files of `write.lock` and `next.lock`, as between the two
processes: the kernel's locks do not know threads from processes.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from relay.spool import Spool
from relay.spool.lock import DELIVERY_POLL, NEXT_LOCK, NEXT_MAX, SpoolBusy, Turn
from tests.support.spools import add_one


@contextmanager
def receiving_flat_out(directory: Path, hold: float = 0.004) -> Iterator[list[float]]:
    """relay serve's writer under load: each transaction holds the turn `hold` seconds
    and the next one takes it again at once. Yields the waits of its turns."""
    stop = threading.Event()
    waits: list[float] = []

    def adds() -> None:
        with closing(Turn(directory)) as turn:
            while not stop.is_set():
                asked = time.monotonic()
                with turn.held():
                    waits.append(time.monotonic() - asked)
                    time.sleep(hold)

    thread = threading.Thread(target=adds, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        yield waits
    finally:
        stop.set()
        thread.join(10)


@contextmanager
def next_claimed(directory: Path) -> Iterator[int]:
    """A writer that claimed the next turn and never takes it (stopped, stuck)."""
    fd = os.open(directory / NEXT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def timed_turn(turn: Turn, timeout: float | None = None) -> float:
    asked = time.monotonic()
    with turn.held(timeout):
        return time.monotonic() - asked


def test_the_delivery_process_gets_its_turn_while_relay_serve_receives_flat_out(
    tmp_path: Path,
) -> None:
    """Looking every 500 µs, the delivery process found the turn taken by back-to-back
    adds for hundreds of milliseconds (200 ms in the bench, delivering 180 mails/s while
    900 came in). It claims the next turn after 2 ms: one add later it is its turn."""
    with (
        receiving_flat_out(tmp_path) as adds,
        closing(Turn(tmp_path, poll=DELIVERY_POLL, claims_next=True)) as delivery,
    ):
        waits = []
        for _ in range(30):
            waits.append(timed_turn(delivery))
            time.sleep(0.002)  # its work between transactions
        served = len(adds)
    assert max(waits) < 0.1, [f"{w * 1000:.1f} ms" for w in waits]
    assert served > 30  # the adds took their turns between, not after


async def test_the_delivery_sides_spool_claims_the_next_turn(tmp_path: Path) -> None:
    """The delivery process's spool (`full_sync=False`) is the writer that claims: its
    claims and outcomes come between back-to-back adds, not after them."""
    delivery = await Spool.open(tmp_path, full_sync=False)
    try:
        queue_id = await add_one(delivery)
        with receiving_flat_out(tmp_path):
            took = []
            for _ in range(10):
                asked = time.monotonic()
                await delivery.claim(16)
                await delivery.defer(queue_id, due_at=0.0, rule=None, route="upstream", reply="x")
                took.append(time.monotonic() - asked)
    finally:
        await delivery.close()
    assert max(took) < 0.2, [f"{t * 1000:.1f} ms" for t in took]


def test_a_claim_never_taken_holds_up_one_add_then_is_skipped_until_let_go(
    tmp_path: Path,
) -> None:
    """A delivery process stopped (SIGSTOP) while it claims the next turn: relay serve's
    first add waits NEXT_MAX for it, the next ones not at all, until the claim is gone;
    a new claim is waited for again."""
    with closing(Turn(tmp_path)) as serve:
        with next_claimed(tmp_path):
            first = timed_turn(serve)
            after = [timed_turn(serve) for _ in range(20)]
        free = timed_turn(serve)
        with next_claimed(tmp_path):
            again = timed_turn(serve)
    assert NEXT_MAX <= first < NEXT_MAX + 1.0
    assert sum(after) < NEXT_MAX, after
    assert free < NEXT_MAX
    assert NEXT_MAX <= again < NEXT_MAX + 1.0


def test_a_short_wait_for_a_claimed_turn_is_busy_and_skips_nothing(tmp_path: Path) -> None:
    """try_now's 2 ms on the event loop: a claimed next turn makes it SpoolBusy (the add
    goes to the writer thread), and does not count as waiting NEXT_MAX for the claim."""
    with closing(Turn(tmp_path)) as serve, next_claimed(tmp_path):
        with pytest.raises(SpoolBusy, match="claimed the next turn"):
            timed_turn(serve, 0.002)
        assert NEXT_MAX <= timed_turn(serve) < NEXT_MAX + 1.0
