"""settings: relay.yaml, read once and validated, every problem with file:line:key.

    relay.yaml --load()--> Settings (frozen: model) --> every stage reads it

`model` holds the values and their defaults, `load` the file and its top-level
keys, `sections` the larger sections (limits, upstream, ses, retry, bounces).
"""

from relay.errors import ConfigError
from relay.settings.load import (
    DEFAULT_PATHS,
    check_listen_env,
    check_secrets,
    exposed_secrets,
    find_config,
    load,
    rules_of,
    spool_of,
    tls_context,
)
from relay.settings.model import (
    DEFAULT_LISTEN,
    DEFAULT_METRICS,
    Auth,
    BareNewline,
    Bounces,
    HostPort,
    Limits,
    Mode,
    Retry,
    Security,
    Ses,
    SesApi,
    Settings,
    Suppressed,
    Tls,
    Upstream,
)

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_METRICS",
    "DEFAULT_PATHS",
    "Auth",
    "BareNewline",
    "Bounces",
    "ConfigError",
    "HostPort",
    "Limits",
    "Mode",
    "Retry",
    "Security",
    "Ses",
    "SesApi",
    "Settings",
    "Suppressed",
    "Tls",
    "Upstream",
    "check_listen_env",
    "check_secrets",
    "exposed_secrets",
    "find_config",
    "load",
    "rules_of",
    "spool_of",
    "tls_context",
]
