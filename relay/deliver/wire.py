"""DATA to the original host, with the mail put in its wire form by bytes methods.

aiosmtplib's `SMTP.data()` runs two regular expressions over the whole mail on
every send: one that matches every line ending (to turn a lone CR or LF into
CRLF) and one that doubles a dot at the start of a line. On 20 KB mails that was
a quarter of the delivery process's CPU (py-spy, bench/README.md 2026-12-05).
`data_bytes` gives the same bytes, checked against aiosmtplib's own functions
(tests/test_upstream_wire.py); `send_data` is `SMTP.data()` with them.
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from relay.mail import bare_line_ends

START_INPUT = 354
END = b".\r\n"  # the line that ends DATA (data_bytes puts it last)
CHUNK = 64 * 1024  # bytes written at a time, each within `upstream.timeout`
DATA_DONE = 600.0  # seconds for the reply after the dot (Postfix's smtp_data_done_timeout)


def data_bytes(message: bytes) -> bytes:
    """What aiosmtplib's DATA sends for `message`: lone CR or LF made CRLF, a CRLF at the
    end, a dot doubled at the start of every line, then the ending ".\\r\\n"."""
    if bare_line_ends(message):
        message = normalize_message_line_endings(message)  # a bare CR or LF: rare
    elif not message.endswith(b"\r\n"):
        message += b"\r\n"
    # Every line ending is CRLF now, so a line starts after "\n" (or at the very start).
    stuffed = message.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def send_data(smtp: aiosmtplib.SMTP, wire: bytes) -> aiosmtplib.SMTPResponse:
    """`smtp.data()` for a mail already in its wire form (`data_bytes`): the same replies
    and errors (SMTPDataError on anything but 354, then 2xx), with Postfix's two timers.

    The mail goes out CHUNK bytes at a time, each within `smtp.timeout` (a stalled write:
    Postfix's smtp_data_xfer_timeout); the final dot only after the rest, and its reply has
    DATA_DONE seconds (smtp_data_done_timeout). One window of `timeout` for all of it
    expired on a big mail or a slow link while the bytes still went out, and close() then
    sent the dot: the host took the mail, relay deferred it and sent it again at every try.
    A timer that fires before the dot has left aborts the connection: the dot never goes,
    the host drops the mail, and the retry is its only copy."""
    start = await smtp.execute_command(b"DATA")
    if start.code != START_INPUT:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = smtp.protocol
    if protocol is None or protocol.transport is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    transport = cast(asyncio.WriteTransport, protocol.transport)  # uvloop's: not a subclass
    body = wire[: -len(END)]  # END goes once the rest is out
    try:
        for at in range(0, len(body), CHUNK):
            protocol.write(body[at : at + CHUNK])
            # aiosmtplib's flow control (pause_writing): returns once the host reads on
            async with asyncio.timeout(smtp.timeout):
                await protocol._drain_helper()
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError, TimeoutError) as exc:
        transport.abort()  # the dot must not follow what is still buffered
        smtp.close()
        if isinstance(exc, TimeoutError):
            raise aiosmtplib.SMTPTimeoutError("the host stopped reading the mail") from exc
        raise aiosmtplib.SMTPServerDisconnected("Connection lost in DATA") from exc
    try:
        protocol.write(END)
        reply = await protocol.read_response(timeout=max(smtp.timeout or 0.0, DATA_DONE))
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    if reply.code // 100 != 2:  # any 2xx: the host took the mail (RFC 5321 4.2.1, Postfix)
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply
