"""SES route of the deliver stage: SendRawEmail through one long-lived aiobotocore client.

Every failure leaves as one of relay's delivery errors (DESIGN 3.4):

    TemporaryFailure   retry SES with backoff until `fallback_after`, then upstream
    └── Throttled      "Maximum sending rate exceeded": also slow the pace down
    PermanentFailure   this message goes upstream at once (MessageRejected, size, <>)
    └── AccountFailure upstream at once and open the circuit (paused, quota, credentials)

botocore's own retries are off: the deliver loop owns retrying and pacing.
Credentials come from the standard chain and never appear in a message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import ResponseParserError

from relay import settings as _settings
from relay.errors import (
    AccountFailure,
    DeliveryError,
    PermanentFailure,
    TemporaryFailure,
    Throttled,
)
from relay.mail import Mail

MAX_DESTINATIONS = 50  # SES v1: at most 50 recipients per message
# SES v1 SendRawEmail refuses messages over 10 MB ("Message length is more than
# 10485760 bytes long"); it counts the MIME message, attachments already encoded.
MAX_MESSAGE_SIZE = 10 * 1024 * 1024
CONNECT_TIMEOUT = 5.0  # seconds; capped by settings.timeout

RATE_THROTTLE = "maximum sending rate exceeded"
DAILY_THROTTLE = "daily message quota exceeded"

THROTTLE_CODES = frozenset({"Throttling", "ThrottlingException", "TooManyRequestsException"})
ACCOUNT_CODES = frozenset(
    {
        "AccountSendingPausedException",
        "ConfigurationSetDoesNotExist",
        "ConfigurationSetSendingPausedException",
        "MailFromDomainNotVerifiedException",
        # credentials and permissions: every call fails the same way until an admin acts
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "MissingAuthenticationToken",
        "OptInRequired",
        "RequestExpired",  # clock skew: every signature is stale
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
TEMPORARY_CODES = frozenset({"ServiceUnavailable", "InternalFailure", "InternalError"})

# What a send may raise besides our own errors; OSError covers TimeoutError.
_ERRORS = (BotoCoreError, ClientError, ResponseParserError, aiohttp.ClientError, OSError)
_NETWORK = (BotoConnectionError, HTTPClientError, ResponseParserError, aiohttp.ClientError, OSError)
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Quota:
    """GetSendQuota in recipients; `max_24h` is -1 when the account has no daily limit."""

    max_24h: float
    max_send_rate: float
    sent_last_24h: float


class SesClient:
    """One aiobotocore SES v1 client for the life of the service.

    Open with `ses = await SesClient.open(settings)` and `await ses.close()` when
    done, or use the opened client as `async with`: `async with await SesClient.open(s) as ses:`.
    """

    def __init__(self, client: Any, stack: AsyncExitStack, settings: _settings.Ses) -> None:
        self._client = client
        self._stack = stack
        self._settings = settings
        connect = min(CONNECT_TIMEOUT, settings.timeout)
        # A backstop over botocore's per-read timeouts: credential lookup, TLS and a
        # trickling response all fit inside one deadline.
        self._deadline = settings.timeout + connect + 1.0

    @classmethod
    async def open(cls, settings: _settings.Ses, *, session: AioSession | None = None) -> Self:
        """Create the client. No network traffic yet: credentials and the first connection
        come with the first call, so call `quota()` at start-up before pacing sends."""
        config = AioConfig(
            retries={"total_max_attempts": 1},
            connect_timeout=min(CONNECT_TIMEOUT, settings.timeout),
            read_timeout=settings.timeout,
        )
        stack = AsyncExitStack()
        session = session or get_session()
        creator = session.create_client(
            "ses", region_name=settings.region, endpoint_url=settings.endpoint_url, config=config
        )
        client = await stack.enter_async_context(creator)
        return cls(client, stack, settings)

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(
        self,
        mail: Mail,
        *,
        configuration_set: str | None = None,
        tags: Sequence[tuple[str, str]] = (),
    ) -> str:
        """SendRawEmail `mail.wire_bytes()` to the envelope; return the SES MessageId.

        `configuration_set` None means the one in settings (if any). Tag names and
        values are reduced to what SES accepts (letters, digits, `_`, `-`).
        Mail that SES cannot take as it is (null sender, no or over
        MAX_DESTINATIONS recipients, over MAX_MESSAGE_SIZE) raises
        PermanentFailure before any call; the caller may split recipients itself.
        """
        data = mail.wire_bytes()
        refusal = _refusal(mail, len(data))
        if refusal:
            raise PermanentFailure(f"SES cannot send {mail.id}: {refusal}", reply=refusal)
        params: dict[str, Any] = {
            "Source": mail.sender,
            "Destinations": list(mail.recipients),
            "RawMessage": {"Data": data},
        }
        config_set = configuration_set or self._settings.configuration_set
        if config_set:
            params["ConfigurationSetName"] = config_set
        if tags:
            params["Tags"] = [{"Name": tag_safe(n), "Value": tag_safe(v)} for n, v in tags]
        response = await self._call("send_raw_email", f"message {mail.id}", **params)
        message_id = response.get("MessageId")
        if not message_id:  # SES answered 200 but said nothing usable: try again later
            raise TemporaryFailure(
                f"SES accepted {mail.id} without a MessageId",
                reply="SendRawEmail response without MessageId",
            )
        return str(message_id)

    async def quota(self) -> Quota:
        """GetSendQuota: the daily budget, the rate ceiling and what was spent."""
        r = await self._call("get_send_quota", "GetSendQuota")
        return Quota(
            max_24h=float(r["Max24HourSend"]),
            max_send_rate=float(r["MaxSendRate"]),
            sent_last_24h=float(r["SentLast24Hours"]),
        )

    async def sending_enabled(self) -> bool:
        """GetAccountSendingEnabled: False when the account is paused."""
        r = await self._call("get_account_sending_enabled", "GetAccountSendingEnabled")
        return bool(r.get("Enabled", False))

    async def identity_status(self, identity: str) -> str | None:
        """VerificationStatus of an address or domain ("Success", "Pending", ...) or None."""
        r = await self._call(
            "get_identity_verification_attributes", f"identity {identity}", Identities=[identity]
        )
        attributes = r.get("VerificationAttributes", {}).get(identity)
        return None if attributes is None else str(attributes.get("VerificationStatus"))

    async def sender_verified(self, address: str) -> bool:
        """True when SES may send as `address`: it or its domain is verified."""
        domain = address.rpartition("@")[2]
        for identity in dict.fromkeys((address, domain)):
            if identity and await self.identity_status(identity) == "Success":
                return True
        return False

    async def configuration_set_exists(self, name: str) -> bool:
        """DescribeConfigurationSet: False when SES does not know `name`."""
        try:
            await self._call(
                "describe_configuration_set",
                f"configuration set {name}",
                ConfigurationSetName=name,
            )
        except AccountFailure as exc:
            if exc.reply.startswith("ConfigurationSetDoesNotExist"):
                return False
            raise
        return True

    async def _call(self, method: str, what: str, **params: Any) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._deadline):
                response: dict[str, Any] = await getattr(self._client, method)(**params)
        except _ERRORS as exc:
            raise failure(exc, what) from exc
        return response


def failure(exc: BaseException, what: str) -> DeliveryError:
    """Map an aiobotocore/botocore/network error to relay's delivery error tree."""
    if isinstance(exc, ClientError):
        return _client_failure(exc, what)
    name = type(exc).__name__
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return AccountFailure(f"SES credentials unusable for {what}: {exc}", reply=name)
    if isinstance(exc, _NETWORK):
        reply = f"{name}: {exc}" if str(exc) else name
        return TemporaryFailure(f"SES unreachable for {what}: {reply}", reply=reply)
    if isinstance(exc, BotoCoreError):
        # Parameter validation and the like: this message as it is will not go.
        return PermanentFailure(f"SES refused {what} before sending: {name}: {exc}", reply=name)
    return TemporaryFailure(f"SES failed for {what}: {name}: {exc}", reply=name)


def _client_failure(exc: ClientError, what: str) -> DeliveryError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    message = str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    reply = f"{code}: {message}" if message else code
    lowered = message.lower()
    if code in THROTTLE_CODES:
        if DAILY_THROTTLE in lowered:
            return AccountFailure(f"SES daily quota spent at {what}: {reply}", reply=reply)
        return Throttled(f"SES throttled {what}: {reply}", reply=reply)
    if code in ACCOUNT_CODES:
        return AccountFailure(f"SES account cannot send {what}: {reply}", reply=reply)
    if code in TEMPORARY_CODES or status >= 500 or (code.isdigit() and int(code) >= 500):
        return TemporaryFailure(f"SES unavailable for {what}: {reply}", reply=reply)
    return PermanentFailure(f"SES rejected {what}: {reply}", reply=reply)


def _refusal(mail: Mail, size: int) -> str:
    if not mail.sender:
        return "null sender <> (SES needs a Source address)"
    if not mail.recipients:
        return "no recipients"
    if len(mail.recipients) > MAX_DESTINATIONS:
        return f"{len(mail.recipients)} recipients, SES takes at most {MAX_DESTINATIONS} per call"
    if size > MAX_MESSAGE_SIZE:
        return f"{size} bytes, over the SES limit of {MAX_MESSAGE_SIZE}"
    return ""


def tag_safe(text: str) -> str:
    """`text` as an SES tag name or value: ASCII letters, digits, `_` and `-`, 1-255 chars."""
    return _TAG_UNSAFE.sub("_", text)[:255] or "_"


__all__ = [
    "MAX_DESTINATIONS",
    "MAX_MESSAGE_SIZE",
    "Quota",
    "SesClient",
    "Throttled",
    "failure",
    "tag_safe",
]
