"""SES event records as SES publishes them to SNS, for `relay demo`, whose SES emulator
(moto) sends nothing and so reports nothing: the demo plays SES's part and puts these on
the feedback queue, SNS-wrapped, so relay's real feedback path reads them.

Shapes follow SES's "Examples of event data that Amazon SES publishes to Amazon SNS".
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

ACCOUNT = "123456789012"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _mail(message_id: str, source: str, recipient: str) -> dict[str, Any]:
    return {
        "timestamp": _now(),
        "source": source,
        "sendingAccountId": ACCOUNT,
        "messageId": message_id,
        "destination": [recipient],
        "headersTruncated": False,
        "headers": [],
        "commonHeaders": {"messageId": message_id},
        "tags": {},
    }


def delivery(message_id: str, source: str, recipient: str) -> dict[str, Any]:
    """SES delivered the mail to the recipient's mail server."""
    return {
        "eventType": "Delivery",
        "mail": _mail(message_id, source, recipient),
        "delivery": {
            "timestamp": _now(),
            "processingTimeMillis": 412,
            "recipients": [recipient],
            "smtpResponse": "250 2.6.0 Message received",
            "reportingMTA": "a8-70.smtp-out.amazonses.com",
        },
    }


def bounce(message_id: str, source: str, recipient: str) -> dict[str, Any]:
    """The recipient's mail server said the address does not exist (a hard bounce)."""
    return {
        "eventType": "Bounce",
        "mail": _mail(message_id, source, recipient),
        "bounce": {
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": recipient,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                }
            ],
            "timestamp": _now(),
            "feedbackId": f"{uuid.uuid4()}-000000",
            "reportingMTA": "dns; a8-70.smtp-out.amazonses.com",
        },
    }


def sns_wrapped(event: dict[str, Any], region: str) -> str:
    """The SQS message body when an SNS topic forwards the event to the queue."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": f"arn:aws:sns:{region}:{ACCOUNT}:relay-ses-events",
            "Message": json.dumps(event),
            "Timestamp": _now(),
        }
    )
