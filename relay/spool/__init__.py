"""spool: the second stage of the data path, the durable queue between receive and deliver.

    receive --Spool.add() (committed and fsynced before the 250)--> spool
    deliver --claim() -> sent() / defer() / fail()--> spool

One SQLite database (WAL) in `settings.spool`: `store` is the async API,
`writer` the one thread that writes (group commit), `schema` the file and its
versions, `lock` the write turn two processes share, `rows` states, ids and events.
"""

from relay.spool.lock import SpoolBusy
from relay.spool.rows import FINISHED, Notice, State, new_id, state_counts
from relay.spool.schema import (
    DB_NAME,
    all_or_nothing,
    connect,
    existing,
    open_existing,
    open_read_only,
    reader,
)
from relay.spool.store import Spool

__all__ = [
    "DB_NAME",
    "FINISHED",
    "Notice",
    "Spool",
    "SpoolBusy",
    "State",
    "all_or_nothing",
    "connect",
    "existing",
    "new_id",
    "open_existing",
    "open_read_only",
    "reader",
    "state_counts",
]
