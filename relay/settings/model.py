"""What relay.yaml says, as frozen values: one dataclass per section, each default in one place.

`relay.settings.load` reads the file into these; everything else in relay only reads them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class Mode(StrEnum):
    LIVE = "live"
    SHADOW = "shadow"


class Security(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class SesApi(StrEnum):
    """Which SES API sends (`ses.api`): v1 SendRawEmail (10 MB) or SESv2 SendEmail (40 MB)."""

    V1 = "v1"
    V2 = "v2"


class Suppressed(StrEnum):
    """What happens to recipients on the SES account suppression list (`ses.suppressed`)."""

    UPSTREAM = "upstream"  # the original host tries them; a real bounce comes back
    BOUNCE = "bounce"  # fail them at once, with a DSN to the sender
    SEND = "send"  # no lookup: SES accepts and drops them, as without relay


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


DEFAULT_LISTEN = HostPort(host="127.0.0.1", port=2525)
DEFAULT_METRICS = HostPort(host="127.0.0.1", port=9325)


class BareNewline(StrEnum):
    """What DATA does with a CR or LF that is not part of a CRLF pair."""

    NORMALIZE = "normalize"  # rewrite it to CRLF, as Postfix 3.9 does by default
    REJECT = "reject"  # refuse the message: 550 5.5.2


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """`limits:` in relay.yaml. Each default is here and only here; `_limits` reads them."""

    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 50
    max_sessions: int = 500  # total; with RESERVED_FILES it fits a 1024 open-file limit
    max_sessions_per_ip: int = 50  # Postfix's smtpd_client_connection_count_limit
    max_data_in_memory: int = 256 * 1024 * 1024  # unfinished DATA, all sessions; then spill
    spill_min_free: int = 512 * 1024 * 1024  # bytes a spill leaves free on the spool's disk
    spool_min_free: int = 64 * 1024 * 1024  # ... and any mail: room to deliver (queue_minfree)
    max_auth_failures: int = 5  # per connection; then 421 and close
    max_junk_commands: int = 100  # NOOP, RSET, VRFY, HELP, errors: Postfix's junk limit
    idle_timeout: float = 300.0  # seconds without a byte from the client (RFC 5321 4.5.3.2.7)
    session_timeout: float = 3600.0  # seconds a whole session may last
    bare_newline: BareNewline = BareNewline.NORMALIZE


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    users_file: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Tls:
    cert: Path
    key: Path
    implicit: bool = False  # True: TLS from the first byte (Moodle's smtpsecure=ssl)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    host: str
    port: int = 25
    security: Security = Security.NONE
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    timeout: float = 30.0
    verify_tls: bool = True

    def password(self) -> str | None:
        """The upstream password from its env var or file; never stored in settings."""
        if self.password_env:
            return os.environ.get(self.password_env)
        if self.password_file:
            return self.password_file.read_text(encoding="utf-8").strip()
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ses:
    enabled: bool = True
    region: str = "us-east-1"
    endpoint_url: str | None = None
    configuration_set: str | None = None
    max_send_rate: float | None = None  # None: auto, 90% of GetSendQuota MaxSendRate
    fallback_after: float = 300.0
    timeout: float = 10.0
    circuit_cooldown: float = 300.0
    events_queue_url: str | None = None  # `events: {queue_url}`: SQS queue of SES events
    suppressed: Suppressed = Suppressed.UPSTREAM
    api: SesApi = SesApi.V1
    identity_arn: str | None = None  # sending authorization: an identity of another account
    source: str | None = None  # Source / FromEmailAddress instead of the envelope sender
    feedback_address: str | None = None  # v2 FeedbackForwardingEmailAddress


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
    max_age: float = 432000.0

    def step(self, attempts: int, age: float) -> float:
        """Seconds to wait after a mail's `attempts`-th try failed for now, `age` seconds
        after it arrived (or was retried by hand): the schedule's step for its attempts,
        but never further along than its age reaches (a second's slack). Its SES
        attempts count in `attempts` too: ten in SES's first five minutes made a first
        4xx from the original host wait the last step, an hour; by age it waits the
        second, as Postfix, which backs off by a mail's age, would."""
        by_attempts = min(max(attempts, 1), len(self.schedule)) - 1
        by_age, reached = 0, 0.0
        for step in self.schedule[:-1]:
            reached += step
            if age + 1.0 < reached:
                break
            by_age += 1
        return self.schedule[min(by_attempts, by_age)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Bounces:
    """Delivery status notifications (RFC 3464) for mail that fails for good."""

    dsn: bool = True
    from_address: str | None = None  # None: MAILER-DAEMON@<hostname>
    delay_warning: float | None = None  # seconds; a "still trying" DSN once (None: off)

    def sender(self, hostname: str) -> str:
        """The From: of a DSN."""
        return self.from_address or f"MAILER-DAEMON@{hostname}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    source: Path
    listen: HostPort
    spool: Path
    rules: Path
    upstream: Upstream
    mode: Mode = Mode.LIVE
    hostname: str = ""
    limits: Limits = Limits()
    auth: Auth | None = None
    tls: Tls | None = None
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ses: Ses = Ses()
    retry: Retry = Retry()
    bounces: Bounces = Bounces()
    metrics: HostPort | None = None
    # Deliveries in flight at once: connections to the original host, calls to SES. Postfix's
    # default_destination_concurrency_limit is 20.
    deliverers: int = 16
    retention: float = 7 * 86400.0  # seconds delivered rows keep their metadata
    # Seconds a dead letter (failed, its DSN queued) keeps its body and history for
    # `relay queue retry`; None: for good. Postfix deletes a mail once its bounce is queued.
    failed_retention: float | None = 30 * 86400.0


def default_of(cls: type[Any], name: str) -> Any:
    """The dataclass's own default for field `name`: the one source of every default, for
    classes that cannot be built without their required fields."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
