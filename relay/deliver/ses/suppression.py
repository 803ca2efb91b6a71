"""The SES account suppression list, asked before an SES send (`ses.suppressed`).

    deliver loop, route ses -> SuppressionList.reasons(recipients) -> {address: BOUNCE|COMPLAINT}
      -> upstream (default) / bounce / send, decided by the loop

SES accepts mail to a suppressed address and silently does not send it; an address
stays on the list until someone removes it. SESv2 GetSuppressedDestination answers
per address; the answers, "not found" included, are kept for CACHE_TTL so a busy
queue asks once per address per TTL. A failed lookup counts as "not suppressed"
(the mail goes to SES as it would without this check) for FAILED_TTL. A hard bounce
or a complaint (relay.deliver.feedback) is when SES adds an address to the list:
`forget` drops the answers about its addresses, so the next mail asks again instead
of going to SES, which would drop it, for the rest of the hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any, Self

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from relay import logs
from relay.settings import Ses

log = logging.getLogger("relay.ses")

CACHE_TTL = 3600.0  # seconds an answer (suppressed or not) is reused
CACHE_MAX = 50_000  # answers kept at most (about 10 MB): expired ones go first, then the oldest
FAILED_TTL = 60.0  # seconds a failed lookup counts as "not suppressed" before asking again
WARN_EVERY = 60.0  # seconds between log lines about failing lookups


class SuppressionList:
    """GetSuppressedDestination through one aiobotocore SESv2 client, with a TTL cache."""

    def __init__(self, client: Any, stack: AsyncExitStack) -> None:
        self._client = client
        self._stack = stack
        self._cache: dict[str, tuple[float, str | None]] = {}  # address -> (expires, reason)
        self._warned = 0.0
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self.lookups = 0

    @classmethod
    async def open(cls, settings: Ses, *, session: AioSession | None = None) -> Self:
        config = AioConfig(
            retries={"total_max_attempts": 1},
            connect_timeout=min(5.0, settings.timeout),
            read_timeout=settings.timeout,
        )
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            (session or get_session()).create_client(
                "sesv2",
                region_name=settings.region,
                endpoint_url=settings.endpoint_url,
                config=config,
            )
        )
        return cls(client, stack)

    async def close(self) -> None:
        await self._stack.aclose()

    async def reasons(self, recipients: Sequence[str]) -> dict[str, str]:
        """The recipients on the suppression list, with SES's reason (BOUNCE, COMPLAINT)."""
        found = {}
        for address in dict.fromkeys(recipients):
            reason = await self.reason(address)
            if reason is not None:
                found[address] = reason
        return found

    def forget(self, addresses: Sequence[str]) -> None:
        """Ask SES again about these addresses next time (see the module docstring)."""
        for address in addresses:
            self._cache.pop(address.lower(), None)

    async def reason(self, address: str) -> str | None:
        """SES's reason for suppressing `address`, None if it is not on the list."""
        key = address.lower()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        lookup = self._pending.get(key)  # concurrent deliveries share one call
        if lookup is None:
            lookup = self._pending[key] = asyncio.ensure_future(self._lookup(address))
            lookup.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(lookup)

    async def _lookup(self, address: str) -> str | None:
        now = time.monotonic()
        self.lookups += 1
        try:
            answer = await self._client.get_suppressed_destination(EmailAddress=address)
            reason: str | None = str(answer["SuppressedDestination"].get("Reason") or "SUPPRESSED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NotFoundException":
                return self._failed(address, exc, now)
            reason = None
        except (BotoCoreError, aiohttp.ClientError, OSError, KeyError) as exc:
            return self._failed(address, exc, now)
        self._keep(address, now + CACHE_TTL, reason)
        return reason

    def _keep(self, address: str, expires: float, reason: str | None) -> None:
        """Cache an answer. An answer expired is dropped only when asked again, so a site
        writing to ever new addresses grew the cache by ~200 bytes each, for months: past
        CACHE_MAX the expired ones go, then the oldest, down to nine tenths of it."""
        cache = self._cache
        if len(cache) >= CACHE_MAX:
            now = time.monotonic()
            for key in [key for key, (until, _) in cache.items() if until <= now]:
                del cache[key]
            while len(cache) >= CACHE_MAX * 9 // 10:
                del cache[next(iter(cache))]
        cache[address.lower()] = (expires, reason)

    def _failed(self, address: str, exc: Exception, now: float) -> str | None:
        """Not suppressed, as far as relay can tell, for FAILED_TTL; logged now and then."""
        self._keep(address, now + FAILED_TTL, None)
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            logs.event(
                log,
                "ses_suppression_lookup_failed",
                level=logging.WARNING,
                recipient=address,
                error=str(exc),
            )
        return None
