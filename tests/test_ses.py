"""relay.deliver.ses.client against a moto server (happy path) and the fake SES (faults),
over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import AioSession
from botocore.exceptions import ClientError

from relay.deliver.ses.client import (
    MAX_DESTINATIONS,
    MAX_MESSAGE_SIZE,
    MAX_MESSAGE_SIZE_V2,
    Quota,
    SesClient,
    tag_safe,
)
from relay.errors import (
    AccountFailure,
    NotSent,
    PermanentFailure,
    ScopedFailure,
    TemporaryFailure,
    Throttled,
    Unconfirmed,
)
from relay.settings import Ses, SesApi
from tests.support.aws import REGION, moto_raw_messages
from tests.support.fakeses import DROP, HTTP_500, V2_ERRORS, FakeSes, Fault
from tests.support.mails import RAW, make_mail

pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture(params=list(SesApi), ids=[f"api-{a}" for a in SesApi])
async def ses(
    fake_ses: FakeSes, aio_session: AioSession, request: pytest.FixtureRequest
) -> AsyncIterator[SesClient]:
    """An SesClient pointed at the fake SES, once per API (v1 SendRawEmail, v2 SendEmail)."""
    settings = Ses(region=REGION, endpoint_url=fake_ses.url, timeout=2.0, api=request.param)
    async with await SesClient.open(settings, session=aio_session) as client:
        yield client


@pytest.mark.parametrize("api", list(SesApi), ids=[f"api-{a}" for a in SesApi])
async def test_send_through_moto_stores_envelope_and_bytes(
    moto_server: str,
    aio_session: AioSession,
    api: SesApi,
) -> None:
    """Source, Destinations and the bytes (trace line + raw, unchanged) reach SES as given,
    by SendRawEmail (v1) or SESv2 SendEmail with Content.Raw (v2; moto stores it alike)."""
    mail = make_mail(id="Q-moto", recipients=("ada@example.net", "cc@example.org"))
    settings = Ses(region=REGION, endpoint_url=moto_server, api=api)
    async with await SesClient.open(settings, session=aio_session) as client:
        message_id = await client.send(mail, configuration_set=None, tags=[("rule", "r")])

    stored = [m for m in moto_raw_messages(moto_server) if m["id"] == message_id]
    assert 1 == len(stored)
    assert mail.sender == stored[0]["source"]
    # moto appends the To/Cc header addresses after the envelope recipients
    assert list(mail.recipients) == stored[0]["destinations"][: len(mail.recipients)]
    assert mail.wire_bytes().decode() == stored[0]["raw_data"]


async def test_quota_from_moto(moto_server: str) -> None:
    """GetSendQuota comes back as a Quota of floats (moto's fixed 200/day, 1/s)."""
    async with await SesClient.open(Ses(region=REGION, endpoint_url=moto_server)) as client:
        quota = await client.quota()
    assert (200.0, 1.0) == (quota.max_24h, quota.max_send_rate)
    assert isinstance(quota.sent_last_24h, float)


async def test_unverified_sender_rejected_by_moto(moto_server: str) -> None:
    """moto's MessageRejected for an unverified Source is permanent for the message."""
    mail = make_mail(sender="someone@unverified.example")
    async with await SesClient.open(Ses(region=REGION, endpoint_url=moto_server)) as client:
        with pytest.raises(PermanentFailure) as caught:
            await client.send(mail, configuration_set=None, tags=())
    assert type(caught.value) is PermanentFailure
    assert caught.value.reply.startswith("MessageRejected: ")


async def test_tags_and_configuration_set_reach_ses(ses: SesClient, fake_ses: FakeSes) -> None:
    """The rule tag, extra tags and the configuration set are sent with the message."""
    mail = make_mail()
    tags = [("rule", "reengagement-cc"), ("category", "reminder")]
    message_id = await ses.send(mail, configuration_set="moodle-reminders", tags=tags)

    [sent] = fake_ses.sent
    assert message_id == sent.message_id
    assert (mail.sender, mail.recipients) == (sent.source, sent.destinations)
    assert mail.wire_bytes() == sent.raw
    assert tuple(tags) == sent.tags
    assert "moodle-reminders" == sent.configuration_set


async def test_configuration_set_defaults_to_settings(fake_ses: FakeSes) -> None:
    """With no per-rule configuration set, the one in settings is used; no tags means none sent."""
    settings = Ses(region=REGION, endpoint_url=fake_ses.url, configuration_set="site-default")
    async with await SesClient.open(settings) as client:
        await client.send(make_mail(), configuration_set=None, tags=())
    assert ("site-default", ()) == (fake_ses.sent[0].configuration_set, fake_ses.sent[0].tags)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("reengagement-cc", "reengagement-cc"), ("a b/c.d", "a_b_c_d"), ("", "_"), ("é", "_")],
    ids=["safe", "spaces-and-punctuation", "empty", "non-ascii"],
)
def test_tag_safe(text: str, expected: str) -> None:
    """Tag names and values are reduced to what SES accepts instead of failing every send."""
    assert expected == tag_safe(text)


async def test_quota_from_fake(fake_ses: FakeSes, ses: SesClient) -> None:
    """GetSendQuota maps Max24HourSend, MaxSendRate and SentLast24Hours."""
    fake_ses.rate_limit, fake_ses.daily_quota = 20.0, 50000.0
    await ses.send(make_mail(recipients=("a@example.net", "b@example.net")), configuration_set=None)
    assert Quota(max_24h=50000.0, max_send_rate=20.0, sent_last_24h=2.0) == await ses.quota()


ERRORS = [
    # (code, message, HTTP status, expected class)
    ("Throttling", "Maximum sending rate exceeded.", 400, Throttled),
    ("Throttling", "Daily message quota exceeded.", 400, AccountFailure),
    ("Throttling", "Rate exceeded", 400, Throttled),
    ("ServiceUnavailable", "Service is unavailable.", 503, TemporaryFailure),
    ("InternalFailure", "An internal error occurred.", 500, TemporaryFailure),
    ("SomethingNew", "A future 5xx code.", 502, TemporaryFailure),
    ("MessageRejected", "Email address is not verified.", 400, ScopedFailure),
    ("MessageRejected", "Illegal header.", 400, PermanentFailure),
    ("InvalidParameterValue", "Missing final '@domain'", 400, PermanentFailure),
    ("AccountSendingPausedException", "Sending paused for this account.", 400, AccountFailure),
    ("ConfigurationSetDoesNotExist", "Configuration set <x> does not exist.", 400, AccountFailure),
    ("ConfigurationSetSendingPausedException", "Paused.", 400, AccountFailure),
    ("MailFromDomainNotVerifiedException", "MAIL FROM not verified.", 400, ScopedFailure),
    ("InvalidClientTokenId", "The security token is invalid.", 403, AccountFailure),
    ("SignatureDoesNotMatch", "The signature does not match.", 403, AccountFailure),
    ("AccessDenied", "User is not authorized to perform ses:SendRawEmail", 403, AccountFailure),
    ("UnrecognizedClientException", "The security token is invalid.", 400, AccountFailure),
    ("ExpiredToken", "The security token has expired.", 403, AccountFailure),
]


@pytest.mark.parametrize(
    ("code", "message", "status", "expected"),
    ERRORS,
    ids=[
        f"{c}-{m.split()[0]}" if c in ("Throttling", "MessageRejected") else c
        for c, m, _, _ in ERRORS
    ],
)
async def test_error_mapping(
    ses: SesClient,
    fake_ses: FakeSes,
    code: str,
    message: str,
    status: int,
    expected: type[Exception],
) -> None:
    """Each SES error code becomes the delivery error DESIGN 3.4 names, reply 'Code: message';
    under v2 the fake answers the SESv2 error of the same meaning, with the same outcome."""
    fake_ses.error = Fault(code=code, message=message, status=status)
    mail = make_mail(id="Q-err")
    with pytest.raises((TemporaryFailure, PermanentFailure)) as caught:
        await ses.send(mail, configuration_set=None, tags=())
    wire_code = code if ses.api is SesApi.V1 else V2_ERRORS.get(code, (code,))[0]
    assert expected is type(caught.value)
    assert f"{wire_code}: {message}" == caught.value.reply
    assert "Q-err" in str(caught.value)
    assert isinstance(caught.value.__cause__, ClientError)


@pytest.mark.parametrize("fault", [HTTP_500, DROP], ids=["html-500", "connection-dropped"])
async def test_broken_responses_are_temporary(
    ses: SesClient,
    fake_ses: FakeSes,
    fault: Fault,
) -> None:
    """A 500 with a non-XML body, or a dropped connection, is worth retrying."""
    fake_ses.fail_next(fault)
    with pytest.raises(TemporaryFailure) as caught:
        await ses.send(make_mail(), configuration_set=None, tags=())
    assert TemporaryFailure is type(caught.value)
    assert caught.value.__cause__ is not None


async def test_one_shot_fault_then_success(ses: SesClient, fake_ses: FakeSes) -> None:
    """The client survives a throttle and the next call on the same pool goes through."""
    fake_ses.fail_next(Fault(code="Throttling", message="Maximum sending rate exceeded."))
    with pytest.raises(Throttled):
        await ses.send(make_mail(), configuration_set=None, tags=())
    await ses.send(make_mail(), configuration_set=None, tags=())
    assert (2, 1) == (fake_ses.calls, len(fake_ses.sent))


async def test_timeout_is_unconfirmed(fake_ses: FakeSes) -> None:
    """An answer slower than settings.timeout is Unconfirmed (a TemporaryFailure: SES may
    have sent it), raised on time."""
    fake_ses.latency = 2.0
    settings = Ses(region=REGION, endpoint_url=fake_ses.url, timeout=0.3)
    async with await SesClient.open(settings) as client:
        started = time.monotonic()
        with pytest.raises(TemporaryFailure) as caught:
            await client.send(make_mail(), configuration_set=None, tags=())
        elapsed = time.monotonic() - started
    assert Unconfirmed is type(caught.value)
    assert elapsed < 1.5
    fake_ses.latency = 0.0


async def test_a_credential_lookup_that_hangs_is_no_unconfirmed_send(
    fake_ses: FakeSes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Credentials from a web identity (EKS, ECS): botocore asks STS for them inside the
    first send. An STS that never answers ran the whole call's deadline out before any
    request went to SES, and that counted as "SES may have sent it": every SES mail went
    upstream at once and never to SES again. With no request sent (botocore's before-send
    never came) it is a plain temporary failure, retried on SES."""
    answered = asyncio.Event()  # never, until the test ends

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answered.wait()
        writer.close()
        await writer.wait_closed()

    sts = await asyncio.start_server(never, "127.0.0.1", 0)
    token = tmp_path / "token"
    token.write_text("token")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/relay")
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{sts.sockets[0].getsockname()[1]}"
    )
    settings = Ses(region=REGION, endpoint_url=fake_ses.url, timeout=1.0)
    try:
        async with await SesClient.open(settings) as client:
            with pytest.raises(TemporaryFailure) as caught:
                await client.send(make_mail(), configuration_set=None, tags=())
    finally:
        answered.set()
        sts.close()
        await sts.wait_closed()
        await asyncio.sleep(0.1)
    assert (TemporaryFailure, "TimeoutError", 0) == (
        type(caught.value),
        caught.value.reply,
        fake_ses.calls,
    )


async def test_connection_refused_is_temporary() -> None:
    """Nothing listening at the endpoint is a TemporaryFailure."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Ses(region=REGION, endpoint_url=f"http://127.0.0.1:{port}", timeout=1.0)
    async with await SesClient.open(settings) as client:
        with pytest.raises(TemporaryFailure) as caught:
            await client.send(make_mail(), configuration_set=None, tags=())
    assert TemporaryFailure is type(caught.value)
    assert "EndpointConnectionError" in caught.value.reply


async def test_missing_credentials_are_account_wide(
    fake_ses: FakeSes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No credentials anywhere in the chain opens the circuit rather than retrying forever."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with await SesClient.open(Ses(region=REGION, endpoint_url=fake_ses.url)) as client:
        with pytest.raises(AccountFailure) as caught:
            await client.send(make_mail(), configuration_set=None, tags=())
    assert "NoCredentialsError" == caught.value.reply
    assert 0 == fake_ses.calls


PREFLIGHT = [
    ({"sender": ""}, "null sender"),
    ({"recipients": ()}, "no recipients"),
    (
        {"recipients": tuple(f"r{i}@example.net" for i in range(MAX_DESTINATIONS + 1))},
        "51 recipients",
    ),
    ({"raw": b"Subject: big\r\n\r\n" + b"x" * MAX_MESSAGE_SIZE}, "over the SES limit"),
    ({"raw": b"x-ses-configuration-set : nope\r\n" + RAW}, "x-ses-configuration-set:"),
    ({"raw": RAW.replace(b"MIME", b"X-SES-FROM-ARN: arn:aws:ses:x\r\nMIME")}, "X-SES-FROM-ARN:"),
]
V2_PREFLIGHT = {"size": {"raw": b"Subject: big\r\n\r\n" + b"x" * MAX_MESSAGE_SIZE_V2}}


@pytest.mark.parametrize(
    ("changes", "reason"),
    PREFLIGHT,
    ids=["null-sender", "no-recipients", "51-rcpts", "size", "x-ses-set", "x-ses-arn"],
)
async def test_refused_before_calling(
    ses: SesClient,
    fake_ses: FakeSes,
    changes: dict[str, object],
    reason: str,
) -> None:
    """Mail SES cannot take is NotSent (a PermanentFailure) without a call, so it goes
    upstream at once (v2 takes up to 40 MB)."""
    if ses.api is SesApi.V2 and reason == "over the SES limit":
        changes = V2_PREFLIGHT["size"]
    with pytest.raises(PermanentFailure) as caught:
        await ses.send(make_mail(**changes), configuration_set=None, tags=())
    assert NotSent is type(caught.value)
    assert reason in caught.value.reply
    assert 0 == fake_ses.calls


async def test_a_mail_with_an_x_ses_field_ses_does_not_obey_goes_to_ses(
    ses: SesClient, fake_ses: FakeSes
) -> None:
    """X-SES-Outgoing (which SES stamps on what it sends) is no instruction to SES: such a
    mail, forwarded, goes through SES as any other."""
    raw = RAW.replace(b"MIME", b"X-SES-Outgoing: 2026.12.07-54.240.1.1\r\nMIME")
    await ses.send(make_mail(raw=raw), configuration_set=None, tags=())
    assert 1 == fake_ses.calls


async def test_v1_counts_the_size_after_base64(fake_ses: FakeSes) -> None:
    """SES v1's 10 MB are counted after base64 (SES's quotas page): 8 MiB goes upstream at
    once, not after an upload of 11 MB that SES refuses."""
    settings = Ses(region=REGION, endpoint_url=fake_ses.url, api=SesApi.V1)
    async with await SesClient.open(settings) as client:
        with pytest.raises(NotSent) as caught:
            await client.send(make_mail(raw=RAW + b"x" * (8 * 1024 * 1024)))
    size, said = caught.value.reply.split(" ", 1)
    assert (True, "bytes, over the SES limit of 10485760") == (int(size) > 11_000_000, said)
    assert 0 == fake_ses.calls


async def test_exactly_fifty_recipients_go_in_one_call(ses: SesClient, fake_ses: FakeSes) -> None:
    """MAX_DESTINATIONS recipients are still one SendRawEmail."""
    recipients = tuple(f"r{i}@example.net" for i in range(MAX_DESTINATIONS))
    await ses.send(make_mail(recipients=recipients), configuration_set=None, tags=())
    assert recipients == fake_ses.sent[0].destinations


async def test_doctor_checks(ses: SesClient, fake_ses: FakeSes) -> None:
    """Sending enabled, sender identity (address or domain) and configuration set checks."""
    fake_ses.verified = {"moodle.example.org"}
    fake_ses.configuration_sets = {"moodle-reminders"}
    assert await ses.sending_enabled()
    assert await ses.sender_verified("noreply@moodle.example.org")
    assert not await ses.sender_verified("noreply@other.example.org")
    assert "NotStarted" == await ses.identity_status("other.example.org")
    assert await ses.configuration_set_exists("moodle-reminders")
    assert not await ses.configuration_set_exists("missing")
    fake_ses.sending_enabled = False
    assert not await ses.sending_enabled()


ARN = "arn:aws:ses:eu-west-1:123456789012:identity/lms.example.edu"
RULE_ARN = "arn:aws:ses:eu-west-1:210987654321:identity/reminders.example.edu"
V1_ARNS = ("SourceArn", "FromArn", "ReturnPathArn")
WIRE = [
    pytest.param(
        {"api": SesApi.V1, "identity_arn": ARN},
        None,
        ("v1", "noreply@moodle.example.org", dict.fromkeys(V1_ARNS, ARN), None),
        id="v1-global-arn",
    ),
    pytest.param(
        {"api": SesApi.V1, "identity_arn": ARN, "source": "bounces@lms.example.edu"},
        RULE_ARN,
        ("v1", "bounces@lms.example.edu", dict.fromkeys(V1_ARNS, RULE_ARN), None),
        id="v1-rule-arn-wins-and-source",
    ),
    pytest.param(
        {"api": SesApi.V1},
        None,
        ("v1", "noreply@moodle.example.org", {}, None),
        id="v1-no-arn",
    ),
    pytest.param(
        {"api": SesApi.V2, "identity_arn": ARN, "feedback_address": "fb@lms.example.edu"},
        None,
        (
            "v2",
            "noreply@moodle.example.org",
            {"FromEmailAddressIdentityArn": ARN},
            "fb@lms.example.edu",
        ),
        id="v2-global-arn-and-feedback",
    ),
    pytest.param(
        {"api": SesApi.V2, "identity_arn": ARN, "source": "bounces@lms.example.edu"},
        RULE_ARN,
        ("v2", "bounces@lms.example.edu", {"FromEmailAddressIdentityArn": RULE_ARN}, None),
        id="v2-rule-arn-wins-and-source",
    ),
]


@pytest.mark.parametrize(("settings", "rule_arn", "expected"), WIRE)
async def test_identity_arn_and_source_reach_the_wire(
    fake_ses: FakeSes,
    aio_session: AioSession,
    settings: dict[str, Any],
    rule_arn: str | None,
    expected: tuple[object, ...],
) -> None:
    """Cross-account sending: `identity_arn` (the rule's, else the global one) arrives as
    SourceArn, FromArn and ReturnPathArn on SendRawEmail (v1) and as
    FromEmailAddressIdentityArn on SendEmail (v2); `ses.source` replaces the envelope sender
    as Source / FromEmailAddress; `feedback_address` arrives as v2's
    FeedbackForwardingEmailAddress. Recipients and bytes are unchanged either way."""
    ses = Ses(region=REGION, endpoint_url=fake_ses.url, **settings)
    mail = make_mail(recipients=("a@example.net", "b@example.net"))
    async with await SesClient.open(ses, session=aio_session) as client:
        await client.send(mail, configuration_set="cs", tags=[("rule", "r")], identity_arn=rule_arn)
    [sent] = fake_ses.sent
    assert expected == (sent.api, sent.source, sent.arns, sent.feedback_address)
    assert (mail.recipients, mail.wire_bytes(), "cs", (("rule", "r"),)) == (
        sent.destinations,
        sent.raw,
        sent.configuration_set,
        sent.tags,
    )
