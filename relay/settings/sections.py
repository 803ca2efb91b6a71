"""The larger sections of relay.yaml: limits, upstream, ses, retry, bounces.

Each reader takes the section's YAML node and returns its frozen value, or None
after recording every problem on the node (file:line:key). A key left out takes
the dataclass's own default (`relay.settings.model`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path

from relay import yamlfile
from relay.rules import (
    CONFIG_SET,
    CONFIG_SET_FORM,
    IDENTITY_ARN,
    IDENTITY_ARN_FORM,
    region_problem,
)
from relay.settings.model import (
    BareNewline,
    Bounces,
    Limits,
    Retry,
    Security,
    Ses,
    SesApi,
    Suppressed,
    Upstream,
    default_of,
)

Rel = Callable[["yamlfile.Node"], Path | None]  # a path relative to relay.yaml


# The longest a retry delay, `max_age` or `delay_warning` may be: a mail due later than
# this is parked, not queued (and seconds far enough ahead are no date to show).
YEAR = 365 * 86400.0

_INT_LIMITS = {  # key -> the smallest value that makes sense
    "max_message_size": 1024,
    "max_recipients": 1,
    "max_sessions": 1,
    "max_sessions_per_ip": 1,
    "max_data_in_memory": 0,
    "spill_min_free": 0,
    "spool_min_free": 0,
    "max_auth_failures": 1,
    "max_junk_commands": 1,
}
_TIME_LIMITS = {"idle_timeout": 1.0, "session_timeout": 1.0}


def limits(node: yamlfile.Node) -> Limits | None:
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


# A host name (letters, digits, hyphens, dots, underscores) or an IP address: not
# "smtp.example.org:587", "smtp://..." or a name with spaces.
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def is_host(text: str) -> bool:
    """A host name or an IP address: what `upstream.host` and `hostname` may be."""
    if _HOST_NAME.fullmatch(text):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def upstream(node: yamlfile.Node, rel: Rel) -> Upstream | None:
    m = node.mapping(_UPSTREAM, required=("host",))
    if m is None or "host" not in m:
        return None
    host = m["host"].as_str()
    if host is not None and not is_host(host):
        m["host"].problem(
            f"{host!r} is not a host name or IP address (the port goes in 'port:', no"
            " scheme, no spaces)"
        )
        host = None
    security = (
        m["security"].as_choice([s.value for s in Security])
        if "security" in m
        else default_of(Upstream, "security").value
    )
    default_port = {"none": 25, "starttls": 587, "tls": 465}.get(security or "none", 25)
    port = m["port"].as_int(minimum=1, maximum=65535) if "port" in m else default_port
    username = m["username"].as_str() if "username" in m else None
    password_env = m["password_env"].as_str() if "password_env" in m else None
    password_file = rel(m["password_file"]) if "password_file" in m else None
    timeout = (
        m["timeout"].as_number(minimum=0.1) if "timeout" in m else default_of(Upstream, "timeout")
    )
    verify = m["verify_tls"].as_bool() if "verify_tls" in m else default_of(Upstream, "verify_tls")
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


def ses(node: yamlfile.Node) -> Ses | None:
    m = node.mapping(_SES)
    if m is None:
        return None
    default = Ses()
    enabled = m["enabled"].as_bool() if "enabled" in m else default.enabled
    region = m["region"].as_str() if "region" in m else default.region
    if region is not None and not _REGION.fullmatch(region):
        m["region"].problem(f"expected an AWS region like eu-west-1, got {region!r}")
        region = None
    endpoint, ok = _optional_like(
        m, "endpoint_url", _URL, "a URL like https://email.eu-west-1.amazonaws.com"
    )
    config_set, fine = _optional_like(m, "configuration_set", CONFIG_SET, CONFIG_SET_FORM)
    ok = ok and fine
    rate: float | None = None
    if "max_send_rate" in m and not m["max_send_rate"].is_text("auto"):
        rate = m["max_send_rate"].as_number(minimum=0.01)
        ok = ok and rate is not None
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
    identity_arn, fine = _optional_like(m, "identity_arn", IDENTITY_ARN, IDENTITY_ARN_FORM)
    ok = ok and fine
    if identity_arn and region and (problem := region_problem(identity_arn, region)):
        m["identity_arn"].problem(problem)
        ok = False
    source, fine = _optional_like(
        m,
        "source",
        _ADDRESS,
        "an address like bounces@lms.example.edu (SES needs an address as Source;"
        " its domain or the address must be verified)",
    )
    ok = ok and fine
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


def _optional_like(
    m: dict[str, yamlfile.Node], key: str, pattern: re.Pattern[str], like: str
) -> tuple[str | None, bool]:
    """`_optional(m, key)`, and whether it is fine: a string `pattern` does not match whole
    is a problem ("expected LIKE, got VALUE") and comes back as None."""
    value = _optional(m, key)
    if value is None or pattern.fullmatch(value):
        return value, True
    m[key].problem(f"expected {like}, got {value!r}")
    return None, False


def retry(node: yamlfile.Node) -> Retry | None:
    m = node.mapping({"schedule", "max_age"})
    if m is None:
        return None
    schedule: tuple[float, ...] | None = Retry().schedule
    if "schedule" in m:
        items = m["schedule"].sequence()
        values = None if items is None else [i.as_number(minimum=1, maximum=YEAR) for i in items]
        if not values or any(v is None for v in values):
            if values == []:
                m["schedule"].problem("needs at least one delay in seconds")
            schedule = None
        else:
            schedule = tuple(float(v) for v in values if v is not None)
    max_age = m["max_age"].as_number(minimum=1, maximum=YEAR) if "max_age" in m else Retry().max_age
    if schedule is None or max_age is None:
        return None
    return Retry(schedule=schedule, max_age=float(max_age))


def bounces(node: yamlfile.Node) -> Bounces | None:
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
        delay = m["delay_warning"].as_number(minimum=1, maximum=YEAR)
        ok = ok and delay is not None
    if dsn is None or not ok:
        return None
    return Bounces(dsn=dsn, from_address=sender, delay_warning=delay)


_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+")
# What botocore takes (botocore.utils.validate_region_name, is_valid_endpoint_url): a bad
# value passed every check and stopped the delivery process at each start.
_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_URL = re.compile(r"https?://[^\s/?#]+(?:[/?#]\S*)?", re.IGNORECASE)
