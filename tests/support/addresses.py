"""Addresses on `lo` that are not loopback addresses, for what relay treats differently
when a peer is another machine: an original host that is not this one, IPv6 clients.

    remote_address       -> "192.0.2.25", added to lo (a server can listen on it)
    ipv6_clients(source) -> connect(port): a connection to [::1]:port from `source`, any
                            address of IPV6_CLIENTS (routed to lo, bound with IP_FREEBIND)

Both change the machine's network set-up for the test and undo it after, with `ip`
(iproute2), which needs root (as CI has): the tests that use them are `system` tests.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

REMOTE = "192.0.2.25"  # TEST-NET-1: not loopback to relay, yet this machine
IPV6_CLIENTS = "2001:db8:5e55::/64"  # documentation addresses
IP_FREEBIND = 15  # linux/in.h; Python's socket module does not name it

Connect = Callable[[int], socket.socket]


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@pytest.fixture
def remote_address() -> Iterator[str]:
    _ip("addr", "add", f"{REMOTE}/32", "dev", "lo")
    try:
        yield REMOTE
    finally:
        _ip("addr", "del", f"{REMOTE}/32", "dev", "lo", check=False)


@pytest.fixture
def ipv6_clients() -> Iterator[Callable[[str], Connect]]:
    _ip("-6", "route", "add", "local", IPV6_CLIENTS, "dev", "lo")

    def client(source: str) -> Connect:
        def connect(port: int) -> socket.socket:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.settimeout(5)
            sock.bind((source, 0))
            sock.connect(("::1", port))
            return sock

        return connect

    try:
        yield client
    finally:
        _ip("-6", "route", "del", "local", IPV6_CLIENTS, "dev", "lo", check=False)
