"""SES route of the deliver stage: one long-lived aiobotocore client sends each mail.

`ses.api: v1` sends with SendRawEmail (10 MB), `v2` with SESv2 SendEmail and
`Content.Raw` (40 MB); both take the same envelope, bytes, configuration set and
tags, and both fail the same way (`faults`: relay's error tree). With sending
authorization (`identity_arn`, per rule or global) v1 names the identity as
SourceArn, FromArn and ReturnPathArn, v2 as FromEmailAddressIdentityArn.

botocore's own retries are off: the deliver loop owns retrying and pacing.
Credentials come from the standard chain and never appear in a message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session

from relay import settings as _settings
from relay.deliver.ses.faults import ERRORS, failure, scoped
from relay.errors import AccountFailure, DeliveryError, NotSent, Unconfirmed
from relay.mail import Mail, header_block
from relay.settings import SesApi

MAX_DESTINATIONS = 50  # SES: at most 50 recipients per message, both APIs
# SES refuses bigger messages; it counts the MIME message, attachments already encoded.
MAX_MESSAGE_SIZE = 10 * 1024 * 1024  # v1 SendRawEmail, counted after base64 (SES's quotas)
MAX_MESSAGE_SIZE_V2 = 40 * 1024 * 1024  # v2 SendEmail with Content.Raw
CONNECT_TIMEOUT = 5.0  # seconds; capped by settings.timeout

# Header fields SES reads out of a raw mail and obeys (X-SES-CONFIGURATION-SET, -MESSAGE-TAGS,
# -SOURCE-ARN, -FROM-ARN, -RETURN-PATH-ARN): any client's mail naming a configuration set
# that does not exist, or another account's identity, made SES refuse it in words relay
# takes for the whole account or the site's identity, and all SES mail went upstream for
# the cooldown. Moodle never writes them; such a mail goes upstream alone.
_SES_FIELD = re.compile(
    rb"^(x-ses-(?:configuration-set|message-tags|source-arn|from-arn|return-path-arn))[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)

_ACTIONS = {"send_raw_email": "SendRawEmail", "send_email": "SendEmail"}
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Quota:
    """GetSendQuota in recipients; `max_24h` is -1 when the account has no daily limit."""

    max_24h: float
    max_send_rate: float
    sent_last_24h: float


class SesClient:
    """One aiobotocore SES client (v1 or v2, as `ses.api` says) for the life of the service.

    Open with `ses = await SesClient.open(settings)` and `await ses.close()` when
    done, or use the opened client as `async with`: `async with await SesClient.open(s) as ses:`.
    """

    def __init__(
        self, client: Any, stack: AsyncExitStack, settings: _settings.Ses, *, v2: Any = None
    ) -> None:
        """`client` is the v1 client (quota, identities); `v2` the SESv2 one, used for
        sending when `settings.api` is v2."""
        self._client = client
        self._v2 = v2
        self.api = SesApi.V2 if v2 is not None else SesApi.V1
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
        client.meta.events.register("before-send", _request_sent)
        v2 = None
        if settings.api is SesApi.V2:
            v2 = await stack.enter_async_context(
                session.create_client(
                    "sesv2",
                    region_name=settings.region,
                    endpoint_url=settings.endpoint_url,
                    config=config,
                )
            )
            v2.meta.events.register("before-send", _request_sent)
        return cls(client, stack, settings, v2=v2)

    def use(self, settings: _settings.Ses) -> None:
        """A reload's settings for the next sends (source, configuration set, identity ARN,
        feedback address); those the client was made with (region, endpoint, API, timeout)
        stay until a restart (relay.runtime keeps them in the reloaded settings too)."""
        self._settings = settings

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def max_message_size(self) -> int:
        return MAX_MESSAGE_SIZE_V2 if self._v2 is not None else MAX_MESSAGE_SIZE

    async def send(
        self,
        mail: Mail,
        *,
        configuration_set: str | None = None,
        tags: Sequence[tuple[str, str]] = (),
        identity_arn: str | None = None,
    ) -> str:
        """Send `mail.wire_bytes()` to the envelope; return the SES MessageId.

        `configuration_set` and `identity_arn` None mean the ones in settings (if any). The
        Source is `ses.source` if set, else the envelope sender. Tag names and values are
        reduced to what SES accepts (letters, digits, `_`, `-`). Mail that SES cannot take
        as it is (null sender, no or over MAX_DESTINATIONS recipients, over the API's size
        limit, base64 included for v1), and mail carrying an X-SES-* field (see _SES_FIELD),
        raises NotSent before any call; the caller splits recipients.
        """
        data = mail.wire_bytes()
        size = len(data) if self._v2 is not None else 4 * -(-len(data) // 3)  # base64 for v1
        refusal = _refusal(mail, size, self.max_message_size)
        if refusal:
            raise NotSent(f"SES cannot send {mail.id}: {refusal}", reply=refusal)
        ses = self._settings
        source = ses.source or mail.sender
        config_set = configuration_set or ses.configuration_set
        arn = identity_arn or ses.identity_arn
        safe_tags = [{"Name": tag_safe(n), "Value": tag_safe(v)} for n, v in tags]
        params: dict[str, Any]
        if self._v2 is None:
            method = "send_raw_email"
            params = {"Source": source, "Destinations": list(mail.recipients)}
            params["RawMessage"] = {"Data": data}
            if arn:
                params |= {"SourceArn": arn, "FromArn": arn, "ReturnPathArn": arn}
            if safe_tags:
                params["Tags"] = safe_tags
        else:
            method = "send_email"
            params = {
                "FromEmailAddress": source,
                "Destination": {"ToAddresses": [*mail.recipients]},
            }
            params["Content"] = {"Raw": {"Data": data}}
            if arn:
                params["FromEmailAddressIdentityArn"] = arn
            if ses.feedback_address:
                params["FeedbackForwardingEmailAddress"] = ses.feedback_address
            if safe_tags:
                params["EmailTags"] = safe_tags
        if config_set:
            params["ConfigurationSetName"] = config_set
        try:
            response = await self._call(method, f"message {mail.id}", **params)
        except DeliveryError as exc:
            narrowed = scoped(
                exc,
                source=source,
                configuration_set=config_set,
                region=ses.region,
                recipients=mail.recipients,
            )
            if narrowed is exc:
                raise
            raise narrowed from exc.__cause__
        message_id = response.get("MessageId")
        if not message_id:  # SES answered 200 but said nothing usable: it may have sent it
            raise Unconfirmed(
                f"SES accepted {mail.id} without a MessageId",
                reply=f"{_ACTIONS[method]} response without MessageId",
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

    async def identity_statuses(self, identities: Sequence[str]) -> dict[str, str]:
        """VerificationStatus of each identity SES knows among `identities`, in one call."""
        r = await self._call(
            "get_identity_verification_attributes",
            f"identities {', '.join(identities)}",
            Identities=list(identities),
        )
        found = r.get("VerificationAttributes", {})
        return {i: str(a.get("VerificationStatus")) for i, a in found.items()}

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
        client = self._v2 if method == "send_email" else self._client
        token = _SENT.set(False)
        try:
            async with asyncio.timeout(self._deadline):
                response: dict[str, Any] = await getattr(client, method)(**params)
        except ERRORS as exc:
            raise failure(exc, what, sent=_SENT.get()) from exc
        finally:
            _SENT.reset(token)
        return response


# Whether the call in this task has sent its request yet (botocore's before-send event):
# the whole call's deadline before it means SES got nothing, after it perhaps the mail.
_SENT: ContextVar[bool] = ContextVar("ses_request_sent", default=False)


def _request_sent(**kwargs: Any) -> None:
    _SENT.set(True)  # None: botocore sends the request itself


def _refusal(mail: Mail, size: int, limit: int) -> str:
    if not mail.sender:
        return "null sender <> (SES needs a Source address)"
    if not mail.recipients:
        return "no recipients"
    if len(mail.recipients) > MAX_DESTINATIONS:
        return f"{len(mail.recipients)} recipients, SES takes at most {MAX_DESTINATIONS} per call"
    if size > limit:
        return f"{size} bytes, over the SES limit of {limit}"
    field = _SES_FIELD.search(header_block(mail.raw))
    if field:  # SES would obey it: a configuration set or an identity of the client's choosing
        name = field.group(1).decode("ascii")
        return f"the mail carries {name}:, which relay leaves to no client (SES would obey it)"
    return ""


def tag_safe(text: str) -> str:
    """`text` as an SES tag name or value: ASCII letters, digits, `_` and `-`, 1-255 chars."""
    return _TAG_UNSAFE.sub("_", text)[:255] or "_"


__all__ = [
    "MAX_DESTINATIONS",
    "MAX_MESSAGE_SIZE",
    "MAX_MESSAGE_SIZE_V2",
    "Quota",
    "SesClient",
    "failure",
    "tag_safe",
]
