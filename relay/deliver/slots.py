"""Send slots: at most `deliverers` sends in flight per route, so one route that hangs
cannot hold the other's mail.

    loop: claims up to deliverers + SPARE mails -> each takes a slot of its route:
        Slots.take(route, limit, timeout) -> True, send, Slots.give(route)
                                          -> False after the route's own timeout and
                                            SLOT_MARGIN (no send of it ended in a whole
                                            timeout): the route is busy; the mail is
                                            deferred untried as for a dead host (and the
                                            route's mails after it, for BUSY_FOR)

A slow route (a host taking 12 s a mail, SES paced at 1/s) frees a slot well within its
timeout, so its mail waits in memory, as in Postfix's active queue, and is not deferred.

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
SLOT_MARGIN = 5.0  # seconds over its route's timeout a mail waits for a slot before it is
# deferred: by then no send of that route has ended for a whole timeout
BUSY_FOR = 5.0  # seconds after such a wait during which the route's mail is deferred at once


def spare(deliverers: int) -> int:
    """Mails claimed beyond `deliverers`."""
    return max(1, deliverers // SPARE_SHARE)


def not_tried(limit: int, what: str, timeout: float) -> str:
    """The reply recorded for a mail deferred because every slot of its route was taken."""
    waited = timeout + SLOT_MARGIN
    return f"not tried, all {limit} {what} have been in flight for {waited:g}s or more"


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

    async def take(self, route: Route, limit: int, route_timeout: float) -> bool:
        """A slot of `route` (give it back with `give`), or False when none came free
        within `route_timeout` and SLOT_MARGIN (the route is then `busy` for BUSY_FOR)."""
        deadline = asyncio.get_running_loop().time() + route_timeout + SLOT_MARGIN
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


__all__ = ["BUSY_FOR", "SLOT_MARGIN", "Slots", "not_tried", "spare"]
