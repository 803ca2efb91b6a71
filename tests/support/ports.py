"""Loopback ports for servers the tests start, or for connections that must be refused."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released): for a server
    that must listen where clients already expect it (a restarted `relay serve`), or for
    a host that is down (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
