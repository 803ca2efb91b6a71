"""The memory budget for DATA, shared by all sessions (`limits.max_data_in_memory`).

    Session.smtp_DATA --chunks--> data.Body --counts its bytes in--> Budget
      past the limit: Body spills to a file; done: a spilled body is read back
      only when `Budget.load` says so, and `unload` once spooled

Unfinished bodies count in `used` (`over` tells a body to spill); spilled bodies read
back whole to be spooled count in `loaded`, held to the same limit on their own, so
that hoarders keeping `used` at the limit cannot stop them (see relay.receive.data).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relay import metrics


class Budget:
    """Bytes of unfinished DATA held in memory by all sessions, against `limit`.

    `trim` (glibc's malloc_trim, when there is one) runs once the bodies in memory, both
    unfinished and read back, are gone after the budget was reached: the many blocks
    hoarders left behind are then handed back to the system, and RSS returns to what
    relay needs.
    """

    def __init__(
        self, limit: int, *, trim: Callable[[], object] | None = None, max_files: int | None = None
    ) -> None:
        self.limit = limit
        # Spill files open at once: each is a descriptor beyond its session's, which the
        # open-file check (caps.sessions_problem) does not count; past it, NO_ROOM.
        self.max_files = max_files
        self.files = 0
        self.used = 0
        self.trim = trim
        self._reached = False
        self.loaded = 0  # bytes of spilled bodies read back whole, until spooled (see load)
        self.spilled = 0  # bytes in the spill files of bodies being received (data.Body)
        self._unloaded = asyncio.Event()
        metrics.DATA_IN_MEMORY.set_function(lambda: self.used)

    @property
    def over(self) -> bool:
        if self.used > self.limit:
            self._reached = True
            return True
        return False

    async def load(self, size: int) -> None:
        """Wait until a spilled body of `size` bytes may be read back whole: bodies read
        back are held to `limit` bytes together too, apart from the unfinished ones (which
        hoarders may keep at the limit). At once when none is loaded: one body larger than
        the limit goes alone."""
        while self.loaded and self.loaded + size > self.limit:
            self._unloaded.clear()
            await self._unloaded.wait()
        self.loaded += size

    def unload(self, size: int) -> None:
        """A body read back by `load` is spooled (or abandoned)."""
        self.loaded -= size
        self._unloaded.set()
        self._settle()

    def release(self, size: int) -> None:
        self.used -= size
        self._settle()

    def _settle(self) -> None:
        if self.used == 0 and self.loaded == 0 and self._reached:
            self._reached = False
            if self.trim is not None:
                self.trim()
