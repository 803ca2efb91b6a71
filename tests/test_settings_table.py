"""relay.yaml validation (DESIGN 3.2, 3.1: "errors name the file, line and key").

Each row writes a relay.yaml into tmp_path and loads it with `settings.load`.
Problems are compared as the admin reads them, `FILE:LINE: key: message`, with
FILE standing for the path written.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest

from relay import settings
from relay.errors import ConfigError
from relay.rules import DEFAULT_RULES
from relay.settings import DEFAULT_METRICS, HostPort, Mode, Security, SesApi, Settings, Upstream

MINIMAL = "upstream:\n  host: smtp.example.org\n"
TOP_KEYS = (
    "allow_networks, auth, bounces, deliverers, failed_retention, hostname, limits, listen,"
    " metrics, mode, retention, retry, rules, ses, spool, tls, upstream"
)
NON_LOOPBACK = (
    "0.0.0.0:25 is not a loopback address: it needs both 'auth' and 'tls' (relay is never"
    " an open relay); use 127.0.0.1 or configure auth and tls"
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    """The problems `settings.load(path)` raises, one line each, the path written FILE."""
    with pytest.raises(ConfigError) as caught:
        settings.load(path)
    return [str(p).replace(str(path), "FILE") for p in caught.value.problems]


def test_minimal_config_takes_every_default(tmp_path: Path) -> None:
    """A relay.yaml with only `upstream.host` loads with the documented defaults; relative
    paths are taken from the file's directory."""
    path = write(tmp_path, MINIMAL)
    expected = Settings(
        source=path,
        listen=HostPort(host="127.0.0.1", port=2525),
        spool=tmp_path / "spool",
        rules=DEFAULT_RULES,
        upstream=Upstream(host="smtp.example.org"),
        hostname=socket.gethostname(),
        metrics=DEFAULT_METRICS,
    )
    assert expected == settings.load(path)


def test_without_spool_the_state_directory_systemd_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the unit (`StateDirectory=relay`, $STATE_DIRECTORY) a relay.yaml without
    `spool:` spools in /var/lib/relay, not in /etc/relay/spool (read-only there)."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/relay:/var/lib/other")
    assert Path("/var/lib/relay") == settings.load(write(tmp_path, MINIMAL)).spool


def pick(value: Any, dotted: str, base: Path) -> Any:
    """`value.a.b` for `dotted` "a.b"; paths under `base` shown as BASE/..., others as text."""
    for name in dotted.split("."):
        value = getattr(value, name)
    if isinstance(value, Path):
        return str(value).replace(str(base), "BASE")
    if isinstance(value, HostPort):
        return str(value)
    return value


DESIGN_EXAMPLE = """\
listen: 127.0.0.1:2525
spool: /var/lib/relay
rules: rules.yaml
mode: live
limits:
  max_message_size: 10485760
  max_recipients: 50
upstream:
  host: smtp.example.org
  port: 587
  security: starttls
  username: moodle
  password_env: UPSTREAM_PASSWORD
ses:
  enabled: true
  region: eu-west-1
  endpoint_url: null
  configuration_set: null
  max_send_rate: auto
  fallback_after: 300
retry: {schedule: [60, 300, 900, 1800, 3600], max_age: 432000}
metrics: 127.0.0.1:9325
"""

VALID = [
    pytest.param(
        DESIGN_EXAMPLE,
        {
            "spool": "/var/lib/relay",
            "rules": "BASE/rules.yaml",
            "upstream.port": 587,
            "upstream.security": Security.STARTTLS,
            "upstream.password_env": "UPSTREAM_PASSWORD",
            "ses.region": "eu-west-1",
            "ses.max_send_rate": None,
            "ses.fallback_after": 300.0,
            "retry.schedule": (60.0, 300.0, 900.0, 1800.0, 3600.0),
            "retry.max_age": 432000.0,
            "metrics": "127.0.0.1:9325",
        },
        id="design-3.2-example-without-second-round-keys",
    ),
    pytest.param(
        "upstream: {host: h, security: starttls}\n", {"upstream.port": 587}, id="starttls-587"
    ),
    pytest.param(
        "upstream: {host: h}\nallow_networks: [10.0.0.0/8, 127.0.0.1/32]\n",
        {"allow_networks": tuple(map(ipaddress.ip_network, ("10.0.0.0/8", "127.0.0.1/32")))},
        id="networks-with-a-loopback-one",
    ),
    pytest.param(
        "upstream: {host: h}\nlisten: localhost:2525\nallow_networks: ['::1/128']\n",
        {"allow_networks": (ipaddress.ip_network("::1/128"),)},
        id="networks-with-localhosts-ipv6-loopback",
    ),
    pytest.param("upstream: {host: h, security: tls}\n", {"upstream.port": 465}, id="tls-465"),
    pytest.param(
        "upstream: {host: h, security: tls, port: 2465}\n",
        {"upstream.port": 2465},
        id="explicit-port-wins",
    ),
    pytest.param(
        MINIMAL + "ses: {max_send_rate: 12.5, circuit_cooldown: 60}\n",
        {"ses.max_send_rate": 12.5, "ses.circuit_cooldown": 60.0},
        id="numeric-send-rate",
    ),
    pytest.param(
        MINIMAL + "mode: shadow\nses: {enabled: false}\n",
        {"mode": Mode.SHADOW, "ses.enabled": False},
        id="shadow-and-ses-off",
    ),
    pytest.param(
        MINIMAL + "ses:\n  api: v2\n  region: eu-west-1\n"
        "  identity_arn: arn:aws:ses:eu-west-1:123456789012:identity/x.org\n"
        "  source: bounces@x.org\n  feedback_address: fb@x.org\n",
        {
            "ses.api": SesApi.V2,
            "ses.identity_arn": "arn:aws:ses:eu-west-1:123456789012:identity/x.org",
            "ses.source": "bounces@x.org",
            "ses.feedback_address": "fb@x.org",
        },
        id="ses-v2-cross-account",
    ),
    pytest.param(  # an identity in the Global endpoints' Regions, as SES's guide writes it
        MINIMAL + "ses: {identity_arn: 'arn:aws:ses:*:123456789012:identity/x.org'}\n",
        {"ses.identity_arn": "arn:aws:ses:*:123456789012:identity/x.org"},
        id="identity-arn-of-any-region",
    ),
    pytest.param(
        MINIMAL + "ses: {identity_arn: null, source: null}\n",
        {"ses.api": SesApi.V1, "ses.identity_arn": None, "ses.source": None},
        id="ses-v1-default",
    ),
    pytest.param(
        MINIMAL + "ses: {region: ap-southeast-2, endpoint_url: 'HTTP://[::1]:4566/'}\n",
        {"ses.region": "ap-southeast-2", "ses.endpoint_url": "HTTP://[::1]:4566/"},
        id="ses-region-and-endpoint",
    ),
    pytest.param(MINIMAL + "metrics: null\n", {"metrics": None}, id="metrics-off"),
    pytest.param(MINIMAL + "listen: '[::1]:2525'\n", {"listen": "[::1]:2525"}, id="ipv6-loopback"),
    pytest.param(
        MINIMAL + "listen: localhost:25\n", {"listen": "localhost:25"}, id="localhost-listen"
    ),
    pytest.param(
        MINIMAL
        + "listen: 0.0.0.0:587\nauth: {users_file: users}\ntls: {cert: c.pem, key: k.pem}\n",
        {
            "listen": "0.0.0.0:587",
            "auth.users_file": "BASE/users",
            "tls.cert": "BASE/c.pem",
        },
        id="public-listen-with-auth-and-tls",
    ),
    pytest.param(
        MINIMAL + "retry: {schedule: [5], max_age: 60}\nretention: 0\n",
        {"retry.schedule": (5.0,), "retry.max_age": 60.0, "retention": 0.0},
        id="short-retry",
    ),
    pytest.param(MINIMAL, {"failed_retention": 30 * 86400.0}, id="dead-letters-a-month"),
    pytest.param(
        MINIMAL + "failed_retention: null\n", {"failed_retention": None}, id="dead-letters-for-good"
    ),
    pytest.param(
        MINIMAL + "failed_retention: 86400\n",
        {"failed_retention": 86400.0},
        id="dead-letters-a-day",
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_configs(tmp_path: Path, text: str, expected: dict[str, Any]) -> None:
    """Valid files load, with ports by security, relative paths from the file's directory."""
    loaded = settings.load(write(tmp_path, text))
    assert expected == {key: pick(loaded, key, tmp_path) for key in expected}


INVALID = [
    # unknown keys
    pytest.param(
        MINIMAL + "listne: 127.0.0.1:2525\n",
        [f"FILE:3: listne: unknown key (valid: {TOP_KEYS})"],
        id="unknown-top-key",
    ),
    pytest.param(
        "upstream:\n  host: h\n  hots: h\n",
        [
            "FILE:3: upstream.hots: unknown key (valid: host, password_env, password_file,"
            " port, security, timeout, username, verify_tls)"
        ],
        id="unknown-nested-key",
    ),
    pytest.param(
        MINIMAL + "retry: {shedule: [60]}\n",
        ["FILE:3: retry.shedule: unknown key (valid: max_age, schedule)"],
        id="unknown-retry-key",
    ),
    pytest.param(
        MINIMAL + "mode: live\nmode: shadow\n", ["FILE:4: mode: duplicate key"], id="duplicate"
    ),
    # missing keys
    pytest.param(
        "listen: 127.0.0.1:2525\n",
        ["FILE:1: missing required key 'upstream'"],
        id="no-upstream",
    ),
    pytest.param(
        "upstream: {port: 25}\n", ["FILE:1: upstream: missing required key 'host'"], id="no-host"
    ),
    pytest.param(
        MINIMAL + "tls: {cert: c.pem}\n",
        ["FILE:3: tls: missing required key 'key'"],
        id="tls-without-key",
    ),
    # wrong types
    pytest.param(
        MINIMAL + "deliverers: four\n",
        ["FILE:3: deliverers: expected an integer, got a string"],
        id="string-for-int",
    ),
    pytest.param(
        MINIMAL + "deliverers: 2.5\n",
        ["FILE:3: deliverers: expected an integer, got 2.5"],
        id="float-for-int",
    ),
    pytest.param(
        MINIMAL + "deliverers: true\n",
        ["FILE:3: deliverers: expected an integer, got true/false"],
        id="bool-for-int",
    ),
    pytest.param(
        "upstream:\n  host: h\n  port: smtp\n",
        ["FILE:3: upstream.port: expected an integer, got a string"],
        id="string-port",
    ),
    pytest.param(
        "upstream:\n  host: 5\n",
        ["FILE:2: upstream.host: expected a string, got an integer"],
        id="int-host",
    ),
    pytest.param(
        "upstream:\n  host: ''\n", ["FILE:2: upstream.host: must not be empty"], id="empty-host"
    ),
    pytest.param(
        MINIMAL + "ses: {enabled: 'yes please'}\n",
        ["FILE:3: ses.enabled: expected true or false, got a string"],
        id="string-for-bool",
    ),
    pytest.param(
        MINIMAL + "ses: {max_send_rate: fast}\n",
        ["FILE:3: ses.max_send_rate: expected a number, got a string"],
        id="send-rate-word",
    ),
    pytest.param(
        MINIMAL + "ses: {max_send_rate: {a: 1}}\n",
        ["FILE:3: ses.max_send_rate: expected a single value, got a mapping"],  # once, not twice
        id="send-rate-mapping",
    ),
    pytest.param(
        "upstream:\n  host: smtp.example.org\n  security: off\n",
        [
            "FILE:3: upstream.security: off is read as true or false: quote it, or one of: "
            "none, starttls, tls"
        ],
        id="choice-read-as-bool",
    ),
    pytest.param(
        MINIMAL + "ses:\n", ["FILE:3: ses: expected a mapping, got null"], id="null-section"
    ),
    pytest.param(
        MINIMAL + "ses: {api: v3}\n",
        ["FILE:3: ses.api: 'v3' is not one of: v1, v2"],
        id="ses-api-v3",
    ),
    pytest.param(
        MINIMAL + "ses: {identity_arn: example.org}\n",
        [
            "FILE:3: ses.identity_arn: expected an identity ARN like"
            " arn:aws:ses:eu-west-1:123456789012:identity/example.org, got 'example.org'"
        ],
        id="identity-arn-not-an-arn",
    ),
    pytest.param(  # every send failed, and the mail went upstream
        MINIMAL + "ses:\n  region: eu-west-1\n"
        "  identity_arn: arn:aws:ses:us-east-1:123456789012:identity/x.org\n",
        [
            "FILE:5: ses.identity_arn: its Region is us-east-1, and ses.region is eu-west-1:"
            " SES sends for an identity only through the Region it was verified in (or `*` in"
            " the ARN, for an identity in the Global endpoints' Regions)"
        ],
        id="identity-arn-of-another-region",
    ),
    pytest.param(
        MINIMAL + "ses: {region: eu west 1}\n",
        ["FILE:3: ses.region: expected an AWS region like eu-west-1, got 'eu west 1'"],
        id="region-with-spaces",
    ),
    pytest.param(
        MINIMAL + "ses: {endpoint_url: 'localhost:4566'}\n",
        [
            "FILE:3: ses.endpoint_url: expected a URL like"
            " https://email.eu-west-1.amazonaws.com, got 'localhost:4566'"
        ],
        id="endpoint-without-scheme",
    ),
    pytest.param(
        MINIMAL + "ses: {source: example.org}\n",
        [
            "FILE:3: ses.source: expected an address like bounces@lms.example.edu (SES needs"
            " an address as Source; its domain or the address must be verified), got"
            " 'example.org'"
        ],
        id="source-a-domain",
    ),
    pytest.param(
        MINIMAL + "ses: {feedback_address: fb@x.org}\n",
        [
            "FILE:3: ses.feedback_address: needs api: v2 (SendRawEmail has no"
            " FeedbackForwardingEmailAddress)"
        ],
        id="feedback-address-with-v1",
    ),
    pytest.param(
        MINIMAL + "limits: [1, 2]\n",
        ["FILE:3: limits: expected a mapping, got a list"],
        id="list-for-mapping",
    ),
    pytest.param(
        MINIMAL + "hostname: 2020-99-99\n",
        ["FILE:3: hostname: unreadable value: month must be in 1..12"],
        id="impossible-date",
    ),
    # listen and metrics addresses
    pytest.param(
        MINIMAL + "listen: localhost\n",
        ["FILE:3: listen: expected host:port, e.g. 127.0.0.1:2525"],
        id="listen-without-port",
    ),
    pytest.param(
        MINIMAL + "listen: 127.0.0.1:99999\n",
        ["FILE:3: listen: expected host:port with a port 0-65535, got '127.0.0.1:99999'"],
        id="listen-port-too-big",
    ),
    pytest.param(
        MINIMAL + "listen: ':2525'\n",
        ["FILE:3: listen: expected host:port with a port 0-65535, got ':2525'"],
        id="listen-without-host",
    ),
    pytest.param(
        MINIMAL + "metrics: nowhere\n",
        ["FILE:3: metrics: expected host:port, e.g. 127.0.0.1:2525"],
        id="bad-metrics-address",
    ),
    pytest.param(
        MINIMAL + "allow_networks: ['10.0.0.0/33']\n",
        ["FILE:3: allow_networks[0]: '10.0.0.0/33' is not a network in CIDR form, e.g. 10.0.0.0/8"],
        id="bad-network",
    ),
    pytest.param(  # the README's commented line, uncommented: every Moodle mail got 554
        MINIMAL + "allow_networks: [10.0.0.0/8]\n",
        [
            "FILE:3: allow_networks: 127.0.0.1:2525 is a loopback address, and none of these"
            " networks holds its clients' address: every one would be refused; add"
            " 127.0.0.0/8, or leave the key out"
        ],
        id="networks-a-loopback-listen-never-sees",
    ),
    pytest.param(  # the other family's loopback: as good as none
        MINIMAL + "listen: '[::1]:2525'\nallow_networks: [127.0.0.0/8]\n",
        [
            "FILE:4: allow_networks: [::1]:2525 is a loopback address, and none of these"
            " networks holds its clients' address: every one would be refused; add ::1/128,"
            " or leave the key out"
        ],
        id="networks-of-the-other-loopback-family",
    ),
    # never an open relay
    pytest.param(
        MINIMAL + "listen: 0.0.0.0:25\n",
        [f"FILE:3: listen: {NON_LOOPBACK}"],
        id="public-listen-alone",
    ),
    pytest.param(
        MINIMAL + "listen: 0.0.0.0:25\nauth: {users_file: users}\n",
        [
            f"FILE:3: listen: {NON_LOOPBACK}",
            "FILE:4: auth: auth on a non-loopback listen needs 'tls' (passwords in clear)",
        ],
        id="public-listen-auth-without-tls",
    ),
    pytest.param(
        MINIMAL + "listen: 0.0.0.0:25\ntls: {cert: c.pem, key: k.pem}\n",
        [f"FILE:3: listen: {NON_LOOPBACK}"],
        id="public-listen-tls-without-auth",
    ),
    # retry schedule
    pytest.param(
        MINIMAL + "retry:\n  schedule: []\n",
        ["FILE:4: retry.schedule: needs at least one delay in seconds"],
        id="empty-schedule",
    ),
    pytest.param(
        MINIMAL + "retry:\n  schedule: 60\n",
        ["FILE:4: retry.schedule: expected a list, got an integer"],
        id="schedule-not-a-list",
    ),
    pytest.param(
        MINIMAL + "retry:\n  schedule: [60, -1, 0]\n",
        [
            "FILE:4: retry.schedule[1]: must be at least 1, got -1",
            "FILE:4: retry.schedule[2]: must be at least 1, got 0",
        ],
        id="schedule-negative-and-zero",
    ),
    pytest.param(
        MINIMAL + "retry:\n  schedule: [60, soon]\n",
        ["FILE:4: retry.schedule[1]: expected a number, got a string"],
        id="schedule-word",
    ),
    pytest.param(
        MINIMAL + "retry:\n  max_age: 0\n",
        ["FILE:4: retry.max_age: must be at least 1, got 0"],
        id="max-age-zero",
    ),
    # negative and too small numbers
    pytest.param(
        MINIMAL + "ses: {fallback_after: -1}\n",
        ["FILE:3: ses.fallback_after: must be at least 0, got -1"],
        id="negative-fallback-after",
    ),
    pytest.param(
        MINIMAL + "ses: {max_send_rate: -3}\n",
        ["FILE:3: ses.max_send_rate: must be at least 0.01, got -3"],
        id="negative-send-rate",
    ),
    pytest.param(
        MINIMAL + "ses: {timeout: 0}\n",
        ["FILE:3: ses.timeout: must be at least 0.1, got 0"],
        id="zero-ses-timeout",
    ),
    pytest.param(
        MINIMAL + "ses: {circuit_cooldown: 0}\n",
        ["FILE:3: ses.circuit_cooldown: must be at least 1, got 0"],
        id="zero-cooldown",
    ),
    pytest.param(
        MINIMAL + "retention: -1\n",
        ["FILE:3: retention: must be at least 0, got -1"],
        id="negative-retention",
    ),
    pytest.param(  # a dead letter is the only copy of its mail: a day at least to see it
        MINIMAL + "failed_retention: 3600\n",
        ["FILE:3: failed_retention: must be at least 86400, got 3600"],
        id="dead-letters-an-hour",
    ),
    pytest.param(
        MINIMAL + "deliverers: 0\n",
        ["FILE:3: deliverers: must be at least 1, got 0"],
        id="zero-deliverers",
    ),
    pytest.param(
        MINIMAL + "limits: {max_message_size: 100, max_recipients: 0}\n",
        [
            "FILE:3: limits.max_message_size: must be at least 1024, got 100",
            "FILE:3: limits.max_recipients: must be at least 1, got 0",
        ],
        id="tiny-limits",
    ),
    pytest.param(
        "upstream:\n  host: h\n  port: 0\n",
        ["FILE:3: upstream.port: must be at least 1, got 0"],
        id="upstream-port-zero",
    ),
    pytest.param(
        "upstream:\n  host: smtp.example.org:587\n",
        [
            "FILE:2: upstream.host: 'smtp.example.org:587' is not a host name or IP address (the"
            " port goes in 'port:', no scheme, no spaces)"
        ],
        id="upstream-host-with-port",
    ),
    # enums
    pytest.param(
        "upstream:\n  host: h\n  security: ssl\n",
        ["FILE:3: upstream.security: 'ssl' is not one of: none, starttls, tls"],
        id="bad-security",
    ),
    pytest.param(
        MINIMAL + "mode: dry-run\n",
        ["FILE:3: mode: 'dry-run' is not one of: live, shadow"],
        id="bad-mode",
    ),
    # secrets
    pytest.param(
        "upstream:\n  host: h\n  username: moodle\n",
        ["FILE:3: upstream.username: a username needs 'password_env' or 'password_file'"],
        id="username-without-password-source",
    ),
    pytest.param(
        MINIMAL + 'hostname: "relay.example.org\\r\\nX-Injected: yes"\n',
        [
            "FILE:3: hostname: 'relay.example.org\\r\\nX-Injected: yes' is not a host name"
            " or IP address"
        ],
        id="hostname-with-crlf-would-split-the-greeting",
    ),
    pytest.param(
        MINIMAL + "ses: {configuration_set: moodle reminders}\n",
        [
            "FILE:3: ses.configuration_set: expected a configuration set name: 1-64 of ASCII"
            " letters, digits, '_' and '-', got 'moodle reminders'"
        ],
        id="configuration-set-as-a-rule-checks-it",
    ),
    pytest.param(
        MINIMAL + "retry: {schedule: [.inf], max_age: 1.0e+300}\n",
        [
            "FILE:3: retry.schedule[0]: expected a finite number, got inf",
            "FILE:3: retry.max_age: must be at most 3.1536e+07, got 1e+300",
        ],
        id="an-endless-retry-would-park-mail-for-good",
    ),
    # the file as a whole
    pytest.param("", ["FILE:1: the file is empty"], id="empty-file"),
    pytest.param(  # read at every reload: PyYAML takes about a second a MB
        MINIMAL + "#" * (1 << 20) + "\n",
        ["FILE: over 1,048,576 bytes: not a relay.yaml or rules file"],
        id="over-a-mib",
    ),
    pytest.param(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [{', '.join([f'*{chr(ord(c) - 1)}'] * 10)}]\n" for c in "bcde"),
        ["FILE: YAML with aliases expanded is over 100,000 values: write it out"],
        id="alias-bomb",
    ),
    pytest.param(
        "[" * 3000 + "]" * 3000 + "\n", ["FILE: YAML nested too deeply"], id="nested-too-deeply"
    ),
    pytest.param("- upstream\n", ["FILE:1: expected a mapping, got a list"], id="top-level-list"),
    pytest.param(
        "upstream:\n  host: 'smtp\n",
        [
            "FILE:2: YAML syntax error: found unexpected end of stream"
            " (while scanning a quoted scalar)"
        ],
        id="unclosed-quote-names-where-it-began",
    ),
    pytest.param(  # it named line 1, where the mapping the bad line breaks began
        "upstream:\n  host: h\nses:\n  enabled: false\n  region: eu-west-1\n fallback_after: 300\n",
        [
            "FILE:6: YAML syntax error: expected <block end>, but found '<block mapping start>'"
            " (while parsing a block mapping that began at line 1)"
        ],
        id="bad-indent-names-its-own-line",
    ),
    pytest.param(  # found at the next token, past the comments: the key's line is the one
        "upstream:\n  host: h\nmode shadow\n# one\n# two\nretry: {}\n",
        ["FILE:3: YAML syntax error: could not find expected ':' (while scanning a simple key)"],
        id="key-without-its-colon-names-its-line",
    ),
    pytest.param(  # YAML 1.1's octal: mail went to port 21
        "upstream:\n  host: h\n  port: 0025\nretry:\n  schedule: [60, 0587]\n",
        [
            "FILE:3: upstream.port: 0025 has a leading zero: YAML reads it as the octal"
            " number 21; write 25",
            "FILE:5: retry.schedule[1]: 0587 has a leading zero: YAML reads it as text; write 587",
        ],
        id="leading-zero-is-not-read-as-octal",
    ),
    pytest.param(
        "mode: dry\nupstream:\n  host: h\n  security: ssl\nretry: {schedule: []}\n",
        [
            "FILE:1: mode: 'dry' is not one of: live, shadow",
            "FILE:4: upstream.security: 'ssl' is not one of: none, starttls, tls",
            "FILE:5: retry.schedule: needs at least one delay in seconds",
        ],
        id="every-problem-at-once",
    ),
]


@pytest.mark.parametrize(("text", "expected"), INVALID)
def test_invalid_configs(tmp_path: Path, text: str, expected: list[str]) -> None:
    """Each invalid file is refused with every problem, each naming file:line and key."""
    assert expected == problems(write(tmp_path, text))


def test_missing_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """A relay.yaml that cannot be read is reported with its path."""
    path = tmp_path / "absent.yaml"
    expected = ["FILE: cannot read the file: [Errno 2] No such file or directory: 'FILE'"]
    assert expected == problems(path)


def test_a_file_not_in_utf8_names_the_line(tmp_path: Path) -> None:
    """A Latin-1 byte (an accent typed in another editor) is reported at its line, not as a
    byte offset."""
    path = tmp_path / "relay.yaml"
    path.write_bytes(b"upstream:\n  host: h\n# caf\xe9\n")
    assert ["FILE:3: not UTF-8: byte 0xe9 (invalid continuation byte)"] == problems(path)


OUT_OF_RANGE = [
    pytest.param(
        "upstream:\n  host: h\n  port: 70000\n",
        [(3, "upstream.port")],
        id="upstream-port-over-65535",
    ),
    pytest.param(
        MINIMAL + "ses: {fallback_after: .nan}\n",
        [(3, "ses.fallback_after")],
        id="nan-fallback-after",
    ),
    pytest.param(MINIMAL + "listen: 127.0.0.1:65536\n", [(3, "listen")], id="listen-port-65536"),
]


@pytest.mark.parametrize(("text", "where"), OUT_OF_RANGE)
def test_out_of_range_values_are_problems(
    tmp_path: Path, text: str, where: list[tuple[int, str]]
) -> None:
    """Values no service could use are load errors at their line and key (whatever the
    wording), not failures at delivery time."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        settings.load(path)
    assert where == [(p.line, p.key) for p in caught.value.problems]
