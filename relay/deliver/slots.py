"""Send slots: at most `deliverers` sends in flight per route, so one route that hangs
cannot hold the other's mail.

    loop: claims up to deliverers + SPARE mails -> each takes a slot of its route:
        Slots.take(route, limit, within) -> True, send, Slots.give(route)
                                         -> False after `within` s: the route is busy;
                                            the mail is deferred untried (a while for
                                            the mails after it too: Slots.busy)

Postfix holds mail per destination in its active queue and limits each destination's
concurrency (default_destination_concurrency_limit), so a destination that tarpits
does not stop the others. Relay has two destinations, SES and the original host: a
host that took the mail and never answered the dot held every delivery slot for
600 s, and the re-engagement mail for SES waited behind it (and SES calls that timed
out held up password-reset mail for the original host).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from relay.rules import Route

SPARE_SHARE = 4  # a quarter more mails are claimed than `deliverers`: room for the route
# whose slots are free while the other's are all taken
SLOT_WAIT = 10.0  # seconds a mail waits for a slot of its route before it is deferred
BUSY_FOR = 5.0  # seconds after such a wait during which the route's mail is deferred at once


def spare(deliverers: int) -> int:
    """Mails claimed beyond `deliverers`."""
    return max(1, deliverers // SPARE_SHARE)


def not_tried(limit: int, what: str) -> str:
    """The reply recorded for a mail deferred because every slot of its route was taken."""
    return f"not tried, all {limit} {what} have been in flight for {SLOT_WAIT:g}s or more"


class Slots:
    """Sends in flight per route, each at most a limit; a wait for a slot is bounded."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._in_flight: Counter[Route] = Counter()
        self._freed = asyncio.Event()
        self._busy_until: dict[Route, float] = {}
        self._clock = clock

    def in_flight(self, route: Route) -> int:
        return self._in_flight[route]

    def busy(self, route: Route) -> bool:
        """True for BUSY_FOR seconds after a wait for a slot of `route` ran out."""
        return self._clock() < self._busy_until.get(route, 0.0)

    async def take(self, route: Route, limit: int) -> bool:
        """A slot of `route` (give it back with `give`), or False when none came free
        within SLOT_WAIT seconds (the route is then `busy` for BUSY_FOR)."""
        deadline = asyncio.get_running_loop().time() + SLOT_WAIT
        while self._in_flight[route] >= limit:
            left = deadline - asyncio.get_running_loop().time()
            self._freed.clear()
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    await self._freed.wait()
            except TimeoutError:
                self._busy_until[route] = self._clock() + BUSY_FOR
                return False
        self._in_flight[route] += 1
        return True

    def give(self, route: Route) -> None:
        self._in_flight[route] -= 1
        self._freed.set()


__all__ = ["BUSY_FOR", "SLOT_WAIT", "Slots", "not_tried", "spare"]
