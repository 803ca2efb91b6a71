"""A small fake of SES (v1 Query API and SESv2 REST-JSON), for what moto cannot produce.

It answers SendRawEmail and SESv2 SendEmail (`Content.Raw`) and GetSendQuota (plus
GetAccountSendingEnabled, GetIdentityVerificationAttributes,
GetIdentityMailFromDomainAttributes (`mail_from`), DescribeConfigurationSet and SESv2
GetAccount (`production_access`: False is the sandbox) for doctor) on
127.0.0.1, port 0 by default, from a thread, so async tests and other processes
can both use it. It never checks signatures. Behaviours, all changeable while it runs:

- `error`: every SendRawEmail answers this (`Fault`: SES error XML, a non-XML
  body, or a dropped connection); `fail_next(...)` queues one-shot faults first;
- `latency`: seconds before each answer;
- `rate_limit`: recipients allowed in any 1-second window (sliding, counted at
  arrival); beyond it "Throttling: Maximum sending rate exceeded." (a lone call
  larger than the limit passes when the window is empty, as a message with more
  recipients than the rate must still be sendable);
- `daily_quota`: recipients per 24 hours, beyond it "Daily message quota exceeded.".
- `suppressed`: the account suppression list, {address: "BOUNCE" | "COMPLAINT"}, served
  as SESv2 GetSuppressedDestination (REST-JSON `GET /v2/email/suppression/addresses/
  {EmailAddress}`, shaped from botocore's sesv2 model; 404 NotFoundException when absent);
  `suppression_lookups` counts the calls; `suppression_denied` answers them 403
  AccessDeniedException, as IAM does without ses:GetSuppressedDestination.

- `check_identities`: sends whose Source or From header no verified identity covers (the
  address, its domain or a parent domain, as SES checks) answer MessageRejected "Email
  address is not verified." naming the addresses, as SES does.

Faults are written with v1 codes; a v2 call answers the SESv2 error of the same meaning
(V2_ERRORS, from botocore's sesv2 model of SendEmail) as REST-JSON.

Every send call is recorded in `requests` (when it arrived, source, destinations), every
accepted message in `sent` (API, source, destinations, raw bytes, tags,
configuration set, the identity ARN parameters and the feedback address as they came
on the wire); `calls` and `throttles` count. Standalone:

    python -m tests.support.fakeses --port 0 --rate-limit 20 --latency 0.02

prints its URL on the first line; GET /fake-ses/stats returns the counters as JSON.
In the tests, the `fake_ses` fixture gives a fresh one per test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fakeses.fake import FakeSes
from tests.support.fakeses.model import (
    ACCOUNT_PATH,
    ARN_PARAMETERS,
    DAILY_EXCEEDED,
    DROP,
    HTTP_500,
    NS,
    RATE_EXCEEDED,
    REGION,
    SEND_EMAIL_PATH,
    SUPPRESSION_PATH,
    V2_ERRORS,
    Fault,
    Sent,
)


@pytest.fixture
def fake_ses() -> Iterator[FakeSes]:
    """A fresh fake SES on port 0 for one test."""
    with FakeSes() as fake:
        yield fake


__all__ = [
    "ACCOUNT_PATH",
    "ARN_PARAMETERS",
    "DAILY_EXCEEDED",
    "DROP",
    "HTTP_500",
    "NS",
    "RATE_EXCEEDED",
    "REGION",
    "SEND_EMAIL_PATH",
    "SUPPRESSION_PATH",
    "V2_ERRORS",
    "FakeSes",
    "Fault",
    "Sent",
    "fake_ses",
]
