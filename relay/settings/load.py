"""relay.yaml -> `Settings`: the file as a whole, its top-level keys, and the small sections.

`load(path)` is the only entry point; it raises `ConfigError` listing every
problem at once, each with file:line:key. Relative paths (rules, spool, users
file, TLS files) are taken relative to the directory of relay.yaml, so a config
directory can be moved as a whole. The larger sections are read in `sections`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from pathlib import Path

import yaml

from relay import yamlfile
from relay.rules import DEFAULT_RULES
from relay.settings import sections
from relay.settings.model import (
    DEFAULT_LISTEN,
    DEFAULT_METRICS,
    Auth,
    Bounces,
    HostPort,
    Limits,
    Mode,
    Retry,
    Ses,
    Settings,
    Tls,
    default_of,
)
from relay.settings.sections import Rel

DEFAULT_PATHS = (Path("relay.yaml"), Path("/etc/relay/relay.yaml"))
FAILED_RETENTION_MIN = 86400  # seconds: failed_retention, unless null


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


def default_spool(base: Path) -> Path:
    """Without `spool:`, the state directory systemd gives the unit (`StateDirectory=relay`
    sets $STATE_DIRECTORY; the container image sets it too), else `spool` beside relay.yaml:
    under the unit that was /etc/relay/spool, read-only there (`ProtectSystem=strict`)."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) if state else base / "spool"


def rules_of(path: Path) -> Path | None:
    """The rules file relay.yaml at `path` names (the shipped rules without `rules:`), read
    even when the rest of the file has problems, so `relay check-config` reports the
    rules' problems as well; None when that cannot be read."""
    _, root = yamlfile.load(path)
    return _path_alone(root, path, "rules", DEFAULT_RULES)


def spool_of(path: Path) -> Path | None:
    """The spool relay.yaml at `path` names, read even when the rest of the file has
    problems: `relay queue` still works after a bad edit that a reload refused (relay serve
    runs on, on what it read before); None when that cannot be read. A file that is no
    YAML any more (a bad indent, a tab: the commonest bad edits) is read line by line."""
    doc, root = yamlfile.load(path)
    if root is not None or not doc.problems[0].message.startswith("YAML syntax error"):
        return _path_alone(root, path, "spool", default_spool(path.parent))
    lines = [m.group(1) for m in _SPOOL_LINE.finditer(path.read_text("utf-8", "replace"))]
    if not lines:
        return default_spool(path.parent)
    value = lines[0].strip("'\"") if len(lines) == 1 else ""
    return path.parent / value if value else None


# `spool: VALUE` at the start of a line, maybe a comment after: as relay.yaml is written.
_SPOOL_LINE = re.compile(
    r"""^spool:[ \t]*("[^"\n]*"|'[^'\n]*'|[^#\r\n]*?)[ \t]*(?:#.*)?$""", re.MULTILINE
)


def _path_alone(root: yamlfile.Node | None, path: Path, key: str, default: Path) -> Path | None:
    """Top-level `key` of relay.yaml as a path beside it (`default` without the key), read
    alone; None when the file, or that one key, cannot be read (`load` says why)."""
    if root is None or not isinstance(root.node, yaml.MappingNode):
        return None
    found = [v for k, v in root.node.value if isinstance(k, yaml.ScalarNode) and k.value == key]
    if not found:
        return default
    value = root.child(key, found[0]).scalar() if len(found) == 1 else None
    return path.parent / value if isinstance(value, str) and value.strip() else None


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
    "failed_retention",
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
    spool = rel(top["spool"]) if "spool" in top else default_spool(base)
    # No `rules:` key: the shipped Moodle defaults (relay/rules/rules.yaml).
    rules = rel(top["rules"]) if "rules" in top else DEFAULT_RULES
    mode = (
        top["mode"].as_choice([m.value for m in Mode])
        if "mode" in top
        else default_of(Settings, "mode")
    )
    hostname = top["hostname"].as_str() if "hostname" in top else socket.gethostname()
    if "hostname" in top and hostname is not None and not sections.is_host(hostname):
        # It goes into every greeting and Received: line; a CR or LF would split both.
        top["hostname"].problem(f"{hostname!r} is not a host name or IP address")
        hostname = None
    limits = sections.limits(top["limits"]) if "limits" in top else Limits()
    auth = _auth(top["auth"], rel) if "auth" in top and not top["auth"].is_null() else None
    tls = _tls(top["tls"], rel) if "tls" in top and not top["tls"].is_null() else None
    networks = _networks(top["allow_networks"]) if "allow_networks" in top else ()
    upstream = sections.upstream(top["upstream"], rel) if "upstream" in top else None  # required
    ses = sections.ses(top["ses"]) if "ses" in top else Ses()
    retry = sections.retry(top["retry"]) if "retry" in top else Retry()
    bounces = sections.bounces(top["bounces"]) if "bounces" in top else Bounces()
    metrics: HostPort | None = DEFAULT_METRICS  # `metrics: null` turns it off
    if "metrics" in top:
        metrics = None if top["metrics"].is_null() else _host_port(top["metrics"])
    deliverers = (
        top["deliverers"].as_int(minimum=1)
        if "deliverers" in top
        else default_of(Settings, "deliverers")
    )
    retention = (
        top["retention"].as_number(minimum=0)
        if "retention" in top
        else default_of(Settings, "retention")
    )
    failed_ok = True  # failed_retention: None is a value here (null), not a problem
    failed_retention: float | None = default_of(Settings, "failed_retention")
    if "failed_retention" in top and top["failed_retention"].is_null():
        failed_retention = None  # the dead letters stay for good
    elif "failed_retention" in top:
        # A dead letter is the only copy of a mail no one received: a day at least to see it.
        failed_retention = top["failed_retention"].as_number(minimum=FAILED_RETENTION_MIN)
        failed_ok = failed_retention is not None

    if listen is not None and not listen.is_loopback and (auth is None or tls is None):
        top["listen"].problem(
            f"{listen} is not a loopback address: it needs both 'auth' and 'tls' "
            "(relay is never an open relay); use 127.0.0.1 or configure auth and tls"
        )
    if auth is not None and tls is None and listen is not None and not listen.is_loopback:
        top["auth"].problem("auth on a non-loopback listen needs 'tls' (passwords in clear)")
    if (
        listen is not None
        and listen.is_loopback
        and networks
        and not _holds_loopback(networks, listen.host)
    ):  # only local clients reach a loopback listen, so every one would get 554
        versions = _LOOPBACK if listen.host == "localhost" else [ip_version(listen.host)]
        wanted = " or ".join(str(_LOOPBACK[v]) for v in versions)
        top["allow_networks"].problem(
            f"{listen} is a loopback address, and none of these networks holds its clients'"
            f" address: every one would be refused; add {wanted}, or leave the key out"
        )

    values = (listen, spool, rules, mode, hostname, limits, networks, upstream, ses, retry)
    if any(v is None for v in values) or None in (deliverers, retention, bounces) or not failed_ok:
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
        failed_retention=None if failed_retention is None else float(failed_retention),
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


def _auth(node: yamlfile.Node, rel: Rel) -> Auth | None:
    m = node.mapping({"users_file"}, required=("users_file",))
    users = rel(m["users_file"]) if m and "users_file" in m else None
    return Auth(users_file=users) if users is not None else None


def _tls(node: yamlfile.Node, rel: Rel) -> Tls | None:
    m = node.mapping({"cert", "key", "implicit"}, required=("cert", "key"))
    if m is None or "cert" not in m or "key" not in m:
        return None
    cert, key = rel(m["cert"]), rel(m["key"])
    implicit = m["implicit"].as_bool() if "implicit" in m else False
    if cert is None or key is None or implicit is None:
        return None
    return Tls(cert=cert, key=key, implicit=implicit)


_LOOPBACK = {4: ipaddress.ip_network("127.0.0.0/8"), 6: ipaddress.ip_network("::1/128")}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_version(host: str) -> int:
    """4 or 6 for an address (IPv4-mapped IPv6 counts as 4: its clients come as IPv4)."""
    ip = ipaddress.ip_address(host)
    return 4 if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip.version


def _holds_loopback(networks: tuple[Network, ...], host: str) -> bool:
    """Whether `networks` holds the address clients of a loopback `host` come from: its
    family's loopback (either family's for "localhost")."""
    versions = _LOOPBACK if host == "localhost" else [ip_version(host)]
    return any(net.overlaps(_LOOPBACK[v]) for net in networks for v in versions if v == net.version)


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


def tls_context(tls: Tls) -> ssl.SSLContext:
    """The server context with `tls`'s certificate and key (OSError or ssl.SSLError when
    they cannot be used)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    return context


def check_listen_env(settings: Settings) -> list[str]:
    """Problems that only show at run time (files that must exist and be usable); empty
    when fine. A users file relay cannot read, or with no usable line, would answer every
    AUTH, so every Moodle mail, with 535 or 530, and Moodle does not retry."""
    problems = []
    for label, file in (
        ("auth.users_file", settings.auth.users_file if settings.auth else None),
        ("tls.cert", settings.tls.cert if settings.tls else None),
        ("tls.key", settings.tls.key if settings.tls else None),
    ):
        if file is not None and not file.is_file():
            problems.append(f"{settings.source}: {label}: {file} does not exist")
    tls = settings.tls
    if tls is not None and tls.cert.is_file() and tls.key.is_file():
        try:  # what relay serve does with them: a key that does not fit, a file not PEM
            tls_context(tls)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{settings.source}: tls: cannot load {tls.cert} / {tls.key}: {exc}")
    users = settings.auth.users_file if settings.auth else None
    if users is not None and users.is_file():
        try:
            lines = users.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            problems.append(f"{settings.source}: auth.users_file: {users}: {exc.strerror}")
        else:
            from relay.receive.passwords import user_entry  # here: receive imports settings

            if not any(user_entry(line) for line in lines):
                problems.append(
                    f"{settings.source}: auth.users_file: {users} has no user:$scrypt$... line"
                    " (relay hash-password makes one; plain-text passwords are refused)"
                )
    upstream = settings.upstream
    if (upstream.password_env or upstream.password_file) and not upstream.username:
        key = "password_env" if upstream.password_env else "password_file"
        problems.append(
            f"{settings.source}: upstream.{key}: needs upstream.username (without it relay"
            " never logs in)"
        )
    return problems


def exposed_secrets(settings: Settings) -> list[str]:
    """Warnings for secret files every local user can read (password hashes to guess at
    offline, a TLS key, the original host's password); relay runs on regardless, as
    Postfix's `postfix check` warns. Empty when none is, or none is set."""
    warnings = []
    for label, file in (
        ("auth.users_file", settings.auth.users_file if settings.auth else None),
        ("tls.key", settings.tls.key if settings.tls else None),
        ("upstream.password_file", settings.upstream.password_file),
    ):
        try:
            mode = file.stat().st_mode if file is not None else 0
        except OSError:
            continue  # check_listen_env and check_secrets say so
        if file is not None and mode & 0o004:
            warnings.append(
                f"{settings.source}: {label}: {file} can be read by every user on this machine"
                f" (mode {mode & 0o777:04o}): chmod 640 and chgrp it to relay's group"
            )
    return warnings


def check_secrets(settings: Settings) -> list[str]:
    """At `relay serve`'s start only (an admin's shell may lack the unit's environment): the
    upstream password's env var set, or its file readable. Missing, every mail to the
    original host would wait for it until `retry.max_age`."""
    upstream = settings.upstream
    if not upstream.username:
        return []
    if upstream.password_env and upstream.password_env not in os.environ:
        return [
            f"{settings.source}: upstream.password_env: {upstream.password_env} is not set in"
            " relay's environment"
        ]
    if upstream.password_file:
        try:
            upstream.password_file.read_bytes()
        except OSError as exc:
            return [
                f"{settings.source}: upstream.password_file: {upstream.password_file}:"
                f" {exc.strerror}"
            ]
    return []
