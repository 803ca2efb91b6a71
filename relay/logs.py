"""Logging setup: one line per event, as readable `key=value` text or as JSON lines.

Modules log with the standard `logging` API. Structured events go through
`event()`, which writes `event=NAME key=value ...` as the message (the same
shape the rest of the code writes by hand) and attaches the fields, so the
JSON formatter can emit them as JSON keys:

    logs.event(log, "accepted", id=qid, peer="127.0.0.1", size=1234)
    text: 2026-01-02T03:04:05.678Z INFO relay.receive event=accepted id=... peer=127.0.0.1 ...
    json: {"ts": "...", "level": "INFO", "logger": "relay.receive", "event": "accepted", ...}

Passwords never reach a log line: relay does not log them, and aiosmtpd's own
per-command logger (`mail.log`, which would print AUTH PLAIN blobs at INFO) is
held at WARNING.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "relay_fields"


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
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
            "ts": _timestamp(record), "level": record.levelname, "logger": record.name,
        }  # fmt: skip
        fields = getattr(record, _FIELDS, None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(log_format: str, *, level: int = logging.INFO) -> None:
    """Send every log line to stderr as `text` or `json`; replaces earlier setup."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiosmtpd logs every command line (AUTH blobs included) at INFO: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    for noisy in ("asyncio", "botocore", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
