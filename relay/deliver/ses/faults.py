"""What an SES answer means for relay: botocore and network errors -> relay's error tree.

    TemporaryFailure   retry SES with backoff until `fallback_after`, then upstream
    └── Throttled      "Maximum sending rate exceeded": also slow the pace down
    PermanentFailure   this message goes upstream at once (MessageRejected, size, <>)
    ├── AccountFailure upstream at once and open the circuit (paused, quota, credentials)
    └── ScopedFailure  upstream at once and open a circuit for one identity or
                       configuration set (`scoped()`: unverified identity, custom MAIL FROM
                       not verified, access denied to one identity, configuration set
                       missing or paused)

The codes are those of botocore's `ses` (v1) and `sesv2` service models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import ResponseParserError

from relay.errors import (
    AccountFailure,
    DeliveryError,
    NotSent,
    PermanentFailure,
    ScopedFailure,
    TemporaryFailure,
    Throttled,
    Unconfirmed,
)

RATE_THROTTLE = "maximum sending rate exceeded"
DAILY_THROTTLE = "daily message quota exceeded"
UNVERIFIED = "not verified"  # MessageRejected "Email address is not verified. The following ..."

THROTTLE_CODES = frozenset({"Throttling", "ThrottlingException", "TooManyRequestsException"})
ACCOUNT_CODES = frozenset(
    {
        "AccountSendingPausedException",
        "AccountSuspendedException",  # v2
        "SendingPausedException",  # v2: account or configuration set paused
        "ConfigurationSetSendingPausedException",
        # without a send's context (which identity, which set) these concern the account;
        # `scoped()` narrows them for a send
        "ConfigurationSetDoesNotExist",
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
MAIL_FROM_CODES = frozenset({"MailFromDomainNotVerifiedException", "MailFromDomainNotVerified"})
CONFIG_SET_CODES = frozenset(
    {"ConfigurationSetDoesNotExist", "ConfigurationSetDoesNotExistException"}
)

# What a send may raise besides our own errors; OSError covers TimeoutError.
ERRORS = (BotoCoreError, ClientError, ResponseParserError, aiohttp.ClientError, OSError)
_NETWORK = (BotoConnectionError, HTTPClientError, ResponseParserError, aiohttp.ClientError, OSError)
_ADDRESS = re.compile(r"[^\s<>,:@]+@([A-Za-z0-9.-]+)")
# AccessDenied naming one identity: "... on resource `arn:aws:ses:eu-west-1:1234:identity/x'",
# or one configuration set (a policy granting identity/* alone): "...:configuration-set/x'"
_DENIED_ARN = re.compile(
    r"arn:aws[a-z-]*:ses:[a-z0-9-]+:\d+:(identity|configuration-set)/([^\s'`\"]+)"
)
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException"})


def failure(exc: BaseException, what: str, *, sent: bool = True) -> DeliveryError:
    """Map an aiobotocore/botocore/network error to relay's delivery error tree. `sent`:
    whether the request went out (botocore's before-send came), for the call's deadline:
    it also runs over a credential lookup (STS, IMDS) that hangs before any request."""
    if isinstance(exc, ClientError):
        return _client_failure(exc, what)
    name = type(exc).__name__
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return AccountFailure(f"SES credentials unusable for {what}: {exc}", reply=name)
    if isinstance(exc, ReadTimeoutError) or (type(exc) is TimeoutError and sent):
        # The request went (the connection was made; TimeoutError is the whole call's
        # deadline): SES may have taken it and its answer been lost.
        reply = f"{name}: {exc}" if str(exc) else name
        return Unconfirmed(f"SES did not answer in time for {what}: {reply}", reply=reply)
    if isinstance(exc, _NETWORK):
        reply = f"{name}: {exc}" if str(exc) else name
        return TemporaryFailure(f"SES unreachable for {what}: {reply}", reply=reply)
    if isinstance(exc, BotoCoreError):
        # Parameter validation and the like: this message as it is will not go.
        return NotSent(f"SES refused {what} before sending: {name}: {exc}", reply=name)
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
    if code in ACCOUNT_CODES or (code == "NotFoundException" and "configuration set" in lowered):
        return AccountFailure(f"SES account cannot send {what}: {reply}", reply=reply)
    if code in TEMPORARY_CODES or status >= 500 or (code.isdigit() and int(code) >= 500):
        return TemporaryFailure(f"SES unavailable for {what}: {reply}", reply=reply)
    return PermanentFailure(f"SES rejected {what}: {reply}", reply=reply)


def scoped(
    exc: DeliveryError,
    *,
    source: str,
    configuration_set: str | None,
    region: str,
    recipients: Sequence[str] = (),
) -> DeliveryError:
    """`exc` as a ScopedFailure when it concerns one identity or configuration set.

    The identity is a domain: with VERP every envelope sender differs, and only the
    domain identity covers them all. SES names the identities that failed the check in
    its MessageRejected text; else the Source domain stands for it. In the SES sandbox it
    names unverified `recipients` the same way: that concerns this mail only.
    """
    code, _, message = exc.reply.partition(":")
    code, message = code.strip(), message.strip()
    lowered = message.lower()
    source_domain = source.rpartition("@")[2].lower()
    if code == "MessageRejected" and UNVERIFIED in lowered:
        addresses = [m.group(0).lower().rstrip(".") for m in _ADDRESS.finditer(message)]
        if addresses and set(addresses) <= {r.lower() for r in recipients}:
            return exc  # the sandbox: a recipient not verified, not a sending identity
        named = [d.lower().rstrip(".") for d in _ADDRESS.findall(message)]
        domain = named[0] if named else source_domain
        advice = f"verify domain {domain} in {region}"
        if domain == source_domain:  # the From header needs its own identity; Source does not
            advice += ", or set ses.source to an address of a verified domain"
        return _scoped(exc, f"identity {domain}", advice)
    if code in MAIL_FROM_CODES:
        advice = (
            f"publish the MX and SPF records of the custom MAIL FROM domain of {source_domain}"
            f" in {region}, or set its behaviour on MX failure to USE_DEFAULT_VALUE"
        )
        return _scoped(exc, f"identity {source_domain}", advice)
    if code in ACCESS_DENIED_CODES and (denied := _DENIED_ARN.search(message)):
        kind, name = denied.groups()
        if kind == "configuration-set":
            advice = (
                f"allow relay's IAM user or role ses:SendRawEmail on configuration set {name}"
                f" in {region} (arn:aws:ses:{region}:<account>:configuration-set/{name})"
            )
            return _scoped(exc, f"configuration set {name}", advice)
        identity = name.rpartition("@")[2].lower()  # an address identity: its domain
        advice = (
            f"allow relay's IAM user or role to send as identity {identity} in {region}"
            " (ses:SendRawEmail / ses:SendEmail on its ARN, or its sending authorization policy)"
        )
        return _scoped(exc, f"identity {identity}", advice)
    if configuration_set and (
        code == "ConfigurationSetSendingPausedException"
        or (code == "SendingPausedException" and "configuration set" in lowered)
    ):
        advice = (
            f"resume sending for configuration set {configuration_set} in {region} (aws sesv2"
            " put-configuration-set-sending-options --sending-enabled)"
        )
        return _scoped(exc, f"configuration set {configuration_set}", advice)
    if configuration_set and (
        code in CONFIG_SET_CODES or (code == "NotFoundException" and "configuration set" in lowered)
    ):
        advice = (
            f"create configuration set {configuration_set} in {region}, or fix the name in"
            " relay.yaml / rules.yaml"
        )
        return _scoped(exc, f"configuration set {configuration_set}", advice)
    return exc


def _scoped(exc: DeliveryError, scope: str, advice: str) -> ScopedFailure:
    narrowed = ScopedFailure(
        f"{exc} (SES cannot send for {scope})", reply=exc.reply, scope=scope, advice=advice
    )
    narrowed.__cause__ = exc.__cause__ or exc
    return narrowed
