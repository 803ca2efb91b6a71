"""`relay demo`: the whole data path on one machine, with nothing configured.

Starts a local SES emulator (moto in server mode) and a local capture server as
the site's "original host", runs relay between them on a free loopback port
with the shipped rules, sends the sample Moodle mails over SMTP, waits until
each one is delivered, and prints where it went. Then it plays SES's part after
the send (the emulator reports nothing): it puts a Delivery event and a Permanent
Bounce on the SQS feedback queue (moto's SQS), and shows relay recording them and
sending the bounced mail's sender a DSN through the original host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import click
import yaml
from aiobotocore.session import get_session
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import service
from relay import settings as settings_mod
from relay.ops import samples, sesevents
from relay.runtime import Context
from relay.spool import open_existing

REGION = "us-east-1"
DEADLINE = 30.0  # seconds for all sample mails to be delivered


class Capture:
    """The stand-in "original host": an aiosmtpd handler that keeps every envelope."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.received.append((envelope.mail_from or "", list(envelope.rcpt_tos), content))
        return "250 2.0.0 Ok: captured"


@contextlib.contextmanager
def _moto() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # moto is the `demo` extra
        raise click.ClickException(
            "relay demo needs the SES emulator: pip install 'relay[demo]' (moto[server])"
        ) from exc
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _demo_environment(home: Path) -> None:
    """Dummy AWS credentials for the emulator; nothing from the real account or config."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "AKIADEMODEMODEMODEMO",
            "AWS_SECRET_ACCESS_KEY": "demo-not-a-secret",
            "AWS_CONFIG_FILE": str(home / "no-aws-config"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        }
    )


def run(*, keep_running: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="relay-demo-") as tmp, _moto() as ses_url:
        _demo_environment(Path(tmp))
        return asyncio.run(_demo(Path(tmp), ses_url, keep_running=keep_running))


async def _demo(home: Path, ses_url: str, *, keep_running: bool) -> int:
    loop = asyncio.get_running_loop()
    async with get_session().create_client("ses", region_name=REGION, endpoint_url=ses_url) as c:
        await c.verify_domain_identity(Domain=samples.SITE)  # SES sends only from verified ones
    async with get_session().create_client("sqs", region_name=REGION, endpoint_url=ses_url) as c:
        queue_url: str = (await c.create_queue(QueueName="relay-demo-ses-events"))["QueueUrl"]
    capture = Capture()
    sink = await loop.create_server(lambda: SMTP(capture, hostname="original-host"), "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]
    config = home / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "spool": "spool",
                "hostname": "relay.demo",
                "metrics": None,
                "upstream": {"host": "127.0.0.1", "port": sink_port, "security": "none"},
                "ses": {
                    "region": REGION,
                    "endpoint_url": ses_url,
                    "max_send_rate": 10,
                    "events": {"queue_url": queue_url},
                    "suppressed": "send",  # the emulator has no suppression list to ask
                },
            }
        )
    )
    settings = settings_mod.load(config)
    stop = asyncio.Event()
    started: asyncio.Future[Context] = loop.create_future()
    task = asyncio.create_task(service.serve(settings, stop=stop, ready=started.set_result))
    try:
        ctx = await asyncio.wait_for(started, 10)
        click.echo(
            f"relay listening on 127.0.0.1:{ctx.port}; SES emulator at {ses_url}; "
            f"original host (capture) at 127.0.0.1:{sink_port}\n"
        )
        # Ctrl-C stops relay (its own signal handler): the steps that wait on it stop too,
        # at once, instead of polling until DEADLINE and printing a table of mail "not sent".
        steps = asyncio.create_task(_steps(ctx, settings.spool, queue_url, capture))
        await asyncio.wait({steps, task}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() or task.done():  # a sample refused with 421 as relay stops, too
            steps.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiosmtplib.SMTPException, OSError):
                await steps
            click.echo("\nrelay demo: interrupted", err=True)
            return 130
        ok = steps.result()
        if keep_running:
            click.echo(
                f"\nrelay keeps running. Point an SMTP client at 127.0.0.1:{ctx.port}, e.g."
                f"\n  swaks --server 127.0.0.1:{ctx.port} --to someone@example.org"
                "\nCtrl-C stops it."
            )
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return 0
        return 0 if ok else 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)
        sink.close()


async def _steps(ctx: Context, spool: Path, queue_url: str, capture: Capture) -> bool:
    """Send the samples, wait for their delivery, play SES's events; whether all went well."""
    ids = []
    for sample in samples.samples():
        _, reply = await aiosmtplib.send(
            sample.raw,
            sender=sample.sender,
            recipients=[sample.recipient],
            hostname="127.0.0.1",
            port=ctx.port,
            local_hostname="moodle.example.org",
        )
        ids.append(reply.rsplit(" ", 1)[-1])
    rows = await _wait_delivered(spool, ids)
    _print_table(rows, capture)
    events_ok = await _play_ses(spool, rows, queue_url, capture)
    return all(r["state"] == "sent" for r in rows) and events_ok


async def _play_ses(
    spool: Path, rows: list[dict[str, Any]], queue_url: str, capture: Capture
) -> bool:
    """Publish what SES would for the mails it took: a Delivery for the first, a Permanent
    Bounce for the second; wait for relay to record both and deliver the DSN; print it."""
    sent = [(r, s) for r, s in zip(rows, samples.samples(), strict=True) if r["ses_message_id"]]
    if len(sent) < 2:
        click.echo("\nSES events: skipped (fewer than two mails went through SES)")
        return False
    (delivered, first), (bounced, second) = sent[:2]
    events = (
        sesevents.delivery(delivered["ses_message_id"], first.sender, first.recipient),
        sesevents.bounce(bounced["ses_message_id"], second.sender, second.recipient),
    )
    async with get_session().create_client("sqs", region_name=REGION, endpoint_url=queue_url) as c:
        for event in events:
            await c.send_message(
                QueueUrl=queue_url, MessageBody=sesevents.sns_wrapped(event, REGION)
            )
    click.echo(
        "\nSES events (the demo plays SES, which reports after the send: it puts the event"
        "\nrecords SES would publish on the SQS feedback queue; relay reads them from there):"
    )
    deadline = time.monotonic() + DEADLINE
    while True:
        with contextlib.closing(open_existing(spool)) as conn:
            history = {
                q: dict(
                    conn.execute(
                        "SELECT event, detail FROM events WHERE queue_id = ? ORDER BY at", (q,)
                    ).fetchall()
                )
                for q in (delivered["id"], bounced["id"])
            }
            dsn = conn.execute(
                "SELECT id, state, recipients FROM messages WHERE reports_on = ?", (bounced["id"],)
            ).fetchone()
            [state] = conn.execute(
                "SELECT state FROM messages WHERE id = ?", (bounced["id"],)
            ).fetchone()
        got_dsn = any(frm in ("", "<>") for frm, _, _ in capture.received)
        done = "ses_delivery" in history[delivered["id"]] and dsn is not None and got_dsn
        done = done and state == "bounced"
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    click.echo(
        f"  {delivered['id']}  Delivery  {first.recipient}: "
        f"{'recorded' if 'ses_delivery' in history[delivered['id']] else 'NOT recorded'}"
    )
    click.echo(
        f"  {bounced['id']}  Bounce    {second.recipient}: Permanent, 5.1.1 user unknown: "
        f"{'recorded' if 'ses_bounce' in history[bounced['id']] else 'NOT recorded'},"
        f" mail {state}"
    )
    if dsn is not None:
        where = "delivered to the original host" if got_dsn else f"{dsn['state']}"
        click.echo(f"  {dsn['id']}  DSN       from <> to {second.sender}: {where}")
    return done


async def _wait_delivered(spool: Path, ids: list[str]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + DEADLINE
    while True:
        conn = open_existing(spool)
        try:
            rows = [_row(conn, queue_id) for queue_id in ids]
        finally:
            conn.close()
        if all(r["state"] in ("sent", "failed") for r in rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


def _row(conn: sqlite3.Connection, queue_id: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT id, state, rule, route, ses_message_id, reply, fallback_reason"
        " FROM messages WHERE id = ?",
        (queue_id,),
    ).fetchone()
    return dict(row)


def _print_table(rows: list[dict[str, Any]], capture: Capture) -> None:
    header = ("mail", "queue id", "rule", "route", "arrived at", "SES MessageId")
    lines = [header]
    for sample, row in zip(samples.samples(), rows, strict=True):
        if row["state"] != "sent":
            where = f"not delivered ({row['state']}: {row['reply']})"
        elif row["route"] == "ses":
            where = "SES (emulator)"
        else:
            got = any(
                sample.recipient in rcpts and sample.raw in data
                for _, rcpts, data in capture.received
            )
            where = "original host" if got else "original host (NOT seen by capture!)"
        lines.append(
            (
                sample.label,
                row["id"],
                row["rule"] or "(default)",
                row["route"] or "-",
                where,
                row["ses_message_id"] or "-",
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = (str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
        click.echo("  ".join(cells).rstrip())
