"""`relay doctor`: live checks of everything the relay depends on, one line per check.

    ok    config    relay.yaml and rules.yaml load (3 rules)
    FAIL  upstream  127.0.0.1:2526: connection refused

Checks, in order: config and rules load (stop there if not); spool writable;
original host (EHLO, STARTTLS, AUTH as configured; no mail sent); SES account
(credentials via GetSendQuota, quota, sending enabled), sender identities,
configuration sets; DNS of the sender domains (relay.ops.dnscheck: SPF includes
amazonses.com, Easy DKIM CNAMEs, DMARC); with `ses.events.queue_url`, the SES events
queue, the configuration sets' event destinations and the bounce and complaint rates
(relay.ops.feedbackcheck). `warn` marks what could not be asked; it does not fail the
run. Exit 1 when any line is FAIL. Credentials are never printed: every line is
scrubbed of the AWS keys and the upstream password.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import ssl
import tempfile
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiosmtplib
import click
import dns.exception

from relay import rules
from relay import settings as settings_mod
from relay.deliver.ses import client as ses_mod
from relay.errors import ConfigError, DeliveryError
from relay.ops import dnscheck, feedbackcheck
from relay.rules import RuleSet
from relay.settings import Security, Settings
from relay.spool import DB_NAME, state_counts

OK, WARN, FAIL = "ok", "warn", "FAIL"
SMTP_TIMEOUT = 10.0  # seconds per SMTP step, at most
SENDER_WINDOW = 7 * 86400.0  # spool rows this recent name the senders to check
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


def run(config_path: Path, *, senders: Sequence[str], nameserver: str | None) -> int:
    """Entry point of `relay doctor`: 0 when nothing failed, 1 otherwise."""
    return asyncio.run(_run(config_path, tuple(senders), nameserver))


async def _run(config_path: Path, senders: tuple[str, ...], nameserver: str | None) -> int:
    report = Report()
    try:
        settings = settings_mod.load(config_path)
        ruleset = rules.load(settings.rules)
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
    seen = await asyncio.to_thread(_spool, report, settings.spool)
    await _upstream(report, settings)
    if not settings.ses.enabled:
        report.line(OK, "ses", "disabled (ses.enabled: false); SES and DNS checks skipped")
        return int(report.failed)
    senders = senders or seen
    if not senders:
        report.line(WARN, "identity", "no senders known: pass --sender")
    domains = list(dict.fromkeys(s.rpartition("@")[2].lower() for s in senders))
    dkim = await _ses(report, settings, ruleset, senders, domains)
    await _dns(report, domains, dkim, nameserver)
    sets = [settings.ses.configuration_set, *(r.configuration_set for r in ruleset.rules)]
    for line in await feedbackcheck.lines(settings, list(dict.fromkeys(n for n in sets if n))):
        report.line(*line)
    return int(report.failed)


def _secrets(settings: Settings) -> tuple[str, ...]:
    values = [os.environ.get(name, "") for name in SECRET_ENV]
    with contextlib.suppress(OSError):
        values.append(settings.upstream.password() or "")
    return tuple(v for v in values if len(v) >= 4)


def _spool(report: Report, directory: Path) -> tuple[str, ...]:
    """A temp-file write in the spool directory, a read-only look at the database.

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
    db = directory / DB_NAME
    if not db.is_file():
        report.line(OK, "spool", f"{directory}: writable; no database yet (made at first start)")
        return ()
    sql = (
        "SELECT sender, max(route = 'ses') FROM messages WHERE received_at >= ?"
        " AND sender != '' GROUP BY sender ORDER BY sender"
    )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            counts = state_counts(c)
            rows = c.execute(sql, (time.time() - SENDER_WINDOW,)).fetchall()
    except sqlite3.Error as exc:
        report.line(FAIL, "spool", f"{db}: cannot read: {exc}")
        return ()
    summary = ", ".join(f"{counts[s]} {s}" for s in ("queued", "deferred", "failed"))
    report.line(OK, "spool", f"{db}: writable and readable; {summary}")
    return tuple(s for s, ses in rows if ses) or tuple(s for s, _ in rows)


async def _upstream(report: Report, settings: Settings) -> None:
    """EHLO, then STARTTLS and AUTH as configured; QUIT without sending."""
    s = settings.upstream
    context = ssl.create_default_context()
    if not s.verify_tls:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    smtp = aiosmtplib.SMTP(
        hostname=s.host,
        port=s.port,
        local_hostname=settings.hostname,
        start_tls=False,
        timeout=min(s.timeout, SMTP_TIMEOUT),
        use_tls=s.security is Security.TLS,
        tls_context=context,
    )
    step, done = "", ["TLS" if s.security is Security.TLS else "EHLO"]
    try:
        await smtp.connect()
        step = "EHLO failed: "
        await smtp.ehlo()
        if s.security is Security.STARTTLS:
            step = "STARTTLS failed: "
            await smtp.starttls()
            done.append("STARTTLS")
        if s.username:
            step = "AUTH failed: "
            password = s.password()
            if password is None:
                raise aiosmtplib.SMTPException("password_env/password_file gives no password")
            await smtp.login(s.username, password)
            done.append(f"AUTH as {s.username}")
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        if isinstance(exc.__cause__ or exc, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(exc, aiosmtplib.SMTPResponseException):
            why = f"{exc.code} {' '.join(exc.message.split())}"
        else:
            why = str(exc) or type(exc).__name__
        report.line(FAIL, "upstream", f"{s.host}:{s.port}: {step}{why}")
        return
    finally:
        smtp.close()
    report.line(OK, "upstream", f"{s.host}:{s.port}: {', '.join(done)} ok (no mail sent)")


async def _ses(
    report: Report,
    settings: Settings,
    ruleset: RuleSet,
    senders: Sequence[str],
    domains: list[str],
) -> dnscheck.Dkim | str:
    """Account, identities and configuration sets; returns DKIM tokens, or why not."""
    region = settings.ses.region
    try:
        client = await ses_mod.SesClient.open(settings.ses)
    except Exception as exc:  # a bad region or endpoint URL: say so, do not crash the doctor
        report.line(FAIL, "ses", f"cannot create an SES client for {region}: {exc}")
        return "no SES client"
    async with client:
        quota = await report.ask(
            "ses", f"credentials or endpoint unusable (GetSendQuota in {region})", client.quota()
        )
        if quota is None:
            return "SES unusable"
        daily = "unlimited" if quota.max_24h < 0 else f"{quota.max_24h:g}"
        usage = (
            f"credentials valid ({region}); max send rate {quota.max_send_rate:g}/s; "
            f"sent {quota.sent_last_24h:g} of {daily} in the last 24 h"
        )
        spent = 0 <= quota.max_24h <= quota.sent_last_24h
        report.check(not spent, "ses", usage, f"{usage}: daily quota spent")
        try:
            enabled = await client.sending_enabled()
        except DeliveryError as exc:  # relay never needs this call to send: a warning only
            report.line(
                WARN, "ses", f"sending state unknown: GetAccountSendingEnabled: {exc.reply}"
            )
        else:
            report.check(enabled, "ses", "sending enabled", "sending paused for the account")
        for sender in senders:
            verified = await report.ask("identity", sender, client.sender_verified(sender))
            if verified is not None:
                report.check(
                    verified,
                    "identity",
                    f"{sender}: verified in SES",
                    f"{sender}: not verified in SES (nor its domain)",
                )
        names = [settings.ses.configuration_set, *(r.configuration_set for r in ruleset.rules)]
        for name in dict.fromkeys(n for n in names if n):
            exists = await report.ask("configset", name, client.configuration_set_exists(name))
            if exists is not None:
                report.check(
                    exists, "configset", f"{name}: exists", f"{name}: does not exist in {region}"
                )
    return await dnscheck.dkim_tokens(settings.ses, domains)


async def _dns(
    report: Report, domains: list[str], dkim: dnscheck.Dkim | str, nameserver: str | None
) -> None:
    """SPF includes amazonses.com, Easy DKIM CNAMEs point to SES, a DMARC record exists."""
    try:
        resolver = dnscheck.resolver(nameserver)
    except (ValueError, dns.exception.DNSException) as exc:
        report.line(FAIL, "dns", f"cannot use nameserver {nameserver or '(system)'}: {exc}")
        return
    probes = (
        ("spf", dnscheck.spf),
        ("dkim", functools.partial(dnscheck.easy_dkim, dkim=dkim)),
        ("dmarc", dnscheck.dmarc),
    )
    for domain in domains:
        for check, probe in probes:
            try:
                report.line(OK, check, await probe(resolver, domain))
            except dnscheck.RecordProblem as exc:
                report.line(WARN if exc.warning else FAIL, check, str(exc))
