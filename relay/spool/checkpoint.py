"""WAL checkpoints off the 250's path: a thread of the delivery process copies the WAL
into the database while both processes go on writing.

SQLite's default checkpoints itself inside whichever COMMIT takes the WAL past
1,000 pages. A 4 KB mail is about 13 pages (the row, its indexes, the body, the
"received" event), so every 75th add or so paid for copying 1,000 pages and two
fsyncs before its 250: the sequential p99 went from about 1.7 to 2.5 ms. Now:

    relay serve       commits (FULL), checkpoints itself only past SERVE_PAGES
                      (the delivery process is down: the WAL must not grow for ever)
    delivery process  commits (NORMAL), never checkpoints in a commit;
                      Checkpointer: PRAGMA wal_checkpoint(PASSIVE) every EVERY
                      seconds while the other side commits; a look every IDLE when not

A PASSIVE checkpoint takes no write lock (neither SQLite's nor `relay.spool.lock`'s),
so adds and claims go on meanwhile; once it has copied every frame, the next
writer starts the WAL again from its beginning, which keeps the file small.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

from relay.spool.schema import connect

log = logging.getLogger("relay.spool")

EVERY = 0.05  # seconds between checkpoints while new frames keep coming
IDLE = 0.5  # seconds between looks while nobody commits
SERVE_PAGES = 10_000  # relay serve's own wal_autocheckpoint: only without a Checkpointer


class Checkpointer(threading.Thread):
    """The one thread that checkpoints the spool's WAL (in the delivery process)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="relay-checkpoint", daemon=True)
        self.path = path
        self.checkpoints = 0
        self._stopping = threading.Event()
        self._conn: sqlite3.Connection | None = None

    def run(self) -> None:
        seen: int | None = None  # PRAGMA data_version: changes when another connection commits
        wait = EVERY
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
                if not failing:  # one line per spell of errors, not one per EVERY
                    log.warning("event=checkpoint_failed spool=%s error=%s", self.path, exc)
                failing = True
                self._close()
                seen, wait = None, IDLE
                continue
            failing = False
            self.checkpoints += 1
            seen, wait = version, EVERY
        self._close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
