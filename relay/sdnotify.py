"""systemd's notify protocol (Type=notify): READY=1, STOPPING=1, WATCHDOG=1.

A datagram to $NOTIFY_SOCKET; a no-op when not started by systemd. Written
here rather than taken from a library because it is ten lines of socket code.

The socket's queue in PID 1 is short (net.unix.max_dgram_qlen, 10 by default) and
shared by every service that notifies; while systemd is busy a send waits for room.
A send from the event loop must not wait, or SMTP waits with it: by default a state
that finds no room is dropped (a missed WATCHDOG=1 is what the watchdog is for), and
the states that must arrive (READY=1, STOPPING=1) are sent from a thread, `wait`
seconds at most.
"""

from __future__ import annotations

import asyncio
import os
import socket

STATE_WAIT = 10.0  # seconds READY=1 or STOPPING=1 may wait for room in systemd's queue


def notify(state: str, *, wait: float = 0.0) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when there is no notify socket, or
    no room in its queue within `wait` seconds (0: never block, see the module docstring)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            if wait > 0:
                sock.settimeout(wait)
            else:
                sock.setblocking(False)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


async def tell(state: str) -> bool:
    """`notify` for a state that must arrive, off the event loop (up to STATE_WAIT seconds)."""
    return await asyncio.to_thread(notify, state, wait=STATE_WAIT)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
