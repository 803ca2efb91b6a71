"""WAL checkpoints off the 250's path: threads that copy the WAL into the database
while both processes go on writing.

SQLite's default checkpoints itself inside whichever COMMIT takes the WAL past
1,000 pages. A 4 KB mail was about 13 pages of 4 KB (the row, its indexes, the body,
the "received" event), so every 75th add or so paid for copying 1,000 pages and two
fsyncs before its 250: the sequential p99 went from about 1.7 to 2.5 ms. Now:

    every commit       (adds FULL, the delivery process NORMAL) checkpoints only past
                       SAFETY_PAGES: should both threads be stuck, the WAL still stops
    delivery process   Checkpointer every EVERY seconds while someone commits
    relay serve        Checkpointer every SERVE_EVERY seconds: finds little to copy
                       while the delivery process runs, and keeps the WAL short when
                       it does not (restarting, or delivery in the same process)

Each checkpoint is a PRAGMA wal_checkpoint(PASSIVE); it takes no write lock
(neither SQLite's nor `relay.spool.lock`'s), so adds and claims go on meanwhile.
Once it has copied every frame, the next writer starts the WAL again from its
beginning, which keeps the file small: a spool on a small disk needs that
(tests/reliability/test_disk_full.py). In relay serve itself the thread cost
the sequential p99 a few tenths of a millisecond (GIL hand-offs), hence the
delivery process does the frequent ones.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

from relay.spool.schema import connect

log = logging.getLogger("relay.spool")

EVERY = 0.05  # seconds between checkpoints while someone commits (delivery process)
SERVE_EVERY = 0.25  # the same in relay serve
IDLE = 0.5  # seconds between looks while nobody commits
SAFETY_PAGES = 10_000  # wal_autocheckpoint of the writers' connections


class Checkpointer(threading.Thread):
    """A thread that checkpoints the spool's WAL every `every` seconds while someone commits."""

    def __init__(self, path: Path, *, every: float = EVERY) -> None:
        super().__init__(name="relay-checkpoint", daemon=True)
        self.path = path
        self.every = every
        self.checkpoints = 0
        self._stopping = threading.Event()
        self._conn: sqlite3.Connection | None = None

    def run(self) -> None:
        seen: int | None = None  # PRAGMA data_version: changes when another connection commits
        wait = self.every
        failing = False
        while not self._stopping.wait(wait):
            try:
                if self._conn is None:
                    self._conn = connect(self.path)
                [(version,)] = self._conn.execute("PRAGMA data_version").fetchall()
                if version == seen:
                    wait = IDLE
                    continue
                # fetchall: a statement left unfinished would keep a read mark
                # on the WAL, and no writer could start it again from its beginning.
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                if not failing:  # one line per spell of errors, not one per look
                    log.warning("event=checkpoint_failed spool=%s error=%s", self.path, exc)
                failing = True
                self._close()
                seen, wait = None, IDLE
                continue
            failing = False
            self.checkpoints += 1
            seen, wait = version, self.every
        self._close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
