"""Logging setup: one line per event, as readable `key=value` text or as JSON lines.

Modules log with the standard `logging` API. Structured events go through
`event()`, which writes `event=NAME key=value ...` as the message (the same
shape the rest of the code writes by hand) and attaches the fields, so the
JSON formatter can emit them as JSON keys:

    logs.event(log, "accepted", id=qid, peer="127.0.0.1", size=1234)
    text: 2026-01-02T03:04:05.678Z INFO relay.receive event=accepted id=... peer=127.0.0.1 ...
    json: {"ts": "...", "level": "INFO", "logger": "relay.receive", "event": "accepted", ...}

Lines are formatted and written by a thread of their own (`_Writer`): a slow
stderr (journald, a full pipe) never holds up an SMTP reply. A line logged while
that thread is idle is written at once; the thread then rests GATHER, and the
lines logged meanwhile go out together in one write. So a busy relay wakes it
about 20 times a second instead of once per line (each wake cost both processes
CPU their event loops need: bench/README.md, "Log lines in bursts"). `flush()`
waits until what is queued is written (relay serve calls it before it says it
is ready). Records carry no caller, thread or process details: no formatter
prints them, and collecting them is a good part of a log call's cost.

Passwords never reach a log line: relay does not log them, and aiosmtpd's own
per-command logger (`mail.log`, which would print AUTH PLAIN blobs at INFO) is
held at WARNING.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import Any, TextIO

_FIELDS = "relay_fields"
GATHER = 0.05  # seconds the writer thread rests after a write; lines logged meanwhile wait
MAX_QUEUED = 10_000  # lines waiting for a stream that does not drain; more are counted, and
# dropped (a stalled journald or pipe grew the process by 1.7 KB a line, without end)


def _quote(value: object) -> str:
    """`value` as one token of a line: as it is, or quoted as JSON; with a character that
    is not printable, every non-ASCII one escaped too (\\u2028, \\x85: what splitlines()
    and some log viewers take for a line end, so a client's AUTH name could start a
    line of its own), and DEL."""
    text = str(value)
    if not text.isprintable():
        return json.dumps(text).replace("\x7f", "\\u007f")
    if text == "" or any(c in text for c in ' "=\\'):
        return json.dumps(text, ensure_ascii=False)
    return text


def event(logger: logging.Logger, name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; `fields` become `key=value` pairs (or JSON keys)."""
    if not logger.isEnabledFor(level):
        return
    text = " ".join([f"event={name}", *(f"{k}={_quote(v)}" for k, v in fields.items())])
    logger.log(level, text, extra={_FIELDS: {"event": name, **fields}})


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, _FIELDS, None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _Handoff(logging.handlers.QueueHandler):
    """Queues the record as it is; the writer thread formats it (QueueHandler's own
    `prepare` would format here, on the event loop). Past MAX_QUEUED waiting, a record is
    dropped and counted; the writer says how many once it writes again."""

    def __init__(self, records: queue.SimpleQueue[_Queued], dropped: _Dropped) -> None:
        super().__init__(records)
        self.records = records
        self.dropped = dropped

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.records.qsize() >= MAX_QUEUED:
            self.dropped.add()
            return
        super().enqueue(record)


class _Dropped:
    """Lines dropped while the queue was full (added on the logging side, taken by the
    writer thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        with self._lock:
            self._count += 1

    def record(self) -> logging.LogRecord | None:
        """A line saying how many were dropped since the last, if any were."""
        with self._lock:
            count, self._count = self._count, 0
        if not count:
            return None
        name = "log_lines_dropped"
        text = f"event={name} count={count} max_queued={MAX_QUEUED}"
        record = logging.LogRecord("relay.logs", logging.WARNING, "", 0, text, None, None)
        setattr(record, _FIELDS, {"event": name, "count": count, "max_queued": MAX_QUEUED})
        return record


# In the writer's queue: a log record; an Event from flush() (set once all before it is
# written); None (write what is queued, then end).
_Queued = logging.LogRecord | threading.Event | None


STOP_WAIT = 2.0  # seconds the log writer gets at exit to write out what is queued


class _Writer(threading.Thread):
    """Formats the queued records with `handler` and writes them to its stream, in bursts."""

    def __init__(
        self,
        records: queue.SimpleQueue[_Queued],
        handler: logging.StreamHandler[TextIO],
        dropped: _Dropped,
    ) -> None:
        super().__init__(name="relay-log", daemon=True)
        self.records = records
        self.handler = handler
        self.dropped = dropped

    def stop(self) -> None:
        """Write out what is queued, then end; at most STOP_WAIT seconds: a stream nobody
        reads (journald stalled, a pipe) held relay serve after SIGTERM until SIGKILL."""
        self.records.put(None)
        self.join(timeout=STOP_WAIT)

    def run(self) -> None:
        while True:
            burst = [self.records.get()]  # idle until a line comes: it is written at once
            while True:
                try:
                    burst.append(self.records.get_nowait())
                except queue.Empty:
                    break
            said = self.dropped.record()
            records = [item for item in burst if isinstance(item, logging.LogRecord)]
            self._write(records if said is None else [said, *records])
            for item in burst:
                if isinstance(item, threading.Event):
                    item.set()
            if None in burst:
                return
            time.sleep(GATHER)

    def _write(self, records: list[logging.LogRecord]) -> None:
        lines = []
        for record in records:
            try:
                lines.append(self.handler.format(record) + self.handler.terminator)
            except Exception:
                self.handler.handleError(record)
        if not lines:
            return
        try:
            self.handler.stream.write("".join(lines))
            self.handler.flush()
        except Exception:
            self.handler.handleError(records[-1])


_writer: _Writer | None = None


def flush(timeout: float = 1.0) -> None:
    """Wait until the lines logged so far are written (at most `timeout` seconds)."""
    if _writer is None:
        return
    done = threading.Event()
    _writer.records.put(done)
    done.wait(timeout)


def _stop_writer() -> None:
    """Write out what is queued and stop the writer thread (at exit, or on a new setup);
    lines logged after that are written directly."""
    global _writer
    if _writer is None:
        return
    _writer.stop()
    if _writer.is_alive():  # stuck on a stream nobody reads: writing there would block too
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Handoff):
            root.removeHandler(handler)
            root.addHandler(_writer.handler)
    _writer = None


def setup(log_format: str, *, level: int = logging.INFO) -> None:
    """Send every log line to stderr as `text` or `json`; replaces earlier setup."""
    global _writer
    _stop_writer()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    records: queue.SimpleQueue[_Queued] = queue.SimpleQueue()
    dropped = _Dropped()
    _writer = _Writer(records, stream, dropped)
    _writer.start()
    atexit.unregister(_stop_writer)
    atexit.register(_stop_writer)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record (see the logging HOWTO, "Optimization")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_Handoff(records, dropped))
    root.setLevel(level)
    # aiosmtpd logs every command line (AUTH blobs included) at INFO: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    for noisy in ("asyncio", "botocore", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Sampled:
    """An event logged at most once per `interval` seconds, with how many happened.

    For events a client can cause at will (a refused connection, accept() out of file
    descriptors): the first one is logged at once, later ones within the interval are
    only counted, and the next line carries the count (`count=`).
    """

    def __init__(
        self, logger: logging.Logger, name: str, *, interval: float = 10.0, **fixed: Any
    ) -> None:
        self.logger = logger
        self.name = name
        self.interval = interval
        self.fixed = fixed
        self._count = 0
        self._next = 0.0

    def __call__(self, *, level: int = logging.WARNING, **fields: Any) -> None:
        self._count += 1
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        event(self.logger, self.name, level=level, **self.fixed, count=self._count, **fields)
        self._count = 0


class SampledByText(logging.Filter):
    """A logger's records sampled as `Sampled` samples an event, one kind (the unformatted
    text) at a time: for a library's lines a client can cause at will (aiosmtpd warns of
    every AUTH a client cancels with "*"). A line after some were left out says how many.
    A line with a character that is not printable (the client's words in it) is escaped
    as `_quote` escapes a field."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._next: dict[object, float] = {}  # one per text the library has: bounded
        self._count: dict[object, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:  # relay serve does not log those (setup)
            return True
        kind = record.msg
        self._count[kind] = self._count.get(kind, 0) + 1
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            return False
        self._next[kind] = now + self.interval
        count = self._count.pop(kind)
        text = record.getMessage()  # with the client's words ("%r unrecognised: %s")
        if not text.isprintable():  # a CR, NUL or ESC of theirs must not start a line of its own
            record.msg, record.args = json.dumps(text)[1:-1].replace("\x7f", "\\u007f"), None
        if count > 1 and isinstance(record.msg, str):
            record.msg = f"{record.msg} (count={count}: {count - 1} left out since the last)"
        return True
