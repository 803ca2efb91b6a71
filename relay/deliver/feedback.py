"""SES event feedback: what SES learned after it accepted a mail, back onto the mail's row.

    SES configuration set --(SNS | EventBridge)--> SQS `ses.events.queue_url`
      -> long poll (aiobotocore) -> ses.events.parse() -> Spool.feedback() (one commit:
         history line, once per event; a Bounce (soft ones come only once SES has stopped
         retrying), or a Reject (SES refused to send after all), also queues the sender's
         DSN, and makes the mail `bounced` once every recipient has had one; a
         DeliveryDelay, with `bounces.delay_warning`, the "still trying" one, once a mail)
      -> DeleteMessage, only after that commit is on disk (Spool.sync: the delivery
         process commits with synchronous=NORMAL)
    a hard bounce or a complaint -> ctx.on_suppressible: the delivery loop's cache of
      the suppression list forgets those addresses (SES may have just listed them)

Events for MessageIds this spool does not know (other senders on the account,
rows past retention) are counted and deleted; malformed messages are logged once
and deleted; a commit that fails leaves the message on the queue, which shows it
again after its visibility timeout (the event's key makes a second apply a no-op);
one whose handling fails (a bug) is logged whole and deleted at its GIVE_UP_AFTER'th
receive.
Runs in the delivery process (`ses_feedback` task); also keeps the bounce and
complaint rates of relay's own SES sends current.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from relay import logs, metrics
from relay.deliver import dsn
from relay.deliver.ses.events import UNUSED, parse
from relay.errors import MalformedEvent, SpoolError, TemporaryFailure
from relay.runtime import Context, wait_any
from relay.settings import Settings
from relay.spool.feedback import Applied, NoticeFor, Reputation

log = logging.getLogger("relay.feedback")

WAIT = 20  # seconds of SQS long polling (its maximum)
BATCH = 10  # messages per ReceiveMessage (its maximum)
ERROR_PAUSE = 5.0  # seconds before polling again after a failed call, doubled for each
MAX_ERROR_PAUSE = 300.0  # failure in a row up to this: a wrong queue URL logs every 5 min
UNKNOWN_AFTER = 5  # receives of an event for a MessageId the spool does not know before it is
# deleted (about 2 minutes at SQS's default visibility timeout of 30 s: see handle)
GIVE_UP_AFTER = 10  # receives of a message whose handling failed (a bug) before it is logged
# whole and deleted: SQS shows it again after each visibility timeout, for good otherwise
RATE_EVERY = 60.0  # seconds between bounce/complaint rate updates
RATE_WINDOW = 7 * 86400.0  # the rates cover this long (at most `retention`)
BOUNCE_REVIEW = 0.05  # SES reviews an account from this bounce rate (pauses near 10%)
COMPLAINT_REVIEW = 0.001  # and from this complaint rate (pauses near 0.5%)
_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError)
_AWS_HOST = re.compile(r"^(?:sqs\.)?([a-z0-9-]+)\.(?:queue\.)?amazonaws\.com$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    body: str
    receipt: str
    sqs_id: str
    receives: int = 1  # SQS's ApproximateReceiveCount
    # Receives after which an event for a MessageId relay does not know is deleted: fewer
    # than the queue's dead-letter redrive allows, or it would land there, unlogged.
    unknown_after: int = UNKNOWN_AFTER


class Queue(Protocol):
    url: str

    async def receive(self) -> list[Received]: ...
    async def delete(self, receipt: str) -> None: ...


class FeedbackStore(Protocol):
    async def feedback(
        self,
        *,
        key: str,
        ses_message_id: str,
        event: str,
        detail: str,
        kind: str,
        failed: Sequence[str] = (),
        delivered: Sequence[str] = (),
        notice_for: NoticeFor | None = None,
    ) -> Applied: ...
    async def reputation(self, since: float) -> Reputation: ...
    async def sync(self) -> None: ...


def sqs_location(url: str, default_region: str) -> tuple[str, str | None]:
    """(region, endpoint_url) for a queue URL: AWS's own hosts name their region; any
    other host (an emulator) is the endpoint itself."""
    parts = urlsplit(url)
    found = _AWS_HOST.match(parts.hostname or "")
    if found:
        return found.group(1), None
    return default_region, f"{parts.scheme}://{parts.netloc}"


class SqsQueue:
    """The feedback queue through one aiobotocore SQS client."""

    def __init__(self, client: Any, stack: AsyncExitStack, url: str) -> None:
        self._client = client
        self._stack = stack
        self.url = url
        self._unknown_after: int | None = None  # read from the queue at the first receive

    @classmethod
    async def open(
        cls, url: str, default_region: str, *, session: AioSession | None = None
    ) -> Self:
        region, endpoint = sqs_location(url, default_region)
        config = AioConfig(connect_timeout=5, read_timeout=WAIT + 10)
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            (session or get_session()).create_client(
                "sqs", region_name=region, endpoint_url=endpoint, config=config
            )
        )
        return cls(client, stack, url)

    async def close(self) -> None:
        await self._stack.aclose()

    async def receive(self) -> list[Received]:
        if self._unknown_after is None:
            self._unknown_after = await self._receives_before_dead_letter()
        try:
            answer = await self._client.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=BATCH,
                WaitTimeSeconds=WAIT,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        except _ERRORS as exc:
            raise TemporaryFailure(f"SQS ReceiveMessage on {self.url} failed: {exc}") from exc
        return [
            Received(
                body=m["Body"],
                receipt=m["ReceiptHandle"],
                sqs_id=m["MessageId"],
                receives=_count(m.get("Attributes", {}).get("ApproximateReceiveCount")),
                unknown_after=self._unknown_after or UNKNOWN_AFTER,
            )
            for m in answer.get("Messages", ())
        ]

    async def _receives_before_dead_letter(self) -> int | None:
        """UNKNOWN_AFTER, or fewer than the queue's RedrivePolicy maxReceiveCount (at least
        1: deleted at the first receive). Refused (IAM without sqs:GetQueueAttributes), or
        a policy it cannot read: UNKNOWN_AFTER. Not answered: None, asked again next time."""
        try:
            answer = await self._client.get_queue_attributes(
                QueueUrl=self.url, AttributeNames=["RedrivePolicy"]
            )
        except ClientError as exc:  # refused for good, or a queue not there yet
            return UNKNOWN_AFTER if "AccessDenied" in str(exc) else None
        except _ERRORS:
            return None
        try:
            policy = json.loads(answer.get("Attributes", {}).get("RedrivePolicy") or "{}")
            limit = int(policy.get("maxReceiveCount") or 0)
        except (ValueError, TypeError, AttributeError):
            return UNKNOWN_AFTER
        return max(1, min(UNKNOWN_AFTER, limit - 1)) if limit else UNKNOWN_AFTER

    async def delete(self, receipt: str) -> None:
        try:
            await self._client.delete_message(QueueUrl=self.url, ReceiptHandle=receipt)
        except _ERRORS as exc:
            raise TemporaryFailure(f"SQS DeleteMessage on {self.url} failed: {exc}") from exc


def judge(seen: Reputation, window: float) -> list[tuple[str, str]]:
    """(level, text) for the bounce and the complaint rate: "ok", "warn" from half of SES's
    review level, "high" from the review level itself."""
    days = f"{window / 86400:g} days"
    judged = []
    for kind, rate, count, review in (
        ("bounce", seen.bounce_rate, seen.bounces, BOUNCE_REVIEW),
        ("complaint", seen.complaint_rate, seen.complaints, COMPLAINT_REVIEW),
    ):
        text = f"{kind} rate {rate:.2%} ({count} of {seen.sends} SES sends, {days})"
        if rate >= review:
            judged.append(("high", f"{text}: at SES's {review:.1%} review level"))
        elif rate >= review / 2:
            judged.append(("warn", f"{text}: half of SES's {review:.1%} review"))
        else:
            judged.append(("ok", text))
    return judged


async def ses_feedback(ctx: Context) -> None:
    """The task: poll `ses.events.queue_url` until stop (idle when it is not set)."""
    url = ctx.settings.ses.events_queue_url
    if not url:
        await ctx.stop.wait()
        return
    try:
        queue = await SqsQueue.open(url, ctx.settings.ses.region)
    except Exception as exc:  # a client that cannot be made must not stop delivery
        logs.event(log, "ses_feedback_unusable", level=logging.ERROR, queue=url, error=repr(exc))
        await ctx.stop.wait()
        return
    logs.event(log, "ses_feedback_started", queue=url)
    try:
        await run(ctx, queue, ctx.spool)
    finally:
        await queue.close()


async def run(ctx: Context, queue: Queue, spool: FeedbackStore) -> None:
    """Receive, apply, delete, until `ctx.stop`; rates every RATE_EVERY seconds. A failed
    receive is retried after ERROR_PAUSE, twice as long after each further failure."""
    rated = 0.0
    pause = ERROR_PAUSE
    while not ctx.stop.is_set():
        if time.monotonic() - rated >= RATE_EVERY:
            rated = time.monotonic()
            await _rates(spool, ctx.settings)
        try:
            batch = await _receive(queue, ctx.stop)
        except TemporaryFailure as exc:
            metrics.SES_FEEDBACK_UP.labels(queue.url).set(0)
            logs.event(
                log, "ses_feedback_failed", level=logging.WARNING, error=str(exc), retry_in=pause
            )
            await wait_any(ctx.stop, seconds=pause)
            pause = min(pause * 2, MAX_ERROR_PAUSE)
            continue
        pause = ERROR_PAUSE
        metrics.SES_FEEDBACK_UP.labels(queue.url).set(1)
        done = []
        for message in batch:
            try:
                if await handle(spool, ctx.settings, message, ctx.on_suppressible):
                    done.append(message.receipt)
                # else not committed: SQS shows it again after its visibility timeout
            except Exception:  # a bug in one event: it stays queued, the loop goes on
                log.exception("event=ses_feedback_bug sqs_id=%s", message.sqs_id)
                if message.receives >= GIVE_UP_AFTER:
                    _give_up(message)
                    done.append(message.receipt)
        if done:
            await _delete(queue, spool, done)


def _give_up(message: Received) -> None:
    """An event that failed GIVE_UP_AFTER times: its whole body into the log, where an
    admin can read it (and send it to the queue again once relay is mended)."""
    metrics.SES_EVENTS_DROPPED.labels("failed").inc()
    logs.event(
        log,
        "ses_event_given_up",
        level=logging.ERROR,
        sqs_id=message.sqs_id,
        receives=message.receives,
        body=message.body,
    )


def _count(text: str | None) -> int:
    try:
        return int(text or 1)
    except ValueError:
        return 1


async def _delete(queue: Queue, spool: FeedbackStore, receipts: list[str]) -> None:
    """Delete what was applied, once it is on disk: the delivery process commits with
    synchronous=NORMAL, so an event deleted before the next fsync could be lost to a
    power cut with its DSN. Any of them that is not deleted comes back from SQS, and its
    key makes that a no-op."""
    try:
        await spool.sync()
    except SpoolError as exc:
        logs.event(log, "ses_feedback_failed", level=logging.WARNING, error=str(exc))
        return
    for receipt in receipts:
        try:
            await queue.delete(receipt)
        except TemporaryFailure as exc:
            logs.event(log, "ses_feedback_failed", level=logging.WARNING, error=str(exc))


async def handle(
    spool: FeedbackStore,
    settings: Settings,
    message: Received,
    suppressible: Sequence[Callable[[Sequence[str]], None]] = (),
) -> bool:
    """Apply one queue message; True when it may be deleted (applied, or never will be).
    A hard bounce's or a complaint's addresses go to each of `suppressible`."""
    try:
        event = parse(message.body)
    except MalformedEvent as exc:
        metrics.SES_EVENTS_DROPPED.labels("malformed").inc()
        logs.event(
            log,
            "ses_event_malformed",
            level=logging.WARNING,
            sqs_id=message.sqs_id,
            error=str(exc),
            body=message.body[:200],
        )
        return True
    if event.suppressible:
        for forget in suppressible:
            forget(event.suppressible)
    if event.type in UNUSED:  # opens, clicks: nothing to record (see events.UNUSED)
        metrics.SES_EVENTS_DROPPED.labels("unused_type").inc()
        log.debug("event=ses_event_unused type=%s ses_message_id=%s", event.type, event.message_id)
        return True
    try:
        applied = await spool.feedback(
            key=event.key,
            ses_message_id=event.message_id,
            event=f"ses_{event.type.lower()}",
            detail=event.summary(),
            kind=event.rate_kind,
            failed=event.failed,
            delivered=event.delivered,
            notice_for=dsn.for_ses_event(event, settings),
        )
    except SpoolError as exc:
        logs.event(log, "ses_event_not_recorded", level=logging.WARNING, error=str(exc))
        return False
    if applied is Applied.UNKNOWN and message.receives < message.unknown_after:
        # Not a mail of this spool yet: the send's outcome may still be on its way (a slow
        # answer, a spool that cannot commit), or another relay reads this queue too.
        # Deleted, it was lost for good; SQS shows it again after its visibility timeout.
        return False
    if applied is Applied.APPLIED:
        metrics.SES_EVENTS.labels(event.type).inc()
    else:
        metrics.SES_EVENTS_DROPPED.labels(applied.value).inc()
    logs.event(
        log,
        "ses_event",
        type=event.type,
        ses_message_id=event.message_id,
        result=applied.value,
        recipients=",".join(r.address for r in event.recipients),
        bounce=f"{event.bounce_type}/{event.bounce_subtype}" if event.bounce_type else None,
    )
    return True


async def _receive(queue: Queue, stop: asyncio.Event) -> list[Received]:
    """One long poll, cut short by stop (then nothing received: the messages stay queued)."""
    poll = asyncio.ensure_future(queue.receive())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not poll.done():
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError, TemporaryFailure):
            await poll
        return []
    return poll.result()


async def _rates(spool: FeedbackStore, settings: Settings) -> None:
    window = min(RATE_WINDOW, settings.retention)
    try:
        seen = await spool.reputation(time.time() - window)
    except SpoolError as exc:
        logs.event(log, "ses_rates_failed", level=logging.WARNING, error=str(exc))
        return
    metrics.BOUNCE_RATE.set(seen.bounce_rate)
    metrics.COMPLAINT_RATE.set(seen.complaint_rate)
