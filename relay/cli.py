"""Command line entry points (click). Thin: parse, build settings, call one function.

Exit codes: 0 ok; 1 a check failed; 2 usage error (click's own).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from relay import settings as settings_mod
from relay.errors import ConfigError

PathArg = click.Path(path_type=Path)


def _settings(config: Path | None) -> settings_mod.Settings:
    path = settings_mod.find_config(config)
    try:
        return settings_mod.load(path)
    except ConfigError as exc:
        raise click.ClickException(f"{path} cannot be used:\n{exc}") from exc


def _open_standard_files() -> None:
    """/dev/null for whichever of 0, 1 and 2 is closed (`relay serve >&- 2>&- &`): else a
    socket or pipe gets one of those numbers, and libuv aborts on closing it (SIGABRT)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


@click.group()
@click.version_option(package_name="relay")
def main() -> None:
    """relay: store-and-forward SMTP relay sending Moodle re-engagement mail through SES."""


@main.command()
@click.option(
    "--config",
    type=PathArg,
    help="relay.yaml (default: $RELAY_CONFIG, ./relay.yaml, /etc/relay/relay.yaml)",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
def serve(config: Path | None, log_format: str) -> None:
    """Run the service: accept mail, spool it, deliver it."""
    # Until the loop handles it (service.serve), SIGHUP's default would end relay serve,
    # and systemd does not restart a unit a SIGHUP ended: a reload in its first second did.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A SIGTERM before then is kept for it: as PID 1 in a container (no --init) relay would
    # ignore it, and `docker stop` right after a start waited out its timeout for SIGKILL.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: early.append(signum))
    _open_standard_files()
    from relay import service

    sys.exit(service.run(_settings(config), log_format=log_format, early=early))


@main.command("check-rules")
@click.option(
    "--rules",
    "rules_path",
    type=PathArg,
    help="rules file (default: the one relay.yaml names, else ./rules.yaml, else the shipped)",
)
@click.option(
    "--config",
    type=PathArg,
    help="relay.yaml whose rules to use (default: $RELAY_CONFIG, ./relay.yaml, "
    "/etc/relay/relay.yaml, where one exists)",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per message per line")
@click.argument("paths", nargs=-1, required=True, type=PathArg)
def check_rules(
    rules_path: Path | None, config: Path | None, as_json: bool, paths: tuple[Path, ...]
) -> None:
    """Classify .eml files, directories (recursive) or - (stdin); sends nothing."""
    from relay.ops import checkrules

    sys.exit(checkrules.run(rules_path, paths, as_json=as_json, config=config))


@main.command("check-config")
@click.option("--config", type=PathArg)
def check_config(config: Path | None) -> None:
    """Validate relay.yaml and the rules it names; print every problem with file:line."""
    from relay import rules

    path = settings_mod.find_config(config)
    problems: list[str] = []
    region = None
    try:
        loaded = settings_mod.load(path)
    except ConfigError as exc:
        problems.extend(str(p) for p in exc.problems)
        rules_file = settings_mod.rules_of(path)  # its problems are wanted too
    else:
        problems.extend(settings_mod.check_listen_env(loaded))
        rules_file, region = loaded.rules, loaded.ses.region
    warnings: tuple[str, ...] = ()
    if rules_file is not None:
        try:
            warnings = rules.load(rules_file, ses_region=region).warnings
        except ConfigError as exc:
            problems.extend(str(p) for p in exc.problems)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        sys.exit(1)
    for warning in (*settings_mod.exposed_secrets(loaded), *warnings):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{path}: ok")


@main.group()
@click.option("--config", type=PathArg)
@click.pass_context
def queue(ctx: click.Context, config: Path | None) -> None:
    """Inspect and act on the spool (works while the service runs)."""
    ctx.obj = config  # read by each command (its --help needs no relay.yaml)


# `relay queue list --config F` as well as `relay queue --config F list`, as elsewhere
_queue_config = click.option("--config", "config", type=PathArg, help="relay.yaml")


def _spool(ctx: click.Context, config: Path | None) -> Path:
    """The spool relay.yaml names; after a bad edit elsewhere in it, `spool:` read alone
    (the admin needs `relay queue` most when relay serve runs on what it read before)."""
    path = settings_mod.find_config(config or ctx.obj)
    try:
        return settings_mod.load(path).spool
    except ConfigError as exc:
        spool = settings_mod.spool_of(path)
        if spool is None:
            raise click.ClickException(f"{path} cannot be used:\n{exc}") from exc
        click.echo(f"warning: {path} has problems; its spool, read alone: {spool}\n{exc}", err=True)
        return spool


@queue.command("list")
@click.option("--state", help="only this state (queued, inflight, deferred, sent, bounced, failed)")
@click.option("--json", "as_json", is_flag=True)
@_queue_config
@click.pass_context
def queue_list(ctx: click.Context, state: str | None, as_json: bool, config: Path | None) -> None:
    """List messages in the spool (finished ones, sent and bounced, with --state)."""
    from relay.ops import queueadmin as queue_mod

    sys.exit(queue_mod.list_messages(_spool(ctx, config), state=state, as_json=as_json))


@queue.command("show")
@click.argument("queue_id")
@click.option("--json", "as_json", is_flag=True)
@_queue_config
@click.pass_context
def queue_show(ctx: click.Context, queue_id: str, as_json: bool, config: Path | None) -> None:
    """Show one message: envelope, headers, state and full history."""
    from relay.ops import queueadmin as queue_mod

    sys.exit(queue_mod.show(_spool(ctx, config), queue_id, as_json=as_json))


@queue.command("retry")
@click.argument("queue_ids", nargs=-1)
@click.option("--all-failed", is_flag=True, help="every dead letter")
@_queue_config
@click.pass_context
def queue_retry(
    ctx: click.Context, queue_ids: tuple[str, ...], all_failed: bool, config: Path | None
) -> None:
    """Queue deferred or failed messages for delivery now."""
    from relay.ops import requeue

    sys.exit(requeue.retry(_spool(ctx, config), queue_ids, all_failed=all_failed))


@queue.command("delete")
@click.argument("queue_ids", nargs=-1, required=True)
@_queue_config
@click.pass_context
def queue_delete(ctx: click.Context, queue_ids: tuple[str, ...], config: Path | None) -> None:
    """Delete messages from the spool (they will not be delivered)."""
    from relay.ops import requeue

    sys.exit(requeue.delete(_spool(ctx, config), queue_ids))


@queue.command("stats")
@click.option("--json", "as_json", is_flag=True)
@_queue_config
@click.pass_context
def queue_stats(ctx: click.Context, as_json: bool, config: Path | None) -> None:
    """Counts by state, bytes held, age of the oldest queued message."""
    from relay.ops import queueadmin as queue_mod

    sys.exit(queue_mod.stats(_spool(ctx, config), as_json=as_json))


@main.command()
@click.option("--keep-running", is_flag=True, help="stay up after the samples, for your own mail")
def demo(keep_running: bool) -> None:
    """Zero-setup run: relay + local SES emulator + local capture server, sample Moodle mails."""
    from relay.ops import demo as demo_mod

    sys.exit(demo_mod.run(keep_running=keep_running))


@main.command("hash-password")
def hash_password() -> None:
    """Print a password hash for an `auth.users_file` line (user:hash)."""
    from relay.receive import passwords

    password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    click.echo(passwords.hash_password(password))


@main.command()
@click.option("--config", type=PathArg)
@click.option(
    "--sender",
    "senders",
    multiple=True,
    help="sender address or domain to check in SES and DNS (repeatable; default: "
    "the senders of mail in the spool)",
)
@click.option(
    "--sample",
    "samples",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a mail (.eml) as Moodle sends it: its From identity and DKIM-Signature are checked "
    "(repeatable)",
)
@click.option("--nameserver", help="DNS server to ask (default: the system resolver)")
def doctor(
    config: Path | None,
    senders: tuple[str, ...],
    samples: tuple[Path, ...],
    nameserver: str | None,
) -> None:
    """Live checks: config, spool, original host, SES account and identities, DNS."""
    from relay.ops import doctor as doctor_mod

    sys.exit(
        doctor_mod.run(
            settings_mod.find_config(config),
            senders=senders,
            nameserver=nameserver,
            samples=samples,
        )
    )
