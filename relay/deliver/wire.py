"""DATA to the original host, with the mail put in its wire form by bytes methods.

aiosmtplib's `SMTP.data()` runs two regular expressions over the whole mail on
every send: one that matches every line ending (to turn a lone CR or LF into
CRLF) and one that doubles a dot at the start of a line. On 20 KB mails that was
a quarter of the delivery process's CPU (py-spy, bench/README.md 2026-12-05).
`data_bytes` gives the same bytes, checked against aiosmtplib's own functions
(tests/test_upstream_wire.py); `send_data` is `SMTP.data()` with them.
"""

from __future__ import annotations

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from relay.mail import bare_line_ends

START_INPUT = 354
COMPLETED = 250


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
    """`smtp.data()` for a mail already in its wire form (`data_bytes`): the same replies,
    errors (SMTPDataError on anything but 354, then 250) and closing on a lost connection
    or a timeout."""
    start = await smtp.execute_command(b"DATA")
    if start.code != START_INPUT:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(wire)
        reply = await protocol.read_response(timeout=smtp.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    if reply.code != COMPLETED:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply
