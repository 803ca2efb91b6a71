"""relay.deliver.wire: the mail in DATA's wire form, byte for byte what aiosmtplib's own
`SMTP.data()` would send, and a real host receiving it."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.deliver.upstream import UpstreamClient
from relay.deliver.wire import data_bytes
from relay.settings import Upstream
from tests.support.capture import CaptureServer
from tests.support.mails import make_mail


def aiosmtplib_data(message: bytes) -> bytes:
    """What aiosmtplib 5's `SMTPProtocol.execute_data_command` writes after DATA's 354."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


# Mails made of the pieces that matter to the encoding: line endings of every kind, dots
# at the start, middle and end of lines, and ordinary text.
PIECES = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"\r\n.", b".\r\n", b" "])
MAILS = st.lists(PIECES, max_size=40).map(b"".join)


@given(MAILS)
def test_same_bytes_as_aiosmtplib(message: bytes) -> None:
    assert aiosmtplib_data(message) == data_bytes(message)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b".",
        b"Subject: a\r\n\r\n.\r\n",
        b"Subject: a\r\n\r\n..two\r\n.one\r\nend",
        b"bare\nline feeds\n.and a dot\n",
        b"bare\rreturns\r.dot\r\n",
        b"\r\n\r\n.\r\n.\r\n",
    ],
    ids=["empty", "dot", "dot-line", "dots-no-final-crlf", "bare-lf", "bare-cr", "blank-lines"],
)
def test_same_bytes_as_aiosmtplib_examples(message: bytes) -> None:
    assert aiosmtplib_data(message) == data_bytes(message)


async def test_a_host_receives_dot_lines_unchanged() -> None:
    """Over a real connection, lines that start with dots (the final "." of a mail
    included) arrive as they were: the host takes one dot off each doubled one."""
    raw = b"Subject: dots\r\n\r\n.\r\n..two\r\n.one\r\n. \r\nlast\r\n"
    mail = make_mail(raw=raw)
    capture = CaptureServer(accepted_reply="250 2.0.0 Ok")
    await asyncio.to_thread(capture.start)
    try:
        client = UpstreamClient(
            Upstream(host="127.0.0.1", port=capture.port, timeout=5.0), hostname="relay.test"
        )
        await client.send(mail)
        await client.close()
    finally:
        await asyncio.to_thread(capture.close)
    [captured] = capture.messages
    assert mail.wire_bytes() == captured.content
