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
  `suppression_lookups` counts the calls.

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

import argparse
import base64
import collections
import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, unquote
from xml.sax.saxutils import escape

import pytest

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


@dataclass(kw_only=True)
class FakeSes:
    """The fake's state and behaviours; `start()` serves it, `stop()` ends it."""

    rate_limit: float | None = None
    daily_quota: float | None = None
    latency: float = 0.0
    max_send_rate: float = 14.0  # what GetSendQuota reports when there is no rate_limit
    error: Fault | None = None
    verified: set[str] = field(default_factory=set)
    check_identities: bool = False
    production_access: bool = True  # False: the SES sandbox (SESv2 GetAccount)
    mail_from: dict[str, str] = field(default_factory=dict)  # identity -> custom MAIL FROM
    configuration_sets: set[str] = field(default_factory=set)
    sending_enabled: bool = True
    suppressed: dict[str, str] = field(default_factory=dict)
    suppression_lookups: int = 0
    verification_lookups: int = 0  # GetIdentityVerificationAttributes calls
    sent: list[Sent] = field(default_factory=list)
    # every send call: (arrival, source, destinations)
    requests: list[tuple[float, str, tuple[str, ...]]] = field(default_factory=list)
    calls: int = 0
    throttles: int = 0
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: collections.deque[Fault] = collections.deque()
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._day: collections.deque[tuple[float, int]] = collections.deque()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> Self:
        server = ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fakeses", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail_next(self, *faults: Fault) -> None:
        """Answer the next SendRawEmail calls with `faults`, in order, then behave as before."""
        with self._lock:
            self._queued.extend(faults)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            recipients = sum(len(s.destinations) for s in self.sent)
            return {
                "calls": self.calls,
                "accepted": len(self.sent),
                "recipients": recipients,
                "throttles": self.throttles,
                "first": self.sent[0].at if self.sent else None,
                "last": self.sent[-1].at if self.sent else None,
            }

    # SES actions: each returns (status, body) or a Fault

    def send_raw_email(self, form: dict[str, str]) -> tuple[int, str] | Fault:
        tags = tuple(
            (form[f"Tags.member.{i}.Name"], form.get(f"Tags.member.{i}.Value", ""))
            for i in range(1, 51)
            if f"Tags.member.{i}.Name" in form
        )
        accepted = self._accept(
            api="v1",
            source=form.get("Source", ""),
            destinations=_members(form, "Destinations.member."),
            raw=base64.b64decode(form.get("RawMessage.Data", "")),
            tags=tags,
            configuration_set=form.get("ConfigurationSetName"),
            arns={k: form[k] for k in ARN_PARAMETERS if k in form},
            feedback_address=None,
        )
        if isinstance(accepted, Fault):
            return accepted
        return 200, _result("SendRawEmail", f"<MessageId>{accepted}</MessageId>")

    def send_email(self, doc: dict[str, Any]) -> tuple[int, dict[str, Any], str | None] | Fault:
        """SESv2 SendEmail with Content.Raw; a Fault becomes its v2 error (V2_ERRORS), except
        a dropped connection or a scripted body, which stay as they are."""
        destination = doc.get("Destination", {})
        accepted = self._accept(
            api="v2",
            source=doc.get("FromEmailAddress", ""),
            destinations=tuple(
                address
                for key in ("ToAddresses", "CcAddresses", "BccAddresses")
                for address in destination.get(key, ())
            ),
            raw=base64.b64decode(doc.get("Content", {}).get("Raw", {}).get("Data", "")),
            tags=tuple((t["Name"], t.get("Value", "")) for t in doc.get("EmailTags", ())),
            configuration_set=doc.get("ConfigurationSetName"),
            arns={k: doc[k] for k in ARN_PARAMETERS if k in doc},
            feedback_address=doc.get("FeedbackForwardingEmailAddress"),
        )
        if isinstance(accepted, Fault) and (accepted.drop or accepted.body is not None):
            return accepted
        if isinstance(accepted, Fault):
            code, status = V2_ERRORS.get(accepted.code, (accepted.code, accepted.status))
            if accepted.status >= 500:
                status = accepted.status
            return status, {"message": accepted.message}, code
        return 200, {"MessageId": accepted}, None

    def covered(self, address: str) -> bool:
        """True when a verified identity covers `address`: itself, its domain or a parent."""
        if address.lower() in {v.lower() for v in self.verified}:
            return True
        labels = address.rpartition("@")[2].lower().split(".")
        domains = {".".join(labels[i:]) for i in range(len(labels) - 1)}
        return bool(domains & {v.lower() for v in self.verified})

    def _accept(
        self,
        *,
        api: str,
        source: str,
        destinations: tuple[str, ...],
        raw: bytes,
        tags: tuple[tuple[str, str], ...],
        configuration_set: str | None,
        arns: dict[str, str],
        feedback_address: str | None,
    ) -> str | Fault:
        """Faults, identities, quota and rate as SES applies them; the MessageId or a Fault."""
        now = time.monotonic()
        with self._lock:
            self.calls += 1
            self.requests.append((now, source, destinations))
            fault = self._queued.popleft() if self._queued else self.error
            if fault is not None:
                return fault
            if self.check_identities:
                unverified = [a for a in (source, _from_address(raw)) if a and not self.covered(a)]
                if unverified:
                    return Fault(
                        code="MessageRejected",
                        message="Email address is not verified. The following identities failed"
                        f" the check in region {REGION.upper()}: {', '.join(unverified)}",
                    )
            n = len(destinations)
            if self.daily_quota is not None:
                while self._day and self._day[0][0] <= now - 86400:
                    self._day.popleft()
                if sum(k for _, k in self._day) + n > self.daily_quota:
                    return Fault(code="Throttling", message=DAILY_EXCEEDED)
            if self.rate_limit is not None:
                while self._window and self._window[0][0] <= now - 1.0:
                    self._window.popleft()
                in_window = sum(k for _, k in self._window)
                if in_window and in_window + n > self.rate_limit:
                    self.throttles += 1
                    return Fault(code="Throttling", message=RATE_EXCEEDED)
                self._window.append((now, n))
            self._day.append((now, n))
            message_id = f"{uuid.uuid4().hex}-000000"
            self.sent.append(
                Sent(
                    message_id=message_id,
                    source=source,
                    destinations=destinations,
                    raw=raw,
                    tags=tags,
                    configuration_set=configuration_set,
                    at=now,
                    api=api,
                    arns=arns,
                    feedback_address=feedback_address,
                )
            )
        return message_id

    def quota(self) -> dict[str, float]:
        """Max24HourSend, MaxSendRate and SentLast24Hours, as both APIs name them."""
        with self._lock:
            sent = sum(len(s.destinations) for s in self.sent)
        return {
            "Max24HourSend": -1.0 if self.daily_quota is None else self.daily_quota,
            "MaxSendRate": self.rate_limit if self.rate_limit is not None else self.max_send_rate,
            "SentLast24Hours": float(sent),
        }

    def get_send_quota(self, form: dict[str, str]) -> tuple[int, str]:
        inner = "".join(f"<{k}>{v}</{k}>" for k, v in self.quota().items())
        return 200, _result("GetSendQuota", inner)

    def get_account_sending_enabled(self, form: dict[str, str]) -> tuple[int, str]:
        enabled = "true" if self.sending_enabled else "false"
        return 200, _result("GetAccountSendingEnabled", f"<Enabled>{enabled}</Enabled>")

    def get_identity_verification_attributes(self, form: dict[str, str]) -> tuple[int, str]:
        with self._lock:
            self.verification_lookups += 1
        entries = "".join(
            f"<entry><key>{escape(i)}</key><value><VerificationStatus>"
            f"{'Success' if i in self.verified else 'NotStarted'}"
            "</VerificationStatus></value></entry>"
            for i in _members(form, "Identities.member.")
        )
        body = f"<VerificationAttributes>{entries}</VerificationAttributes>"
        return 200, _result("GetIdentityVerificationAttributes", body)

    def get_account(self) -> tuple[int, dict[str, Any], str | None]:
        """SESv2 GetAccount: ProductionAccessEnabled, SendingEnabled and SendQuota."""
        return (
            200,
            {
                "ProductionAccessEnabled": self.production_access,
                "SendingEnabled": self.sending_enabled,
                "EnforcementStatus": "HEALTHY",
                "DedicatedIpAutoWarmupEnabled": False,
                "SendQuota": self.quota(),
            },
            None,
        )

    def get_identity_mail_from_domain_attributes(self, form: dict[str, str]) -> tuple[int, str]:
        """The custom MAIL FROM of each identity asked about that has one (`mail_from`)."""
        entries = "".join(
            f"<entry><key>{escape(i)}</key><value><MailFromDomain>{escape(self.mail_from[i])}"
            "</MailFromDomain><MailFromDomainStatus>Success</MailFromDomainStatus>"
            "<BehaviorOnMXFailure>UseDefaultValue</BehaviorOnMXFailure></value></entry>"
            for i in _members(form, "Identities.member.")
            if i in self.mail_from
        )
        body = f"<MailFromDomainAttributes>{entries}</MailFromDomainAttributes>"
        return 200, _result("GetIdentityMailFromDomainAttributes", body)

    def get_suppressed_destination(self, path: str) -> tuple[int, dict[str, Any], str | None]:
        """SESv2 GetSuppressedDestination: the entry, or 404 NotFoundException."""
        address = unquote(path.removeprefix(SUPPRESSION_PATH).split("?")[0])
        with self._lock:
            self.suppression_lookups += 1
            reason = self.suppressed.get(address)
        if reason is None:
            message = f"Email address {address} does not exist on your suppression list."
            return 404, {"message": message}, "NotFoundException"
        entry = {"EmailAddress": address, "Reason": reason, "LastUpdateTime": time.time()}
        entry["Attributes"] = {"MessageId": str(uuid.uuid4()), "FeedbackId": str(uuid.uuid4())}
        return 200, {"SuppressedDestination": entry}, None

    def describe_configuration_set(self, form: dict[str, str]) -> tuple[int, str] | Fault:
        name = form.get("ConfigurationSetName", "")
        if name not in self.configuration_sets:
            message = f"Configuration set <{name}> does not exist."
            return Fault(code="ConfigurationSetDoesNotExist", message=message)
        body = f"<ConfigurationSet><Name>{escape(name)}</Name></ConfigurationSet>"
        return 200, _result("DescribeConfigurationSet", body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as aiobotocore's pool expects
    timeout = 30
    actions: ClassVar[dict[str, str]] = {
        "SendRawEmail": "send_raw_email",
        "GetSendQuota": "get_send_quota",
        "GetAccountSendingEnabled": "get_account_sending_enabled",
        "GetIdentityVerificationAttributes": "get_identity_verification_attributes",
        "DescribeConfigurationSet": "describe_configuration_set",
        "GetIdentityMailFromDomainAttributes": "get_identity_mail_from_domain_attributes",
    }

    def setup(self) -> None:
        super().setup()
        # headers and body are two writes; without NODELAY the body waits for a delayed ACK
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        fake: FakeSes = self.server.fake  # type: ignore[attr-defined]
        if self.path == "/fake-ses/stats":
            self._answer(200, json.dumps(fake.stats()), "application/json")
        elif self.path.startswith(ACCOUNT_PATH):
            self._answer_json(*fake.get_account())
        elif self.path.startswith(SUPPRESSION_PATH):
            self._answer_json(*fake.get_suppressed_destination(self.path))
        else:
            self._answer(404, "not found", "text/plain")

    def do_POST(self) -> None:
        fake: FakeSes = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.path.startswith(SEND_EMAIL_PATH):
            answer = fake.send_email(json.loads(body))
            if fake.latency:
                time.sleep(fake.latency)
            if isinstance(answer, Fault):
                self._answer_fault(answer)
            else:
                self._answer_json(*answer)
            return
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        method = self.actions.get(form.get("Action", ""))
        if method is None:
            outcome: tuple[int, str] | Fault = Fault(
                code="InvalidAction", message=f"unknown action {form.get('Action')!r}"
            )
        else:
            outcome = getattr(fake, method)(form)
        if fake.latency:
            time.sleep(fake.latency)
        if isinstance(outcome, Fault):
            self._answer_fault(outcome)
        else:
            self._answer(*outcome, "text/xml")

    def _answer_fault(self, fault: Fault) -> None:
        """SES v1 error XML, or the fault's own body, or a dropped connection."""
        if fault.drop:
            self.close_connection = True
            self.connection.close()
            return
        body = fault.body
        if body is None:
            body = (
                f'<ErrorResponse xmlns="{NS}"><Error><Type>{fault.type}</Type>'
                f"<Code>{escape(fault.code)}</Code>"
                f"<Message>{escape(fault.message)}</Message></Error>"
                f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
            )
        self._answer(fault.status, body, "text/xml")

    def _answer_json(self, status: int, doc: dict[str, Any], error: str | None) -> None:
        """A REST-JSON (SESv2) answer; errors name their type in x-amzn-ErrorType."""
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if error:
            self.send_header("x-amzn-ErrorType", error)
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        try:
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a timeout test)


def _from_address(raw: bytes) -> str:
    """The address of the From header of `raw` ("" when there is none)."""
    value = BytesHeaderParser(policy=policy.default).parsebytes(raw).get("From")
    return parseaddr(str(value))[1] if value is not None else ""


def _members(form: dict[str, str], prefix: str) -> tuple[str, ...]:
    keys = sorted((int(k[len(prefix) :]), k) for k in form if k.startswith(prefix))
    return tuple(form[k] for _, k in keys)


def _result(action: str, inner: str) -> str:
    return (
        f'<{action}Response xmlns="{NS}"><{action}Result>{inner}</{action}Result>'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
        f"</{action}Response>"
    )


@pytest.fixture
def fake_ses() -> Iterator[FakeSes]:
    """A fresh fake SES on port 0 for one test."""
    with FakeSes() as fake:
        yield fake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate-limit", type=float, default=None, help="recipients/s")
    parser.add_argument("--daily-quota", type=float, default=None, help="recipients/24h")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()
    fake = FakeSes(
        host=args.host,
        port=args.port,
        rate_limit=args.rate_limit,
        daily_quota=args.daily_quota,
        latency=args.latency,
    ).start()
    print(fake.url, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    fake.stop()
    print(json.dumps(fake.stats()), flush=True)


if __name__ == "__main__":
    main()
