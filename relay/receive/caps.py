"""Session caps: how many SMTP sessions relay holds at once, in all and per client.

    listener --accept--> Session.connection_made --Caps.admit--> 220 ... or 421 4.7.0 and close

Every session holds a file descriptor. Without a cap, a client that opens
connections and idles takes all of them: then accept() fails for everyone,
Moodle included, and /healthz stops answering (the metrics listener needs a
descriptor too). So `limits.max_sessions` stays below the process's open-file
limit by `RESERVED_FILES`, which `open_file_limit` checks at start, and
`limits.max_sessions_per_ip` (Postfix's smtpd_client_connection_count_limit)
keeps one client from taking the whole budget.

A cap alone would still lock Moodle out: a flood that fills it keeps every new
client away for as long as it idles. So at a cap, a new connection first
evicts the session of that scope (all sessions, or that client's) furthest past
one of these: silent for EVICT_IDLE seconds (EVICT_BUSY_IDLE in a mail
transaction), or no mail accepted for EVICT_BARREN seconds since it connected or
since its last one. A session in a transaction is never barren before its transaction
has lasted EVICT_BUSY_BARREN: a mail being sent, or a kept-alive Moodle session's next
mail 30 s after its last, must not be cut off (Moodle does not send it again). Only when
none qualifies is the newcomer refused. One that
holds connections open and says nothing loses them to whoever comes next, and so
does one that talks without ever sending a mail (EHLO every half second kept a
session for the whole session_timeout; on a loopback listen, where every client
is 127.0.0.1, 50 such sessions kept Moodle out).

An IPv6 client is counted by its /84 (`client_of`), as Postfix 3.8 does by default
(smtpd_client_ipv6_prefix_length): one host is usually handed at least a /64, so
counting each address would give it 2**64 "clients". The AUTH guess counts use the
same key.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
from enum import StrEnum
from typing import Any

from aiosmtpd.smtp import Session as SmtpSession

log = logging.getLogger("relay.receive")

# Descriptors the main process needs besides its SMTP sessions: listeners, the spool
# (database, WAL, shared memory), the delivery process's pipes, epoll, logging,
# metrics connections (at most relay.metrics.http.MAX_CONNECTIONS), DATA spill files being read.
RESERVED_FILES = 100
# DATA spill files open at once, at least (each a descriptor beyond its session's): the
# open-file limit must leave them too. Past what it leaves, a body that would spill gets
# 452 (relay.receive.data.Body.spill): hoarders took every descriptor, and accept() failed.
MIN_SPILL_FILES = 32

EVICT_IDLE = 1.0  # seconds of silence before an idle session may make room for a new one
EVICT_BUSY_IDLE = 30.0  # the same, for a session in a transaction (MAIL given)
EVICT_BARREN = 30.0  # seconds since it connected or last had a mail accepted: the same
EVICT_BUSY_BARREN = 300.0  # the same, in a transaction, counted from its MAIL

IPV6_PREFIX = 84  # bits of an IPv6 address that name one client (Postfix's default)

TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_YOU = "421 4.7.0 Too many connections from {peer}, try again later"


class Refusal(StrEnum):
    """Why a limit refused or closed a session: the `reason` label of the metric."""

    MAX_SESSIONS = "max_sessions"
    MAX_SESSIONS_PER_IP = "max_sessions_per_ip"
    AUTH_FAILURES = "auth_failures"
    JUNK_COMMANDS = "junk_commands"
    EVICTED = "evicted"
    IDLE_TIMEOUT = "idle_timeout"
    SESSION_TIMEOUT = "session_timeout"


class Caps:
    """Open sessions counted in all and by client address; one per listener set."""

    def __init__(self, *, max_sessions: int, max_per_ip: int) -> None:
        self.max_sessions = max_sessions
        self.max_per_ip = max_per_ip
        self.total = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, client: str) -> str | None:
        """Count a new session from `client` (`client_of` its address); the 421 reply
        instead when a cap is reached."""
        if self.total >= self.max_sessions:
            return TOO_MANY_SESSIONS
        held = self.by_ip.get(client, 0)
        if held >= self.max_per_ip:
            return TOO_MANY_FROM_YOU.format(peer=client)
        self.total += 1
        self.by_ip[client] = held + 1
        return None

    def full_for(self, client: str) -> bool:
        """`client` holds max_per_ip sessions: no room for it whatever others close."""
        return self.by_ip.get(client, 0) >= self.max_per_ip

    def release(self, client: str) -> None:
        """The session `admit` counted has ended."""
        self.total -= 1
        held = self.by_ip.pop(client, 1) - 1
        if held > 0:
            self.by_ip[client] = held


def client_of(address: str) -> str:
    """The client a peer address counts as: an IPv4 address itself (also when mapped into
    IPv6), an IPv6 address its /IPV6_PREFIX network; anything else (a Unix socket's
    name) as it is."""
    if ":" not in address:  # IPv4 (or a name) as the socket gives it: nothing to parse
        return address
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # no zone: fe80::1%eth0
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; returns (soft, hard) after that.

    Only calls setrlimit when there is something to raise: relay.service's
    SystemCallFilter=~@resources would kill the process for trying, and under
    systemd LimitNOFILE= sets both limits alike.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. hard is "unlimited" beyond nr_open
            log.warning("event=open_files_not_raised soft=%d hard=%d error=%r", soft, hard, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def sessions_problem(max_sessions: int, soft: int) -> str | None:
    """Why `max_sessions` cannot fit under an open-file limit of `soft`; None when it fits."""
    reserved = RESERVED_FILES + MIN_SPILL_FILES
    needed = max_sessions + reserved
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (
        f"limits.max_sessions {max_sessions} needs {needed} open files ({reserved} "
        f"reserved) but the open-file limit is {soft}: lower limits.max_sessions to at most "
        f"{max(soft - reserved, 0)} or raise the limit (LimitNOFILE= in relay.service, "
        "ulimit -n, docker run --ulimit nofile=...)"
    )


def peer_ip_of(session: SmtpSession) -> str:
    """The client address of a session, as logs and traces name it (the caps count it as
    `client_of` this)."""
    return address_of(session.peer)


def address_of(peer: Any) -> str:
    """The address of a transport's peername: (host, port, ...) or a Unix socket's name."""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)
