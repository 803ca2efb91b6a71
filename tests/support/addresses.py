"""IPv6 documentation addresses routed to `lo`, for what relay treats differently when a
peer is another machine: IPv6 clients counted by prefix, an original host elsewhere.

    ipv6_route           -> "2001:db8:5e55::/64", routed to lo (`ip -6 route add local`):
                            a listener on "::" answers every address in it, yet none is
                            an address of this machine (none can be bound without
                            IP_FREEBIND), as if each were another host
    ipv6_clients(source) -> connect(port): a connection to [::1]:port from `source`, any
                            address of the route (bound with IP_FREEBIND)

The route changes the machine's network set-up for the test and is removed after, with
`ip` (iproute2), which needs root (as CI has): the tests that use it are `system` tests.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

IPV6_ROUTE = "2001:db8:5e55::/64"
IP_FREEBIND = 15  # linux/in.h; Python's socket module does not name it

Connect = Callable[[int], socket.socket]


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@pytest.fixture
def ipv6_route() -> Iterator[str]:
    # replace, not add: a run killed before its cleanup left the route, and `add` then
    # failed every later run's tests with "File exists"
    _ip("-6", "route", "replace", "local", IPV6_ROUTE, "dev", "lo")
    try:
        yield IPV6_ROUTE
    finally:
        _ip("-6", "route", "del", "local", IPV6_ROUTE, "dev", "lo", check=False)


@pytest.fixture
def ipv6_clients(ipv6_route: str) -> Callable[[str], Connect]:
    def client(source: str) -> Connect:
        def connect(port: int) -> socket.socket:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.settimeout(5)
            sock.bind((source, 0))
            sock.connect(("::1", port))
            return sock

        return connect

    return client
