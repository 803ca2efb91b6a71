"""SES client faults -> relay's error tree (DESIGN 3.4), with no network.

`client.failure()` is fed botocore `ClientError`s built by hand (the codes and
messages SES sends) and the transport errors botocore, aiohttp and asyncio raise;
`SesClient.send()` runs against a stand-in for the aiobotocore client.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.parsers import ResponseParserError

from relay.deliver.ses.client import (
    MAX_DESTINATIONS,
    MAX_MESSAGE_SIZE,
    MAX_MESSAGE_SIZE_V2,
    SesClient,
    failure,
)
from relay.deliver.ses.faults import scoped
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
from relay.mail import Mail
from relay.settings import Ses, SesApi

ENDPOINT = "https://email.eu-west-1.amazonaws.com/"
ARN = "arn:aws:ses:eu-west-1:123456789012:identity/lms.example.edu"
RULE_ARN = "arn:aws:ses:eu-west-1:210987654321:identity/reminders.example.edu"


def client_error(code: str, message: str, status: int) -> ClientError:
    """A botocore ClientError as SES's error XML would parse into one."""
    response: Any = {
        "Error": {"Type": "Sender", "Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "SendRawEmail")


# id: (code, message, HTTP status), grouped by the class DESIGN 3.4 gives them.
THROTTLED = {  # temporary, and slow the pace
    "rate": ("Throttling", "Maximum sending rate exceeded.", 400),
    "v2-rate": ("ThrottlingException", "Maximum sending rate exceeded.", 429),
    "v2-too-many": ("TooManyRequestsException", "Too many requests.", 429),
    "throttling-no-message": ("Throttling", "", 400),
}
TEMPORARY = {  # retry SES until fallback_after
    "503-code": ("ServiceUnavailable", "Service is unavailable.", 503),
    "500-code": ("InternalFailure", "An internal error occurred.", 500),
    "500-v2": ("InternalError", "We encountered an internal error.", 500),
    "unknown-code-http-502": ("BadGateway", "proxy", 502),
    "numeric-code-504": ("504", "Gateway Timeout", 504),
    "numeric-code-no-status": ("503", "Slow Down", 0),
}
PERMANENT = {  # this message: upstream at once
    "message-rejected": ("MessageRejected", "Email address is not verified: x@y.org", 400),
    "over-size-limit": (
        "InvalidParameterValue",
        "Message length is more than 10485760 bytes long: '10485761'.",
        400,
    ),
    "bad-address": ("InvalidParameterValue", "Missing final '@domain'", 400),
    "illegal-address": ("InvalidParameterValue", "Illegal address", 400),
    "unknown-4xx-code": ("SomethingNew", "a code relay does not know", 400),
    "v2-bad-request": ("BadRequestException", "Illegal header.", 400),
    "v2-not-found-other": ("NotFoundException", "Resource not found.", 404),
}
ACCOUNT = {  # upstream at once and open the circuit
    "daily-quota": ("Throttling", "Daily message quota exceeded.", 400),
    "daily-v2": ("ThrottlingException", "daily message quota exceeded", 429),
    "paused": ("AccountSendingPausedException", "Account sending paused.", 400),
    "no-config-set": ("ConfigurationSetDoesNotExist", "Configuration set <x> does not exist.", 400),
    "config-set-paused": ("ConfigurationSetSendingPausedException", "paused", 400),
    "mail-from": ("MailFromDomainNotVerifiedException", "MAIL FROM domain not verified", 400),
    "denied": ("AccessDenied", "not authorized to perform ses:SendRawEmail", 403),
    "denied-v2": ("AccessDeniedException", "not authorized", 403),
    "bad-key": ("InvalidClientTokenId", "The security token is invalid.", 403),
    "bad-secret": ("SignatureDoesNotMatch", "signature mismatch", 403),
    "expired": ("ExpiredToken", "The security token included in the request is expired", 400),
    "unrecognized": ("UnrecognizedClientException", "invalid token", 400),
    "clock-skew": ("RequestExpired", "Request has expired.", 400),
    "no-signature": ("MissingAuthenticationToken", "missing", 403),
    "v2-paused": ("SendingPausedException", "Sending paused for this account.", 400),
    "v2-suspended": ("AccountSuspendedException", "Account suspended.", 400),
    "v2-no-config-set": ("NotFoundException", "Configuration set <x> does not exist.", 404),
}
CLIENT_ERRORS = [
    pytest.param(*row, expected, id=name)
    for expected, rows in (
        (Throttled, THROTTLED),
        (TemporaryFailure, TEMPORARY),
        (PermanentFailure, PERMANENT),
        (AccountFailure, ACCOUNT),
    )
    for name, row in rows.items()
]


@pytest.mark.parametrize(("code", "message", "status", "expected"), CLIENT_ERRORS)
def test_client_error_codes(
    code: str, message: str, status: int, expected: type[DeliveryError]
) -> None:
    """Each SES error code and message maps to exactly one class; the reply keeps code: message."""
    error = failure(client_error(code, message, status), "message Q1")
    reply = f"{code}: {message}" if message else code
    assert (expected, reply) == (type(error), error.reply)


TRANSPORT_ERRORS = [
    pytest.param(EndpointConnectionError(endpoint_url=ENDPOINT), TemporaryFailure, id="no-conn"),
    pytest.param(ConnectTimeoutError(endpoint_url=ENDPOINT), TemporaryFailure, id="conn-timeout"),
    pytest.param(ReadTimeoutError(endpoint_url=ENDPOINT), Unconfirmed, id="read-timeout"),
    pytest.param(ConnectionClosedError(endpoint_url=ENDPOINT), TemporaryFailure, id="closed"),
    pytest.param(ResponseParserError("not XML"), TemporaryFailure, id="garbled-response"),
    pytest.param(TimeoutError(), Unconfirmed, id="deadline"),
    pytest.param(ConnectionRefusedError(111, "refused"), TemporaryFailure, id="refused"),
    pytest.param(aiohttp.ServerDisconnectedError(), TemporaryFailure, id="aiohttp-disconnect"),
    pytest.param(NoCredentialsError(), AccountFailure, id="no-credentials"),
    pytest.param(
        PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
        AccountFailure,
        id="partial-credentials",
    ),
    pytest.param(
        CredentialRetrievalError(provider="imds", error_msg="timed out"),
        AccountFailure,
        id="credential-lookup",
    ),
    pytest.param(ParamValidationError(report="bad Source"), NotSent, id="bad-params"),
    pytest.param(RuntimeError("surprise"), TemporaryFailure, id="anything-else"),
]


@pytest.mark.parametrize(("exc", "expected"), TRANSPORT_ERRORS)
def test_transport_errors(exc: BaseException, expected: type[DeliveryError]) -> None:
    """Timeouts and connection errors are temporary (unconfirmed once the request went:
    a read timeout, the call's deadline), missing credentials account-wide, requests
    botocore refuses to build permanent; the reply starts with the error's name."""
    error = failure(exc, "message Q1")
    assert (expected, type(exc).__name__) == (type(error), error.reply.split(":")[0])


class FakeBotoClient:
    """Stands in for the aiobotocore SES client: records calls, answers or raises."""

    def __init__(self, answer: dict[str, Any] | BaseException) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    async def send_raw_email(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def send_email(self, **params: Any) -> dict[str, Any]:
        """SESv2 SendEmail: the same fake answers it."""
        return await self.send_raw_email(**params)


def ses_client(
    answer: dict[str, Any] | BaseException, **settings: Any
) -> tuple[SesClient, FakeBotoClient]:
    """An SesClient around a FakeBotoClient (no session, no network), and the fake; with
    `api: v2` the fake stands in for the SESv2 client too."""
    fake = FakeBotoClient(answer)
    v2 = fake if settings.get("api") is SesApi.V2 else None
    return SesClient(fake, AsyncExitStack(), Ses(**settings), v2=v2), fake


def mail(**fields: Any) -> Mail:
    values: dict[str, Any] = {
        "id": "Q1",
        "sender": "noreply@moodle.example.org",
        "recipients": ("student@example.org",),
        "raw": b"Subject: hi\r\n\r\nbody\r\n",
        "trace": b"Received: from moodle\r\n",
    }
    values.update(fields)
    return Mail(**values)


REFUSALS = [
    pytest.param({"sender": ""}, "null sender <> (SES needs a Source address)", id="null-sender"),
    pytest.param({"recipients": ()}, "no recipients", id="no-recipients"),
    pytest.param(
        {"recipients": tuple(f"r{i}@example.org" for i in range(MAX_DESTINATIONS + 1))},
        f"{MAX_DESTINATIONS + 1} recipients, SES takes at most {MAX_DESTINATIONS} per call",
        id="too-many-recipients",
    ),
    pytest.param(  # v1 counts after base64: 3/4 of the limit, and one byte more
        {"raw": b"x" * (MAX_MESSAGE_SIZE * 3 // 4 - len(b"Received: from moodle\r\n") + 1)},
        f"{MAX_MESSAGE_SIZE + 4} bytes, over the SES limit of {MAX_MESSAGE_SIZE}",
        id="over-size-limit",
    ),
]
V2_REFUSALS = [
    pytest.param(
        {"raw": b"x" * (MAX_MESSAGE_SIZE_V2 - len(b"Received: from moodle\r\n") + 1)},
        f"{MAX_MESSAGE_SIZE_V2 + 1} bytes, over the SES limit of {MAX_MESSAGE_SIZE_V2}",
        id="v2-over-40-mb",
    ),
]


@pytest.mark.parametrize(("fields", "reply"), REFUSALS)
async def test_send_refuses_before_calling(fields: dict[str, Any], reply: str) -> None:
    """Mail SES cannot take as it is is NotSent (a PermanentFailure) without any call."""
    client, fake = ses_client({"MessageId": "never"})
    with pytest.raises(PermanentFailure) as caught:
        await client.send(mail(**fields))
    assert (NotSent, reply, []) == (
        type(caught.value),
        caught.value.reply,
        fake.calls,
    )


SEND_CASES = [
    pytest.param(
        {},
        {"recipients": ("a@x.org", "b@y.org")},
        {},
        {
            "Source": "noreply@moodle.example.org",
            "Destinations": ["a@x.org", "b@y.org"],
            "RawMessage": {"Data": b"Received: from moodle\r\nSubject: hi\r\n\r\nbody\r\n"},
        },
        id="envelope-and-bytes-with-trace",
    ),
    pytest.param(
        {"configuration_set": "site-default"},
        {},
        {"tags": [("rule", "reengagement cc"), ("course", "Maths/101")]},
        {
            "ConfigurationSetName": "site-default",
            "Tags": [
                {"Name": "rule", "Value": "reengagement_cc"},
                {"Name": "course", "Value": "Maths_101"},
            ],
        },
        id="settings-config-set-and-safe-tags",
    ),
    pytest.param(
        {"configuration_set": "site-default"},
        {},
        {"configuration_set": "per-rule"},
        {"ConfigurationSetName": "per-rule"},
        id="rule-config-set-wins",
    ),
    pytest.param(
        {},
        {"recipients": tuple(f"r{i}@example.org" for i in range(MAX_DESTINATIONS))},
        {},
        {"Destinations": [f"r{i}@example.org" for i in range(MAX_DESTINATIONS)]},
        id="exactly-fifty-recipients-one-call",
    ),
    pytest.param(
        {"identity_arn": ARN, "source": "bounces@lms.example.edu"},
        {},
        {},
        {
            "Source": "bounces@lms.example.edu",
            "SourceArn": ARN,
            "FromArn": ARN,
            "ReturnPathArn": ARN,
        },
        id="v1-identity-arn-and-source",
    ),
    pytest.param(
        {"identity_arn": ARN},
        {},
        {"identity_arn": RULE_ARN},
        {"SourceArn": RULE_ARN, "FromArn": RULE_ARN, "ReturnPathArn": RULE_ARN},
        id="v1-rule-identity-arn-wins",
    ),
    pytest.param(
        {"api": SesApi.V2},
        {"recipients": ("a@x.org", "b@y.org")},
        {"tags": [("rule", "reengagement cc")], "configuration_set": "per-rule"},
        {
            "FromEmailAddress": "noreply@moodle.example.org",
            "Destination": {"ToAddresses": ["a@x.org", "b@y.org"]},
            "Content": {"Raw": {"Data": b"Received: from moodle\r\nSubject: hi\r\n\r\nbody\r\n"}},
            "EmailTags": [{"Name": "rule", "Value": "reengagement_cc"}],
            "ConfigurationSetName": "per-rule",
        },
        id="v2-envelope-bytes-tags-and-set",
    ),
    pytest.param(
        {"api": SesApi.V2, "identity_arn": ARN, "feedback_address": "fb@lms.example.edu"},
        {},
        {},
        {
            "FromEmailAddressIdentityArn": ARN,
            "FeedbackForwardingEmailAddress": "fb@lms.example.edu",
        },
        id="v2-identity-arn-and-feedback-address",
    ),
]


@pytest.mark.parametrize(("settings", "fields", "kwargs", "expected"), SEND_CASES)
async def test_send_parameters(
    settings: dict[str, Any],
    fields: dict[str, Any],
    kwargs: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    """SendRawEmail (v1) or SendEmail (v2) gets the envelope (Source: `ses.source` if set),
    the bytes with our Received: line, the configuration set (the rule's, else the
    settings'), tags reduced to what SES accepts, and the identity ARN (the rule's, else the
    settings') as each API names it."""
    client, fake = ses_client({"MessageId": "ses-1"}, **settings)
    message_id = await client.send(mail(**fields), **kwargs)
    (call,) = fake.calls
    assert ("ses-1", expected) == (message_id, {k: call[k] for k in expected})


async def test_send_maps_and_chains_client_errors() -> None:
    """A ClientError from SendRawEmail leaves as relay's error, with the botocore cause chained."""
    cause = client_error("AccountSendingPausedException", "Account sending paused.", 400)
    client, _ = ses_client(cause)
    with pytest.raises(AccountFailure) as caught:
        await client.send(mail())
    assert (cause, "AccountSendingPausedException: Account sending paused.") == (
        caught.value.__cause__,
        caught.value.reply,
    )


@pytest.mark.parametrize(("fields", "reply"), V2_REFUSALS)
async def test_v2_takes_40_mb_and_refuses_more_before_calling(
    fields: dict[str, Any], reply: str
) -> None:
    """v2 takes up to 40 MB (a mail over v1's 10 MB goes out); more is refused before any
    call."""
    client, fake = ses_client({"MessageId": "ses-1"}, api=SesApi.V2)
    sent = await client.send(mail(raw=b"x" * (MAX_MESSAGE_SIZE + 1)))
    with pytest.raises(PermanentFailure) as caught:
        await client.send(mail(**fields))
    assert ("ses-1", NotSent, reply, 1) == (
        sent,
        type(caught.value),
        caught.value.reply,
        len(fake.calls),
    )


async def test_send_without_message_id_is_unconfirmed() -> None:
    """SES answering 200 without a MessageId is not a lost message, nor one to send
    through SES again (it may have sent it): Unconfirmed."""
    client, _ = ses_client({"ResponseMetadata": {"HTTPStatusCode": 200}})
    with pytest.raises(TemporaryFailure) as caught:
        await client.send(mail())
    assert (Unconfirmed, "SendRawEmail response without MessageId") == (
        type(caught.value),
        caught.value.reply,
    )


UNVERIFIED = "Email address is not verified. The following identities failed the check in region"
VERP = "bounce+1a2b@lms.example.edu"
PAUSED_SET_ADVICE = (
    "resume sending for configuration set cs in eu-west-1 (aws sesv2"
    " put-configuration-set-sending-options --sending-enabled)"
)
# id: (code, message, Source, configuration set) -> (class, scope or None, advice or None)
SCOPED = [
    pytest.param(
        ("MessageRejected", f"{UNVERIFIED} EU-WEST-1: {VERP}", VERP, None),
        (
            ScopedFailure,
            "identity lms.example.edu",
            "verify domain lms.example.edu in eu-west-1, or set ses.source to an address of"
            " a verified domain",
        ),
        id="unverified-verp-source-is-its-domain",
    ),
    pytest.param(
        ("MessageRejected", f"{UNVERIFIED} EU-WEST-1: Ada <ada@staff.example.edu>", VERP, None),
        (
            ScopedFailure,
            "identity staff.example.edu",
            "verify domain staff.example.edu in eu-west-1",
        ),
        id="unverified-from-header",
    ),
    pytest.param(
        ("MessageRejected", "Email address is not verified.", VERP, None),
        (
            ScopedFailure,
            "identity lms.example.edu",
            "verify domain lms.example.edu in eu-west-1, or set ses.source to an address of"
            " a verified domain",
        ),
        id="unverified-unnamed-is-the-source",
    ),
    pytest.param(
        ("MailFromDomainNotVerifiedException", "MAIL FROM domain not verified", VERP, None),
        (
            ScopedFailure,
            "identity lms.example.edu",
            "publish the MX and SPF records of the custom MAIL FROM domain of lms.example.edu"
            " in eu-west-1, or set its behaviour on MX failure to USE_DEFAULT_VALUE",
        ),
        id="mail-from-domain",
    ),
    pytest.param(
        ("ConfigurationSetDoesNotExist", "Configuration set <cs> does not exist.", VERP, "cs"),
        (
            ScopedFailure,
            "configuration set cs",
            "create configuration set cs in eu-west-1, or fix the name in relay.yaml / rules.yaml",
        ),
        id="v1-no-config-set",
    ),
    pytest.param(
        ("NotFoundException", "Configuration set <cs> does not exist.", VERP, "cs"),
        (
            ScopedFailure,
            "configuration set cs",
            "create configuration set cs in eu-west-1, or fix the name in relay.yaml / rules.yaml",
        ),
        id="v2-no-config-set",
    ),
    pytest.param(
        ("MessageRejected", "Illegal header.", VERP, "cs"),
        (PermanentFailure, None, None),
        id="content-rejection-stays-per-message",
    ),
    pytest.param(
        ("AccountSendingPausedException", "paused", VERP, "cs"),
        (AccountFailure, None, None),
        id="paused-stays-account-wide",
    ),
    pytest.param(
        ("ConfigurationSetSendingPausedException", "Sending is paused for <cs>.", VERP, "cs"),
        (ScopedFailure, "configuration set cs", PAUSED_SET_ADVICE),
        id="v1-config-set-paused-is-that-set",
    ),
    pytest.param(
        ("SendingPausedException", "Sending is paused for configuration set cs.", VERP, "cs"),
        (ScopedFailure, "configuration set cs", PAUSED_SET_ADVICE),
        id="v2-config-set-paused-is-that-set",
    ),
    pytest.param(
        ("SendingPausedException", "Sending is paused for this account.", VERP, "cs"),
        (AccountFailure, None, None),
        id="v2-account-paused-stays-account-wide",
    ),
    pytest.param(
        (
            "AccessDenied",
            f"not authorized to perform `ses:SendRawEmail' on resource `{RULE_ARN}'",
            VERP,
            None,
        ),
        (
            ScopedFailure,
            "identity reminders.example.edu",
            "allow relay's IAM user or role to send as identity reminders.example.edu in"
            " eu-west-1 (ses:SendRawEmail / ses:SendEmail on its ARN, or its sending"
            " authorization policy)",
        ),
        id="access-denied-to-one-identity-is-that-identity",
    ),
    pytest.param(
        (
            # A policy granting identity/* but not configuration-set/*: before, the account
            # circuit opened, and every SES rule's mail went upstream (and it flapped).
            "AccessDenied",
            "User `arn:aws:iam::123456789012:user/relay' is not authorized to perform"
            " `ses:SendRawEmail' on resource"
            " `arn:aws:ses:eu-west-1:123456789012:configuration-set/moodle-reminders'",
            VERP,
            "moodle-reminders",
        ),
        (
            ScopedFailure,
            "configuration set moodle-reminders",
            "allow relay's IAM user or role ses:SendRawEmail on configuration set"
            " moodle-reminders in eu-west-1"
            " (arn:aws:ses:eu-west-1:<account>:configuration-set/moodle-reminders)",
        ),
        id="access-denied-to-one-configuration-set-is-that-set",
    ),
    pytest.param(
        ("AccessDenied", "User is not authorized to perform `ses:SendRawEmail'", VERP, None),
        (AccountFailure, None, None),
        id="access-denied-naming-no-identity-stays-account-wide",
    ),
]


@pytest.mark.parametrize(("given", "expected"), SCOPED)
def test_scoped_faults(
    given: tuple[str, str, str, str | None], expected: tuple[type, str | None, str | None]
) -> None:
    """A send's fault that concerns one identity (a domain: VERP senders share it) or one
    configuration set is narrowed to a ScopedFailure naming it and saying what to do; other
    faults keep their class."""
    code, message, source, config_set = given
    error = scoped(
        failure(client_error(code, message, 400), "message Q1"),
        source=source,
        configuration_set=config_set,
        region="eu-west-1",
    )
    actual = (
        type(error),
        getattr(error, "scope", None),
        getattr(error, "advice", None),
    )
    assert expected == actual


def test_an_unverified_recipient_in_the_sandbox_stays_per_message() -> None:
    """In the SES sandbox MessageRejected names an unverified recipient as it names an
    unverified sender. A recipient of this mail is not a sending identity: the mail goes
    upstream alone, no circuit. Taken for one, it stopped every mail of the sender's domain
    (student@lms.example.edu, sent from lms.example.edu) for the cooldown."""
    message = f"{UNVERIFIED} EU-WEST-1: student@lms.example.edu"
    error = scoped(
        failure(client_error("MessageRejected", message, 400), "message Q1"),
        source=VERP,
        configuration_set=None,
        region="eu-west-1",
        recipients=("Student@lms.example.edu",),
    )
    assert PermanentFailure is type(error)
