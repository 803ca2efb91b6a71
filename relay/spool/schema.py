"""The spool's file: its tables, their version, the upgrades from older ones, and
how a connection to it is opened.

    relay serve / the delivery process -> Spool.open -> prepare(): new file -> version 5;
      older versions -> 5 in one transaction; newer -> SpoolError
    relay queue -> open_existing() -> schema_version(): refuses other versions

`relay queue` works on the same file from another process while the service
runs (WAL lets readers and a second writer in; busy_timeout covers the rest).

`user_version` holds the version. Every upgrade runs in one transaction, under
SQLite's write lock, so a spool is at one version or the next, never between.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from relay import sdnotify
from relay.errors import SpoolError

log = logging.getLogger("relay.spool")

# systemd's start timeout (90 s by default) is pushed back by this much at a time while an
# upgrade runs (EXTEND_TIMEOUT_USEC), every EXTEND_EVERY seconds: 100,000 mails of 10 KB
# took 20 s, and a unit killed mid-upgrade would start, roll back and be killed for good.
EXTEND_FOR = 60.0
EXTEND_EVERY = 10.0

DB_NAME = "spool.sqlite3"
# 2: bodies in their own table; 3: DSN links, SES feedback; 4: retried_at; 5: lane
SCHEMA_VERSION = 5
BUSY_TIMEOUT_MS = 5000
# Every commit puts each page it changed, whole, in the WAL, and relay serve's fsync
# before the 250 writes them out, the delivery process's claims and outcomes with them.
# At SQLite's default of 4,096 bytes a 4 KB mail cost about 100 KiB on disk (Postfix:
# 21), and the fsync took longer with it; at 2,048 about 61 KiB. Smaller pages make
# B-trees deeper: at 1,024 (40 KiB) a backlog was accepted 10-20% slower. Only for new
# spools: one made before keeps its page size. bench/README.md, "Bytes per mail".
PAGE_SIZE = 2048
WAL_SIZE_LIMIT = 64 << 20  # bytes the WAL is cut back to after a full checkpoint

# The body is written once, by add(), in a table of its own: a state change (claim,
# sent, defer, fail) rewrites the whole messages row, and with a 20 KB body inline
# that meant 20 KB more in the WAL each time. sent() deletes it; failed keep theirs.
_BODIES = """CREATE TABLE IF NOT EXISTS bodies (
    id TEXT PRIMARY KEY NOT NULL,       -- messages.id
    body BLOB NOT NULL                  -- bytes as received
)"""
_MESSAGES = """CREATE TABLE IF NOT EXISTS {table} (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,           -- JSON list: the recipients still to deliver to
    size INTEGER NOT NULL,              -- len(body) as received
    message_id TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    due_at REAL NOT NULL,
    claimed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    rule TEXT,
    route TEXT,
    ses_message_id TEXT,
    reply TEXT,
    fallback_reason TEXT,
    updated_at REAL NOT NULL,
    trace BLOB NOT NULL,                -- our Received: line, CRLF-terminated
    reports_on TEXT,                    -- a DSN's row: the queue id of the mail it reports on
    retried_at REAL,                    -- the last `relay queue retry` of it as a dead letter
    lane TEXT                           -- 'ses': set aside while SES's lane was full (below)
)"""
_MESSAGES_DUE = "CREATE INDEX IF NOT EXISTS messages_due ON messages (state, due_at)"
# What claim() scans: only waiting rows, already in due order, so claiming stays
# cheap with 100,000 deferred messages (no sort of the whole queue per claim).
# Also made at every open: spools of version 1 were created without it.
# Version 5: a mail the delivery process classified for SES while SES's lane was full
# (every slot it may hold waiting for the pace) goes back to `queued` with `lane = 'ses'`
# (rows.park), so the claims that follow pass it by and the original host's mail behind it
# goes out; it is claimed from `messages_parked` once the lane has room. A new mail has no
# lane: add() writes no entry in messages_parked.
_MESSAGES_READY = """CREATE INDEX IF NOT EXISTS messages_ready ON messages (due_at, id)
    WHERE state IN ('queued', 'deferred') AND lane IS NULL"""
_MESSAGES_PARKED = """CREATE INDEX IF NOT EXISTS messages_parked ON messages (due_at, id)
    WHERE state IN ('queued', 'deferred') AND lane IS NOT NULL"""
# Version 3: a DSN row names the mail it reports on (`relay queue show` both ways); SES
# events find their mail by the MessageId recorded at send; `feedback` remembers which
# SES events were applied, so one that comes again (SQS delivers at least once) is not.
# Both partial: an ordinary mail has neither (NULL), so add() writes no entry in them, two
# pages fewer of the 13 a 4 KB mail puts in the WAL. `x = ?` implies `x IS NOT NULL`, so
# SQLite uses them for the lookups. Spools made before had full indexes under the names in
# _FULL_INDEXES; prepare() replaces them.
_REPORTS_ON = """CREATE INDEX IF NOT EXISTS messages_reporting ON messages (reports_on)
    WHERE reports_on IS NOT NULL"""
_SES_ID = """CREATE INDEX IF NOT EXISTS messages_by_ses_id ON messages (ses_message_id)
    WHERE ses_message_id IS NOT NULL"""
_FULL_INDEXES = ("messages_reports_on", "messages_ses_id")
# `feedback` also marks each recipient SES failed for good (kind "failed", key
# "failed/<queue id>/<address>"): relay.spool.feedback moves a mail to `bounced` once all
# of its recipients are marked; and each it delivered to (kind "delivered", likewise), so
# no delay warning follows. Rows, not a column, so no new schema version for them.
_FEEDBACK = """CREATE TABLE IF NOT EXISTS feedback (
    key TEXT PRIMARY KEY NOT NULL,      -- the SES event's identity (type, MessageId, id)
    queue_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT ''       -- bounce (permanent), complaint, or other: for the rates
)"""
_V3 = (_REPORTS_ON, _SES_ID, _FEEDBACK)
# Version 4: a dead letter that `relay queue retry` queues again gets a fresh retry.max_age
# (and ses.fallback_after) from then on, not one measured from its arrival, long past.
_V4 = "ALTER TABLE messages ADD COLUMN retried_at REAL"
_V5 = (
    "ALTER TABLE messages ADD COLUMN lane TEXT",
    "DROP INDEX IF EXISTS messages_ready",  # made again below, without the parked rows
    _MESSAGES_READY,
    _MESSAGES_PARKED,
)
_SCHEMA = (
    _MESSAGES.format(table="messages"),
    _MESSAGES_DUE,
    _MESSAGES_READY,
    _MESSAGES_PARKED,
    _BODIES,
    """CREATE TABLE IF NOT EXISTS events (
    queue_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
)""",
    "CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id, at)",
    *_V3,
)
_V2_COLUMNS = (
    "id, state, sender, recipients, size, message_id, peer, received_at, due_at, claimed_at,"
    " attempts, rule, route, ses_message_id, reply, fallback_reason, updated_at, trace"
)
# From each older version straight to SCHEMA_VERSION (0: a new file).
_UPGRADES = {
    0: _SCHEMA,
    1: (  # bodies were messages.body, NULL once sent
        _BODIES,
        "INSERT INTO bodies (id, body) SELECT id, body FROM messages WHERE body IS NOT NULL",
        # A new table rather than DROP COLUMN, which fails on version 1's CREATE TABLE text
        # (the comment after its last column's comma swallows the closing parenthesis).
        _MESSAGES.format(table="messages_v2"),
        f"INSERT INTO messages_v2 ({_V2_COLUMNS}) SELECT {_V2_COLUMNS} FROM messages",
        "DROP TABLE messages",  # and its indexes
        "ALTER TABLE messages_v2 RENAME TO messages",
        _MESSAGES_DUE,
        _MESSAGES_READY,
        _MESSAGES_PARKED,
        *_V3,
    ),
    2: ("ALTER TABLE messages ADD COLUMN reports_on TEXT", *_V3, _V4, *_V5),
    3: (_V4, *_V5),
    4: _V5,
}


def prepare(directory: Path) -> None:
    """Create or upgrade the spool in `directory` (mode 0700, file 0600), in WAL mode."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / DB_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if schema_version(conn, path) == 0:
            # Before the first table and before WAL (page_size first), or they do not
            # take effect.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if schema_version(conn, path) < SCHEMA_VERSION:
            upgrade(conn, path)
        check_columns(conn, path)
        conn.execute(_MESSAGES_READY)
        if conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name IN (?, ?)", _FULL_INDEXES
        ).fetchone():
            replace_full_indexes(conn)
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    os.chmod(path, 0o600)


def check_columns(conn: sqlite3.Connection, path: Path) -> None:
    """SpoolError naming what is missing when a table lacks a column this relay uses: the
    version number said current, but a development build that gave the same number to
    another change wrote it. Relay answered 250 and never delivered ("no such column")."""
    missing = [
        f"{table}.{column}"
        for table, columns in _expected_columns().items()
        for column in sorted(columns - _columns(conn, table))
    ]
    if missing:
        raise SpoolError(
            f"spool {path} (schema version {schema_version(conn, path)}) lacks"
            f" {', '.join(missing)}: a development build of relay wrote it; move it aside,"
            " or send its mail with the relay that wrote it"
        )


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


@functools.cache
def _expected_columns() -> dict[str, frozenset[str]]:
    """Every table's columns as a new spool has them."""
    conn = sqlite3.connect(":memory:")
    try:
        for statement in _UPGRADES[0]:
            conn.execute(statement)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: frozenset(_columns(conn, table)) for table in tables}
    finally:
        conn.close()


def schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The spool's schema version; SpoolError if a newer relay wrote it."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool {path} has schema version {version}; this relay knows versions up to"
            f" {SCHEMA_VERSION}: run the newer relay that wrote it"
        )
    return version


@contextlib.contextmanager
def all_or_nothing(conn: sqlite3.Connection) -> Iterator[None]:
    """One transaction under SQLite's write lock: committed, or rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction: all of it or nothing. Said
    in the log first (a large spool takes seconds, while nothing listens), with systemd's
    start timeout pushed back as it runs."""
    size = path.stat().st_size if path.exists() else 0
    free = _free_bytes(path.parent)  # before: a failed try leaves its WAL filling the disk
    last = time.monotonic()

    def extend() -> int:
        nonlocal last
        if time.monotonic() - last >= EXTEND_EVERY:
            last = time.monotonic()
            sdnotify.notify(
                f"EXTEND_TIMEOUT_USEC={int(EXTEND_FOR * 1e6)}", wait=sdnotify.STATE_WAIT
            )
        return 0  # go on

    try:
        with all_or_nothing(conn):
            # Read again under the write lock: the other relay process may have just done it.
            version = schema_version(conn, path)
            if version and version < SCHEMA_VERSION:
                log.warning(
                    "event=spool_upgrade path=%s from=%d to=%d bytes=%d (one transaction;"
                    " a large spool takes a while and needs about twice its size free)",
                    path,
                    version,
                    SCHEMA_VERSION,
                    size,
                )
                sdnotify.notify(
                    f"EXTEND_TIMEOUT_USEC={int(EXTEND_FOR * 1e6)}", wait=sdnotify.STATE_WAIT
                )
                conn.set_progress_handler(extend, 100_000)
            for statement in _UPGRADES.get(version, ()):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF != 13:  # SQLITE_FULL
            raise
        raise SpoolError(
            f"cannot upgrade spool {path} ({size} bytes; nothing changed): {exc};"
            f" {free} bytes were free. The upgrade writes the spool again in one transaction:"
            " free about twice its size"
        ) from exc
    finally:
        conn.set_progress_handler(None, 0)


def replace_full_indexes(conn: sqlite3.Connection) -> None:
    """The partial indexes in place of the full ones of older spools, in one transaction."""
    with all_or_nothing(conn):
        for name in _FULL_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        conn.execute(_REPORTS_ON)
        conn.execute(_SES_ID)


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the spool's settings: WAL, synchronous=FULL, busy timeout,
    secure_delete=FAST."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    # Debian's SQLite is built with secure_delete on: deleting a sent mail's body wrote each
    # of its overflow pages again, zeroed, to the WAL (a 20 KB mail's sent() 21 pages, 12
    # without), and relay serve's next fsync wrote them out. FAST zeroes only what is being
    # written anyway; a body's bytes then stay in free pages of this 0600 file until they
    # are reused or vacuumed, as a Postfix queue file's stay on disk after its unlink.
    conn.execute("PRAGMA secure_delete = FAST")
    # The WAL is cut back to this once a checkpoint has copied it all: it kept the size of
    # its biggest burst (spilled bodies of megabytes), space the spool's disk then lacked.
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return conn


def reader(path: Path, *, mode: str = "mode=ro", timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to the database file at `path`, by a percent-encoded URI: a
    `#`, `?` or `%` in a directory name read as the URI's own (`?` lost `mode=ro`, and a
    stray file was made)."""
    uri = f"{path.absolute().as_uri()}?{mode}"
    return sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)


def open_read_only(directory: Path) -> sqlite3.Connection:
    """The spool read-only, for `relay queue`'s reading commands when `open_existing`
    cannot open it: the disk is full (WAL's files cannot be made) or the file system was
    remounted read-only, which is when an admin most needs to see the queue. `immutable`,
    the last resort, takes no locks: right for a spool no service is writing."""
    path = directory / DB_NAME
    last: sqlite3.Error | None = None
    for mode in ("mode=ro", "immutable=1"):
        try:
            conn = reader(path, mode=mode)
            conn.row_factory = sqlite3.Row
            schema_version(conn, path)
            return conn
        except sqlite3.Error as exc:
            last = exc
    raise SpoolError(f"cannot open spool {path} read-only either: {last}")


def _free_bytes(directory: Path) -> int:
    try:
        fs = os.statvfs(directory)
    except OSError:
        return 0
    return fs.f_bavail * fs.f_frsize


def disk_state(directory: Path) -> str:
    """What the spool's file system says of itself when opening failed: SQLite says "disk
    I/O error" for a full disk and "unable to open database file" for a read-only one."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return ""
    if fs.f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    free = fs.f_bavail * fs.f_frsize
    if free < 1024 * 1024:
        return f"the disk is full ({free} bytes free)"
    return ""


def existing(directory: Path) -> Path | None:
    """The spool's database file in `directory`, None when there is none; SpoolError when
    the directory cannot be read (the unit's StateDirectoryMode=0700: another user)."""
    path = directory / DB_NAME
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        why = exc.strerror
    else:
        if not regular:
            return None
        if os.access(path, os.R_OK):
            return path
        why = "Permission denied"  # the file relay made is its user's alone (0600)
    raise SpoolError(
        f"cannot read {path}: {why}: run this as the user relay serve runs as, or as root"
    )


def open_existing(directory: Path) -> sqlite3.Connection:
    """For `relay queue`: the spool of a (possibly running) service.

    SpoolError if it is absent or its schema is not this relay's version.
    """
    path = directory / DB_NAME
    if existing(directory) is None:
        raise SpoolError(f"no spool at {path} (has the service ever started?)")
    try:
        conn = connect(path)
    except sqlite3.Error as exc:
        why = disk_state(directory)
        raise SpoolError(f"cannot open spool {path}: {exc}{f'; {why}' if why else ''}") from exc
    try:
        conn.row_factory = sqlite3.Row
        version = schema_version(conn, path)
        if version < SCHEMA_VERSION:
            # Upgrading here could pull the tables from under an older service still running.
            raise SpoolError(
                f"spool {path} has schema version {version}, older than this relay's"
                f" {SCHEMA_VERSION}: start the service (relay serve) once to upgrade it"
            )
    except sqlite3.Error as exc:
        conn.close()
        raise SpoolError(f"cannot open spool {path}: {exc}") from exc
    except SpoolError:
        conn.close()
        raise
    return conn
