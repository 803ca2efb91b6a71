"""The fake SES's vocabulary: constants from botocore's models, scripted faults, what it
recorded, and the Query API's XML (tests/support/fakeses)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesHeaderParser
from email.utils import parseaddr

NS = "http://ses.amazonaws.com/doc/2010-12-01/"
RATE_EXCEEDED = "Maximum sending rate exceeded."
DAILY_EXCEEDED = "Daily message quota exceeded."
SUPPRESSION_PATH = "/v2/email/suppression/addresses/"
SEND_EMAIL_PATH = "/v2/email/outbound-emails"
ACCOUNT_PATH = "/v2/email/account"
REGION = "eu-west-1"  # named in MessageRejected texts
# v1 code -> (SESv2 SendEmail error, HTTP status), from botocore's sesv2 service model
V2_ERRORS = {
    "Throttling": ("TooManyRequestsException", 429),
    "AccountSendingPausedException": ("SendingPausedException", 400),
    "ConfigurationSetSendingPausedException": ("SendingPausedException", 400),
    "ConfigurationSetDoesNotExist": ("NotFoundException", 404),
    "InvalidParameterValue": ("BadRequestException", 400),
}
ARN_PARAMETERS = ("SourceArn", "FromArn", "ReturnPathArn", "FromEmailAddressIdentityArn")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One scripted failure: SES error XML, or `body` sent as is, or `drop` the connection."""

    code: str = "InternalFailure"
    message: str = ""
    status: int = 400
    type: str = "Sender"
    body: str | None = None
    drop: bool = False


HTTP_500 = Fault(status=500, body="<html><body>500 Internal Server Error</body></html>")
DROP = Fault(drop=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    """One message the fake accepted."""

    message_id: str
    source: str
    destinations: tuple[str, ...]
    raw: bytes
    tags: tuple[tuple[str, str], ...]
    configuration_set: str | None
    at: float
    api: str = "v1"
    arns: dict[str, str] = field(default_factory=dict)  # ARN parameter -> value, as sent
    feedback_address: str | None = None


def from_address(raw: bytes) -> str:
    """The address of the From header of `raw` ("" when there is none)."""
    value = BytesHeaderParser(policy=policy.default).parsebytes(raw).get("From")
    return parseaddr(str(value))[1] if value is not None else ""


def members(form: dict[str, str], prefix: str) -> tuple[str, ...]:
    keys = sorted((int(k[len(prefix) :]), k) for k in form if k.startswith(prefix))
    return tuple(form[k] for _, k in keys)


def result(action: str, inner: str) -> str:
    return (
        f'<{action}Response xmlns="{NS}"><{action}Result>{inner}</{action}Result>'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
        f"</{action}Response>"
    )
