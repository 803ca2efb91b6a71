"""`relay check-rules`: classify saved messages with a rules file, sending nothing.

Off the data path: it lets an admin try rules.yaml on real mail first. A saved
.eml has no envelope, so one is derived from its headers: the sender is the
`Return-Path` address if there is one, else the first `From` address; the
recipients are the `To` and `Cc` addresses. Rules on `sender`/`recipient` see
those, not what Moodle gave at MAIL FROM / RCPT TO.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from email.utils import getaddresses
from pathlib import Path

import click

from relay import rules, settings
from relay.errors import ConfigError, Problem
from relay.mail import Mail

STDIN = Path("-")
IRREGULAR = "not a regular file (a pipe, a device): not read"
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
_REGEX_PART = re.compile(r" matches '[^']*'")
_HEADERS = BytesParser(policy=policy.compat32)


@dataclass(frozen=True, slots=True)
class _Input:
    source: str
    raw: bytes | None = None
    error: str = ""


def run(
    rules_path: Path | None, paths: Sequence[Path], *, as_json: bool, config: Path | None = None
) -> int:
    """Classify every message under `paths`; 0 if all were read, 1 if not (or bad rules)."""
    try:
        ruleset = rules.load(rules_path or _rules_in_use(config))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        return 1
    for warning in ruleset.warnings:
        click.echo(f"warning: {warning}", err=True)
    counts = {"ses": 0, "upstream": 0, "unreadable": 0}
    rows: list[tuple[str, str, str, str]] = []
    for item in _inputs(paths):
        error = item.error or (_unreadable(item.raw) if item.raw is not None else "no data")
        if error or item.raw is None:
            counts["unreadable"] += 1
            if as_json:
                click.echo(json.dumps({"source": item.source, "error": error}))
            else:
                click.echo(f"{item.source}: {error}", err=True)
            continue
        decision = ruleset.classify(_mail(item.source, item.raw))
        counts[decision.route.value] += 1
        if as_json:
            record = {"source": item.source, "rule": decision.rule, "route": decision.route.value}
            click.echo(json.dumps({**record, "reasons": list(decision.reasons)}))
        else:
            reasons = ", ".join(_REGEX_PART.sub("", r) for r in decision.reasons)
            route = decision.route.value
            rows.append((item.source, decision.rule or "-", route, reasons or "(default route)"))
    if not as_json:
        _table(rows)
        total = sum(counts.values())
        click.echo(
            f"{total} messages: {counts['ses']} ses, {counts['upstream']} upstream, "
            f"{counts['unreadable']} unreadable (rules: {ruleset.source})"
        )
    return 1 if counts["unreadable"] else 0


def _rules_in_use(config: Path | None) -> Path:
    """The rules relay serve would use: those of the relay.yaml `relay serve` would read
    (--config, $RELAY_CONFIG, ./relay.yaml, /etc/relay/relay.yaml) where there is one; else
    ./rules.yaml; else the shipped defaults. Without this an admin on a server tried the
    shipped rules, not the ones their relay.yaml names, and saw other routes than relay's."""
    found = settings.find_config(config)
    if config is not None or os.environ.get("RELAY_CONFIG") or found.exists():
        named = settings.rules_of(found)
        if named is None:
            why = "cannot be read, or rules: is not a file name (try relay check-config)"
            if not found.exists():
                why = "no such file (--config or $RELAY_CONFIG)"
            raise ConfigError([Problem(file=str(found), line=None, key="", message=why)])
        return named
    return Path("rules.yaml") if Path("rules.yaml").exists() else rules.DEFAULT_RULES


def _table(rows: list[tuple[str, str, str, str]]) -> None:
    """Aligned columns; the regexes are left out of the reasons (`--json` has them)."""
    header = ("SOURCE", "RULE", "ROUTE", "REASONS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for source, rule, route, reasons in [header, *rows]:
        cells = (source.ljust(widths[0]), rule.ljust(widths[1]), route.ljust(widths[2]), reasons)
        click.echo("  ".join(cells))


def _printable(path: Path | str) -> str:
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _inputs(paths: Sequence[Path]) -> Iterator[_Input]:
    """Each message to classify, or the reason a path gave none; never stops early."""
    for path in paths:
        if path == STDIN:
            yield _read_stdin()
        elif path.is_dir():
            found = sorted(_eml_files(path))
            if not found:
                yield _Input(_printable(path), error="no .eml files in this directory")
            for file in found:  # a pipe or a device named *.eml would block or never end
                yield _read(file) if file.is_file() else _Input(_printable(file), error=IRREGULAR)
        else:
            yield _read(path)


def _eml_files(top: Path) -> Iterator[Path]:
    for folder, _dirs, files in os.walk(top):  # does not follow symlinked directories
        for name in files:
            if name.lower().endswith(".eml"):
                yield Path(folder, name)


def _read(path: Path) -> _Input:
    try:
        return _Input(_printable(path), raw=path.read_bytes())
    except OSError as exc:
        return _Input(_printable(path), error=f"cannot read: {exc.strerror or exc}")


def _read_stdin() -> _Input:
    try:
        return _Input("-", raw=sys.stdin.buffer.read())
    except OSError as exc:
        return _Input("-", error=f"cannot read standard input: {exc}")


def _unreadable(raw: bytes) -> str:
    """Why `raw` is not an email message, or "" when it looks like one."""
    if not raw.strip():
        return "empty"
    if b"\x00" in raw:
        return "binary data, not an email message"
    if not _HEADER_LINE.match(_strip_mbox_line(raw)):
        return "not an email message: it does not start with a header line"
    return ""


def _strip_mbox_line(raw: bytes) -> bytes:
    """`raw` without a leading mbox "From " separator line, which some mail clients save."""
    if raw.startswith(b"From "):
        return raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    return raw


def _mail(source: str, raw: bytes) -> Mail:
    body = _strip_mbox_line(raw)
    sender, recipients = _envelope(body)
    return Mail(id=source, sender=sender, recipients=recipients, raw=body)


def _envelope(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """(sender, recipients) from Return-Path or From, and To and Cc."""
    try:
        headers = _HEADERS.parsebytes(raw, headersonly=True)

        def addresses(*names: str) -> list[str]:
            values = [str(v) for name in names for v in headers.get_all(name, [])]
            return [addr for _name, addr in getaddresses(values) if addr]

        return_path = str(headers.get("Return-Path", "")).strip()
        if return_path == "<>":
            return "", tuple(addresses("To", "Cc"))
        sender = (addresses("Return-Path") or addresses("From") or [""])[0]
        return sender, tuple(addresses("To", "Cc"))
    except Exception:  # a header we cannot split leaves the envelope empty, not the run
        return "", ()
