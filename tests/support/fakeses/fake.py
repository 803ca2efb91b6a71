"""The fake SES's state and actions: what it answers, records and counts
(tests/support/fakeses)."""

from __future__ import annotations

import base64
import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import unquote
from xml.sax.saxutils import escape

from tests.support.fakeses.model import (
    ARN_PARAMETERS,
    DAILY_EXCEEDED,
    RATE_EXCEEDED,
    REGION,
    SUPPRESSION_PATH,
    V2_ERRORS,
    Fault,
    Sent,
    from_address,
    members,
    result,
)
from tests.support.fakeses.wire import Handler


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
    suppression_denied: bool = False  # lookups answer AccessDeniedException, as IAM would
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
        server = ThreadingHTTPServer((self.host, self.port), Handler)
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
            destinations=members(form, "Destinations.member."),
            raw=base64.b64decode(form.get("RawMessage.Data", "")),
            tags=tags,
            configuration_set=form.get("ConfigurationSetName"),
            arns={k: form[k] for k in ARN_PARAMETERS if k in form},
            feedback_address=None,
        )
        if isinstance(accepted, Fault):
            return accepted
        return 200, result("SendRawEmail", f"<MessageId>{accepted}</MessageId>")

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
                unverified = [a for a in (source, from_address(raw)) if a and not self.covered(a)]
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
        return 200, result("GetSendQuota", inner)

    def get_account_sending_enabled(self, form: dict[str, str]) -> tuple[int, str]:
        enabled = "true" if self.sending_enabled else "false"
        return 200, result("GetAccountSendingEnabled", f"<Enabled>{enabled}</Enabled>")

    def get_identity_verification_attributes(self, form: dict[str, str]) -> tuple[int, str]:
        with self._lock:
            self.verification_lookups += 1
        entries = "".join(
            f"<entry><key>{escape(i)}</key><value><VerificationStatus>"
            f"{'Success' if i in self.verified else 'NotStarted'}"
            "</VerificationStatus></value></entry>"
            for i in members(form, "Identities.member.")
        )
        body = f"<VerificationAttributes>{entries}</VerificationAttributes>"
        return 200, result("GetIdentityVerificationAttributes", body)

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
            for i in members(form, "Identities.member.")
            if i in self.mail_from
        )
        body = f"<MailFromDomainAttributes>{entries}</MailFromDomainAttributes>"
        return 200, result("GetIdentityMailFromDomainAttributes", body)

    def get_suppressed_destination(self, path: str) -> tuple[int, dict[str, Any], str | None]:
        """SESv2 GetSuppressedDestination: the entry, or 404 NotFoundException."""
        address = unquote(path.removeprefix(SUPPRESSION_PATH).split("?")[0])
        with self._lock:
            self.suppression_lookups += 1
            reason = self.suppressed.get(address)
            denied = self.suppression_denied
        if denied:
            message = (
                "User: arn:aws:iam::123456789012:user/relay is not authorized to perform:"
                " ses:GetSuppressedDestination"
            )
            return 403, {"message": message}, "AccessDeniedException"
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
        return 200, result("DescribeConfigurationSet", body)
