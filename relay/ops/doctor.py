"""`relay doctor`: live checks of everything the relay depends on, one line per check.

    ok    config    relay.yaml and rules.yaml load (3 rules)
    FAIL  upstream  127.0.0.1:2526: connection refused

Checks, in order: config and rules load (stop there if not); spool writable;
original host (EHLO, STARTTLS, AUTH as configured; no mail sent; relay.ops.upstreamcheck,
which also warns of clear text to another machine); SES account
(credentials via GetSendQuota, quota, sending enabled, sandbox), each sender and From
domain once (a verified parent domain covers it), configuration sets, the DKIM-Signature
of sample mail (`--sample`, else SES-bound mail still in the spool; relay.ops.sescheck);
DNS of the verified identities (relay.ops.dnscheck: SPF of a custom MAIL FROM domain
only, Easy DKIM CNAMEs, DMARC); with
`ses.events.queue_url`, the SES events queue, the configuration sets' event
destinations and the bounce and complaint rates (relay.ops.feedbackcheck). `warn` marks
what could not be asked; it does not fail the run. Exit 1 when any line is FAIL.
Credentials are never printed: every line is scrubbed of the AWS keys and the upstream
password.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
import dns.exception

from relay import rules
from relay import settings as settings_mod
from relay.errors import ConfigError, DeliveryError, SpoolError
from relay.mail import Mail
from relay.ops import dnscheck, feedbackcheck, sescheck, upstreamcheck
from relay.receive.data import free_bytes
from relay.rules import Route, RuleSet
from relay.settings import Settings
from relay.spool import existing, reader, state_counts

OK, WARN, FAIL = "ok", "warn", "FAIL"
SENDER_WINDOW = 7 * 86400.0  # spool rows this recent name the senders to check
SPOOL_SAMPLES = 20  # SES-bound mails in the spool whose From and DKIM-Signature are checked
MAX_DETAIL = 300  # characters of a detail shown; an HTML error page is not useful
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

T = TypeVar("T")


@dataclass(slots=True)
class Report:
    """Prints check lines, scrubbed of secrets; remembers whether any failed."""

    secrets: tuple[str, ...] = ()
    failed: bool = False

    def line(self, status: str, check: str, detail: str) -> None:
        detail = " ".join(detail.split())  # SES and SMTP replies may span lines
        text = f"{status:<6}{check:<10}{detail[:MAX_DETAIL]}"
        for secret in self.secrets:
            text = text.replace(secret, "***")
        click.echo(text)
        self.failed = self.failed or status == FAIL

    def check(self, good: bool, check: str, ok_text: str, fail_text: str) -> None:
        self.line(OK if good else FAIL, check, ok_text if good else fail_text)

    async def ask(self, check: str, what: str, call: Awaitable[T]) -> T | None:
        """Await one SES call; on failure a FAIL line with SES's reply and None."""
        try:
            return await call
        except DeliveryError as exc:
            self.line(FAIL, check, f"{what}: {exc.reply}")
            return None


def run(
    config_path: Path,
    *,
    senders: Sequence[str],
    nameserver: str | None,
    samples: Sequence[Path] = (),
) -> int:
    """Entry point of `relay doctor`: 0 when nothing failed, 1 otherwise. `samples` are
    .eml files whose From identity and DKIM-Signature are checked."""
    read = [(path.name, path.read_bytes()) for path in samples]
    return asyncio.run(_run(config_path, tuple(senders), nameserver, read))


async def _run(
    config_path: Path,
    senders: tuple[str, ...],
    nameserver: str | None,
    samples: list[tuple[str, bytes]],
) -> int:
    report = Report()
    try:
        settings = settings_mod.load(config_path)
        ruleset = rules.load(settings.rules, ses_region=settings.ses.region)
    except ConfigError as exc:
        for problem in exc.problems:
            report.line(FAIL, "config", str(problem))
        return 1
    report.secrets = _secrets(settings)
    problems = settings_mod.check_listen_env(settings)
    for text in problems:
        report.line(FAIL, "config", text)
    if not problems:
        names = f"{config_path.name} and {settings.rules.name}"
        count = len(ruleset.rules)
        report.line(OK, "config", f"{names} load ({count} rule{'s' * (count != 1)})")
    for warning in ruleset.warnings:
        report.line(WARN, "rules", warning)
    seen = await asyncio.to_thread(_spool, report, settings.spool, settings.limits.spill_min_free)
    for line in await upstreamcheck.lines(settings):
        report.line(*line)
    if not settings.ses.enabled:
        report.line(OK, "ses", "disabled (ses.enabled: false); SES and DNS checks skipped")
        return int(report.failed)
    sets = [settings.ses.configuration_set, *(r.configuration_set for r in ruleset.rules)]
    config_sets = list(dict.fromkeys(n for n in sets if n))
    if not samples:  # mail still in the spool (sent mail keeps no body) that goes to SES
        samples = await asyncio.to_thread(_spool_samples, settings.spool, ruleset)
    found = await sescheck.check(settings.ses, config_sets, senders or seen, samples)
    for line in found.lines:
        report.line(*line)
    dkim = await dnscheck.dkim_tokens(settings.ses, found.identities)
    await _dns(report, found, dkim, nameserver)
    for line in await feedbackcheck.lines(settings, config_sets, found.identities):
        report.line(*line)
    return int(report.failed)


def _secrets(settings: Settings) -> tuple[str, ...]:
    values = [os.environ.get(name, "") for name in SECRET_ENV]
    with contextlib.suppress(OSError):
        values.append(settings.upstream.password() or "")
    return tuple(v for v in values if len(v) >= 4)


def _spool(report: Report, directory: Path, reserve: int) -> tuple[str, ...]:
    """A temp-file write in the spool directory, a read-only look at the database, and a
    warning when its file system has less free than `reserve` (limits.spill_min_free).

    Returns the envelope senders of the last SENDER_WINDOW: those routed to SES, else all.
    """
    target = directory
    while not target.exists() and target != target.parent:
        target = target.parent  # the service creates missing directories at start
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".doctor-") as probe:
            probe.write(b"relay doctor write test\n")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        report.line(FAIL, "spool", f"{target}: cannot write: {exc.strerror or exc}")
        return ()
    free = free_bytes(target)
    if free < reserve:
        report.line(
            WARN,
            "spool",
            f"{target}: {free >> 20} MiB free, under limits.spill_min_free ({reserve >> 20} MiB):"
            " DATA past max_data_in_memory is refused (452 4.3.1); free disk space, as the"
            " spool stops taking mail when the disk is full",
        )
    try:
        db = existing(directory)
    except SpoolError as exc:
        report.line(FAIL, "spool", str(exc))
        return ()
    if db is None:
        report.line(OK, "spool", f"{directory}: writable; no database yet (made at first start)")
        return ()
    sql = (
        "SELECT sender, max(route = 'ses') FROM messages WHERE received_at >= ?"
        " AND sender != '' GROUP BY sender ORDER BY sender"
    )
    try:
        with contextlib.closing(reader(db)) as c:
            counts = state_counts(c)
            rows = c.execute(sql, (time.time() - SENDER_WINDOW,)).fetchall()
    except sqlite3.Error as exc:
        report.line(FAIL, "spool", f"{db}: cannot read: {exc}")
        return ()
    summary = ", ".join(f"{counts[s]} {s}" for s in ("queued", "deferred", "failed", "bounced"))
    report.line(OK, "spool", f"{db}: writable and readable; {summary}")
    return tuple(s for s, ses in rows if ses) or tuple(s for s, _ in rows)


def _spool_samples(directory: Path, ruleset: RuleSet) -> list[tuple[str, bytes]]:
    """The last SPOOL_SAMPLES mails in the spool that still have their bytes (not sent yet,
    deferred or dead letters) and that the rules route to SES, as (name, bytes)."""
    try:
        db = existing(directory)
    except SpoolError:
        return []  # _spool has said why
    if db is None:
        return []
    sql = (
        "SELECT m.id, m.sender, m.recipients, b.body FROM messages m JOIN bodies b"
        " ON b.id = m.id WHERE m.sender != '' ORDER BY m.received_at DESC LIMIT ?"
    )
    try:
        with contextlib.closing(reader(db)) as c:
            rows = c.execute(sql, (SPOOL_SAMPLES * 10,)).fetchall()
    except sqlite3.Error:
        return []  # _spool has said why
    found = []
    for queue_id, sender, recipients, body in rows:
        try:
            mail = Mail(
                id=queue_id,
                sender=sender,
                recipients=tuple(json.loads(recipients)),
                raw=bytes(body),
            )
        except (ValueError, TypeError):  # edited by hand: the delivery process fails it
            continue
        if ruleset.classify(mail).route is Route.SES:
            found.append((f"spool mail {queue_id}", bytes(body)))
    return found[:SPOOL_SAMPLES]


async def _dns(
    report: Report, found: sescheck.Found, dkim: dnscheck.Dkim | str, nameserver: str | None
) -> None:
    """Per verified identity: SPF of its custom MAIL FROM domain includes amazonses.com
    (none needed with SES's own MAIL FROM), Easy DKIM CNAMEs point to SES, a DMARC record."""
    try:
        resolver = dnscheck.resolver(nameserver)
    except (ValueError, dns.exception.DNSException) as exc:
        report.line(FAIL, "dns", f"cannot use nameserver {nameserver or '(system)'}: {exc}")
        return
    for domain in found.identities:
        known = found.mail_from
        probes: list[tuple[str, Callable[[], Awaitable[str]]]] = []
        custom = None if isinstance(known, str) else known.get(domain)
        if isinstance(known, str):
            report.line(WARN, "spf", f"{domain}: custom MAIL FROM unknown ({known}); not checked")
        elif custom is not None:
            probes.append(("spf", functools.partial(dnscheck.spf, resolver, custom)))
        else:
            report.line(
                OK, "spf", f"{domain}: SES's own MAIL FROM (amazonses.com); no SPF record needed"
            )
        probes.append(("dkim", functools.partial(dnscheck.easy_dkim, resolver, domain, dkim)))
        probes.append(("dmarc", functools.partial(dnscheck.dmarc, resolver, domain)))
        for check, probe in probes:
            try:
                report.line(OK, check, await probe())
            except dnscheck.RecordProblem as exc:
                report.line(WARN if exc.warning else FAIL, check, str(exc))
