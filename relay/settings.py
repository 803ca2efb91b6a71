"""relay.yaml -> frozen settings objects, validated, every problem with file:line:key.

`load(path)` is the only entry point; it raises `ConfigError` listing every
problem at once. Relative paths (rules, spool, users file, TLS files) are taken
relative to the directory of relay.yaml, so a config directory can be moved as
a whole.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from relay import yamlfile
from relay.errors import ConfigError
from relay.rules import DEFAULT_RULES, IDENTITY_ARN, IDENTITY_ARN_FORM

_Rel = Callable[["yamlfile.Node"], Path | None]

DEFAULT_PATHS = (Path("relay.yaml"), Path("/etc/relay/relay.yaml"))


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
    deliverers: int = 4
    retention: float = 7 * 86400.0  # seconds delivered rows keep their metadata


def _default(cls: type[Any], name: str) -> Any:
    """The dataclass's own default for field `name`: the one source of every default, for
    classes that cannot be built without their required fields."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def find_config(explicit: Path | None) -> Path:
    """--config, else $RELAY_CONFIG, else ./relay.yaml, else /etc/relay/relay.yaml."""
    if explicit is not None:
        return explicit
    env = os.environ.get("RELAY_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[0]


def load(path: Path) -> Settings:
    """Read relay.yaml at `path`; raise ConfigError naming every problem."""
    doc, root = yamlfile.load(path)
    settings = _read(root, path) if root is not None else None
    doc.raise_if_any()
    assert settings is not None
    return settings


_TOP = {
    "listen",
    "spool",
    "rules",
    "mode",
    "hostname",
    "limits",
    "auth",
    "tls",
    "allow_networks",
    "upstream",
    "ses",
    "retry",
    "bounces",
    "metrics",
    "deliverers",
    "retention",
}


def _read(root: yamlfile.Node, path: Path) -> Settings | None:
    base = path.parent
    top = root.mapping(_TOP, required=("upstream",))
    if top is None:
        return None

    def rel(node: yamlfile.Node) -> Path | None:
        value = node.as_str()
        return None if value is None else (base / value)

    listen = _host_port(top["listen"]) if "listen" in top else DEFAULT_LISTEN
    spool = rel(top["spool"]) if "spool" in top else base / "spool"
    # No `rules:` key: the shipped Moodle defaults (relay/rules/rules.yaml).
    rules = rel(top["rules"]) if "rules" in top else DEFAULT_RULES
    mode = (
        top["mode"].as_choice([m.value for m in Mode])
        if "mode" in top
        else _default(Settings, "mode")
    )
    hostname = top["hostname"].as_str() if "hostname" in top else socket.gethostname()
    limits = _limits(top["limits"]) if "limits" in top else Limits()
    auth = _auth(top["auth"], rel) if "auth" in top and not top["auth"].is_null() else None
    tls = _tls(top["tls"], rel) if "tls" in top and not top["tls"].is_null() else None
    networks = _networks(top["allow_networks"]) if "allow_networks" in top else ()
    upstream = _upstream(top["upstream"], rel) if "upstream" in top else None  # required
    ses = _ses(top["ses"]) if "ses" in top else Ses()
    retry = _retry(top["retry"]) if "retry" in top else Retry()
    bounces = _bounces(top["bounces"]) if "bounces" in top else Bounces()
    metrics: HostPort | None = DEFAULT_METRICS  # `metrics: null` turns it off
    if "metrics" in top:
        metrics = None if top["metrics"].is_null() else _host_port(top["metrics"])
    deliverers = (
        top["deliverers"].as_int(minimum=1)
        if "deliverers" in top
        else _default(Settings, "deliverers")
    )
    retention = (
        top["retention"].as_number(minimum=0)
        if "retention" in top
        else _default(Settings, "retention")
    )

    if listen is not None and not listen.is_loopback and (auth is None or tls is None):
        top["listen"].problem(
            f"{listen} is not a loopback address: it needs both 'auth' and 'tls' "
            "(relay is never an open relay); use 127.0.0.1 or configure auth and tls"
        )
    if auth is not None and tls is None and listen is not None and not listen.is_loopback:
        top["auth"].problem("auth on a non-loopback listen needs 'tls' (passwords in clear)")

    values = (listen, spool, rules, mode, hostname, limits, networks, upstream, ses, retry)
    if any(v is None for v in values) or None in (deliverers, retention, bounces):
        return None
    assert listen and spool and rules and mode and hostname and limits and upstream and ses
    assert retry is not None and networks is not None and bounces is not None
    assert deliverers is not None and retention is not None
    return Settings(
        source=path,
        listen=listen,
        spool=spool,
        rules=rules,
        mode=Mode(mode),
        hostname=hostname,
        limits=limits,
        auth=auth,
        tls=tls,
        allow_networks=networks,
        upstream=upstream,
        ses=ses,
        retry=retry,
        bounces=bounces,
        metrics=metrics,
        deliverers=deliverers,
        retention=float(retention),
    )


def _host_port(node: yamlfile.Node) -> HostPort | None:
    value = node.scalar()
    text = str(value) if isinstance(value, str | int) else None
    if text is None or ":" not in text:
        node.problem("expected host:port, e.g. 127.0.0.1:2525")
        return None
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        node.problem(f"expected host:port with a port 0-65535, got {text!r}")
        return None
    return HostPort(host=host, port=int(port))


_INT_LIMITS = {  # key -> the smallest value that makes sense
    "max_message_size": 1024,
    "max_recipients": 1,
    "max_sessions": 1,
    "max_sessions_per_ip": 1,
    "max_data_in_memory": 0,
    "max_auth_failures": 1,
    "max_junk_commands": 1,
}
_TIME_LIMITS = {"idle_timeout": 1.0, "session_timeout": 1.0}


def _limits(node: yamlfile.Node) -> Limits | None:
    m = node.mapping({*_INT_LIMITS, *_TIME_LIMITS, "bare_newline"})
    if m is None:
        return None
    values: dict[str, object] = {}
    for key, minimum in _INT_LIMITS.items():
        if key in m:
            values[key] = m[key].as_int(minimum=minimum)
    for key, least in _TIME_LIMITS.items():
        if key in m:
            number = m[key].as_number(minimum=least)
            values[key] = None if number is None else float(number)
    if "bare_newline" in m:
        choice = m["bare_newline"].as_choice([b.value for b in BareNewline])
        values["bare_newline"] = None if choice is None else BareNewline(choice)
    if None in values.values():
        return None
    limits = Limits(**values)  # type: ignore[arg-type]
    if limits.max_sessions_per_ip > limits.max_sessions:
        m.get("max_sessions_per_ip", node).problem(
            f"max_sessions_per_ip ({limits.max_sessions_per_ip}) is more than max_sessions "
            f"({limits.max_sessions})"
        )
        return None
    if limits.session_timeout < limits.idle_timeout:
        m.get("session_timeout", node).problem(
            f"session_timeout ({limits.session_timeout:g}) is shorter than idle_timeout "
            f"({limits.idle_timeout:g})"
        )
        return None
    return limits


def _auth(node: yamlfile.Node, rel: _Rel) -> Auth | None:
    m = node.mapping({"users_file"}, required=("users_file",))
    users = rel(m["users_file"]) if m and "users_file" in m else None
    return Auth(users_file=users) if users is not None else None


def _tls(node: yamlfile.Node, rel: _Rel) -> Tls | None:
    m = node.mapping({"cert", "key", "implicit"}, required=("cert", "key"))
    if m is None or "cert" not in m or "key" not in m:
        return None
    cert, key = rel(m["cert"]), rel(m["key"])
    implicit = m["implicit"].as_bool() if "implicit" in m else False
    if cert is None or key is None or implicit is None:
        return None
    return Tls(cert=cert, key=key, implicit=implicit)


def _networks(
    node: yamlfile.Node,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    items = node.sequence()
    if items is None:
        return None
    networks = []
    for item in items:
        text = item.as_str()
        if text is None:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            item.problem(f"{text!r} is not a network in CIDR form, e.g. 10.0.0.0/8")
    return tuple(networks) if len(networks) == len(items) else None


_UPSTREAM = {
    "host",
    "port",
    "security",
    "username",
    "password_env",
    "password_file",
    "timeout",
    "verify_tls",
}


def _upstream(node: yamlfile.Node, rel: _Rel) -> Upstream | None:
    m = node.mapping(_UPSTREAM, required=("host",))
    if m is None or "host" not in m:
        return None
    host = m["host"].as_str()
    security = (
        m["security"].as_choice([s.value for s in Security])
        if "security" in m
        else _default(Upstream, "security").value
    )
    default_port = {"none": 25, "starttls": 587, "tls": 465}.get(security or "none", 25)
    port = m["port"].as_int(minimum=1, maximum=65535) if "port" in m else default_port
    username = m["username"].as_str() if "username" in m else None
    password_env = m["password_env"].as_str() if "password_env" in m else None
    password_file = rel(m["password_file"]) if "password_file" in m else None
    timeout = (
        m["timeout"].as_number(minimum=0.1) if "timeout" in m else _default(Upstream, "timeout")
    )
    verify = m["verify_tls"].as_bool() if "verify_tls" in m else _default(Upstream, "verify_tls")
    if "username" in m and not ("password_env" in m or "password_file" in m):
        m["username"].problem("a username needs 'password_env' or 'password_file'")
    if host is None or security is None or port is None or timeout is None or verify is None:
        return None
    return Upstream(
        host=host,
        port=port,
        security=Security(security),
        username=username,
        password_env=password_env,
        password_file=password_file,
        timeout=float(timeout),
        verify_tls=verify,
    )


_SES = {
    "api",
    "identity_arn",
    "source",
    "feedback_address",
    "enabled",
    "region",
    "endpoint_url",
    "configuration_set",
    "max_send_rate",
    "fallback_after",
    "timeout",
    "circuit_cooldown",
    "events",
    "suppressed",
}


def _ses(node: yamlfile.Node) -> Ses | None:
    m = node.mapping(_SES)
    if m is None:
        return None
    default = Ses()
    enabled = m["enabled"].as_bool() if "enabled" in m else default.enabled
    region = m["region"].as_str() if "region" in m else default.region
    endpoint = None
    if "endpoint_url" in m and not m["endpoint_url"].is_null():
        endpoint = m["endpoint_url"].as_str()
    config_set = None
    if "configuration_set" in m and not m["configuration_set"].is_null():
        config_set = m["configuration_set"].as_str()
    rate: float | None = None
    ok = True
    if "max_send_rate" in m and m["max_send_rate"].scalar() != "auto":
        rate = m["max_send_rate"].as_number(minimum=0.01)
        ok = rate is not None
    fallback = (
        m["fallback_after"].as_number(minimum=0)
        if "fallback_after" in m
        else default.fallback_after
    )
    timeout = m["timeout"].as_number(minimum=0.1) if "timeout" in m else default.timeout
    cooldown = (
        m["circuit_cooldown"].as_number(minimum=1)
        if "circuit_cooldown" in m
        else default.circuit_cooldown
    )
    suppressed: str | None = default.suppressed.value
    if "suppressed" in m:
        suppressed = m["suppressed"].as_choice([c.value for c in Suppressed])
        ok = ok and suppressed is not None
    queue_url = default.events_queue_url
    if "events" in m and not m["events"].is_null():
        events = m["events"].mapping({"queue_url"})
        ok = ok and events is not None
        if events is not None and "queue_url" in events and not events["queue_url"].is_null():
            queue_url = events["queue_url"].as_str()
            if queue_url is not None and not queue_url.startswith(("https://", "http://")):
                events["queue_url"].problem(
                    f"expected an SQS queue URL like https://sqs.REGION.amazonaws.com/"
                    f"ACCOUNT/NAME, got {queue_url!r}"
                )
                queue_url = None
            ok = ok and queue_url is not None
    api: str | None = default.api.value
    if "api" in m:
        api = m["api"].as_choice([a.value for a in SesApi])
        ok = ok and api is not None
    identity_arn = _optional(m, "identity_arn")
    if identity_arn is not None and not IDENTITY_ARN.fullmatch(identity_arn):
        m["identity_arn"].problem(f"expected {IDENTITY_ARN_FORM}, got {identity_arn!r}")
        ok = False
    source = _optional(m, "source")
    if source is not None and not _ADDRESS.fullmatch(source):
        m["source"].problem(
            f"expected an address like bounces@lms.example.edu (SES needs an address as Source;"
            f" its domain or the address must be verified), got {source!r}"
        )
        ok = False
    feedback = _optional(m, "feedback_address")
    if feedback is not None and api != SesApi.V2.value:
        m["feedback_address"].problem(
            "needs api: v2 (SendRawEmail has no FeedbackForwardingEmailAddress)"
        )
        ok = False
    if None in (enabled, region, fallback, timeout, cooldown) or not ok:
        return None
    assert enabled is not None and region and fallback is not None and timeout and cooldown
    return Ses(
        enabled=enabled,
        region=region,
        endpoint_url=endpoint,
        configuration_set=config_set,
        max_send_rate=rate,
        fallback_after=float(fallback),
        timeout=float(timeout),
        circuit_cooldown=float(cooldown),
        events_queue_url=queue_url,
        suppressed=Suppressed(suppressed or Ses().suppressed),
        api=SesApi(api or default.api),
        identity_arn=identity_arn,
        source=source,
        feedback_address=feedback,
    )


def _optional(m: dict[str, yamlfile.Node], key: str) -> str | None:
    """The string at `key`, None when absent or null."""
    if key not in m or m[key].is_null():
        return None
    return m[key].as_str()


def _retry(node: yamlfile.Node) -> Retry | None:
    m = node.mapping({"schedule", "max_age"})
    if m is None:
        return None
    schedule: tuple[float, ...] | None = Retry().schedule
    if "schedule" in m:
        items = m["schedule"].sequence()
        values = [i.as_number(minimum=1) for i in items] if items is not None else None
        if not values or any(v is None for v in values):
            if values == []:
                m["schedule"].problem("needs at least one delay in seconds")
            schedule = None
        else:
            schedule = tuple(float(v) for v in values if v is not None)
    max_age = m["max_age"].as_number(minimum=1) if "max_age" in m else Retry().max_age
    if schedule is None or max_age is None:
        return None
    return Retry(schedule=schedule, max_age=float(max_age))


def _bounces(node: yamlfile.Node) -> Bounces | None:
    m = node.mapping({"dsn", "from", "delay_warning"})
    if m is None:
        return None
    dsn = m["dsn"].as_bool() if "dsn" in m else Bounces().dsn
    sender = Bounces().from_address
    ok = True
    if "from" in m and not m["from"].is_null():
        sender = m["from"].as_str()
        if sender is not None and not _ADDRESS.fullmatch(sender):
            m["from"].problem(f"expected a mail address like MAILER-DAEMON@host, got {sender!r}")
        ok = sender is not None and _ADDRESS.fullmatch(sender) is not None
    delay = Bounces().delay_warning
    if "delay_warning" in m and not m["delay_warning"].is_null():
        delay = m["delay_warning"].as_number(minimum=1)
        ok = ok and delay is not None
    if dsn is None or not ok:
        return None
    return Bounces(dsn=dsn, from_address=sender, delay_warning=delay)


_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+")


def check_listen_env(settings: Settings) -> list[str]:
    """Problems that only show at run time (files that must exist); empty when fine."""
    problems = []
    for label, file in (
        ("auth.users_file", settings.auth.users_file if settings.auth else None),
        ("tls.cert", settings.tls.cert if settings.tls else None),
        ("tls.key", settings.tls.key if settings.tls else None),
    ):
        if file is not None and not file.is_file():
            problems.append(f"{settings.source}: {label}: {file} does not exist")
    return problems


__all__ = ["ConfigError", "Settings", "find_config", "load"]
