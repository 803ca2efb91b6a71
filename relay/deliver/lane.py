"""SES's lane: the share of the delivery slots SES mail may hold.

Claims go in due order, and an SES mail holds its slot while it waits for its turn at
SES's pace. With nothing more, a backlog of reminders paced at 14/s held every slot, and
a password reset for the original host waited behind all of them (six minutes behind
5,000). So SES mail holds at most `size()` of the `deliverers` slots. An SES mail claimed
while they are all taken goes back to the queue, set aside (relay.spool.rows.park); the
claims after it pass it by, and it is claimed again, oldest first, once `room()` says so.
Postfix likewise gives each transport its own delivery processes (master.cf's maxproc).

    claim(free, parked=lane.room()) -> classify -> SES, paced? lane.full()? -> park
                                                     \\-> lane.join(task) -> sent ...
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# A quarter of the slots (at least one) is kept for the original host's mail, and the
# lane claims its set-aside rows once a quarter of it is free, a few per claim.
SHARE = 4


def size(deliverers: int) -> int:
    """How many of `deliverers` slots SES mail may hold: all but a quarter, at least one."""
    return max(1, deliverers - max(1, deliverers // SHARE))


class Lane:
    """The deliveries in SES's lane, and whether set-aside rows may be waiting."""

    def __init__(self, deliverers: Callable[[], int]) -> None:
        """`deliverers`: the current `deliverers` setting (a reload may change it)."""
        self._deliverers = deliverers
        self._tasks: set[asyncio.Task[None]] = set()
        self.freed = asyncio.Event()  # room() is more than nothing again
        # A relay before this one may have left rows set aside: ask for them at the start.
        self._parked = True

    def full(self) -> bool:
        return len(self._tasks) >= size(self._deliverers())

    def room(self) -> int:
        """How many set-aside rows a claim should ask for now: none while fewer than a
        quarter of the lane is free, or while none are known to wait."""
        lane = size(self._deliverers())
        free = lane - len(self._tasks)
        return free if self._parked and free >= max(1, lane // SHARE) else 0

    def join(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._left)

    def parked(self) -> None:
        """Rows were set aside just now."""
        self._parked = True

    def claimed(self, asked: int, got: int) -> None:
        """A claim asked for `asked` set-aside rows and got `got` rows in all: they come
        first, so fewer than asked means none are left."""
        if asked:
            self._parked = got >= asked

    def _left(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.room():
            self.freed.set()
