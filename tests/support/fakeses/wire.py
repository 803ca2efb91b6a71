"""The fake SES on the wire: one HTTP handler for the v1 Query API (form posts, XML) and
the SESv2 REST-JSON paths, dispatching to the FakeSes actions (tests/support/fakeses)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from tests.support.fakeses.model import (
    ACCOUNT_PATH,
    NS,
    SEND_EMAIL_PATH,
    SUPPRESSION_PATH,
    Fault,
)


class Handler(BaseHTTPRequestHandler):
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
        fake: Any = self.server.fake  # type: ignore[attr-defined]
        if self.path == "/fake-ses/stats":
            self._answer(200, json.dumps(fake.stats()), "application/json")
        elif self.path.startswith(ACCOUNT_PATH):
            self._answer_json(*fake.get_account())
        elif self.path.startswith(SUPPRESSION_PATH):
            self._answer_json(*fake.get_suppressed_destination(self.path))
        else:
            self._answer(404, "not found", "text/plain")

    def do_POST(self) -> None:
        fake: Any = self.server.fake  # type: ignore[attr-defined]
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
