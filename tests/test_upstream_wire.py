"""relay.deliver.wire: the mail in DATA's wire form, byte for byte what aiosmtplib's own
`SMTP.data()` would send, and a real host receiving it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.deliver.upstream import UpstreamClient, UpstreamResult
from relay.deliver.wire import data_bytes
from relay.errors import PermanentFailure, TemporaryFailure
from relay.mail import Mail
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


class SlowHost:
    """Just enough SMTP: DATA is read `per_read` bytes at a time, `pause` seconds apart,
    with a pause of 1.5 s after `stall` bytes; the copies it took (whole, with the final dot)
    counted."""

    def __init__(self, *, per_read: int, pause: float, stall: int | None = None) -> None:
        self.per_read, self.pause, self.stall = per_read, pause, stall
        self.copies = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 host.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    if not await self._data(reader):
                        return  # the client went before its dot: nothing taken
                    self.copies += 1
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"250 host.test\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _data(self, reader: asyncio.StreamReader) -> bool:
        got = b""
        while not got.endswith(b"\r\n.\r\n"):
            if self.stall is not None and len(got) >= self.stall:
                self.stall = None
                await asyncio.sleep(1.5)  # reads nothing for a while (a scan, a pause)
            chunk = await reader.read(self.per_read)
            if not chunk:
                return False
            got += chunk
            await asyncio.sleep(self.pause)
        return True


async def send_once(port: int, raw: bytes, upstream_timeout: float) -> str:
    """One try of the real UpstreamClient: what came of it."""
    upstream = Upstream(host="127.0.0.1", port=port, timeout=upstream_timeout)
    client = UpstreamClient(upstream, hostname="relay.test")
    try:
        answer = await client.send(make_mail(raw=raw))
        return f"sent: {answer.reply}"
    except TemporaryFailure as exc:
        return f"deferred: {exc.reply}"
    finally:
        await client.close()


BIG = b"Subject: big\r\n\r\n" + (b"A" * 76 + b"\r\n") * 40_000  # 3.1 MB


async def test_a_mail_that_takes_longer_than_the_timeout_to_go_out_goes_once() -> None:
    """A 3.1 MB mail to a host that reads it in about 2 s, `timeout` 0.5 s: it goes out,
    each piece within the timeout, and the reply after the dot has Postfix's 600 s. One
    window of `timeout` for all of it expired while the bytes still went out, and closing
    sent the dot anyway: the host took the mail, relay deferred it, and every retry sent
    another copy (about 120 over max_age)."""
    host = SlowHost(per_read=256 * 1024, pause=0.15)
    server = await asyncio.start_server(host.session, "127.0.0.1", 0)
    try:
        outcome = await send_once(server.sockets[0].getsockname()[1], BIG, upstream_timeout=0.5)
    finally:
        server.close()
    assert ("sent: 250 2.0.0 Ok: queued", 1) == (outcome, host.copies)


async def test_a_host_that_stops_reading_mid_mail_never_gets_the_dot() -> None:
    """The host stops reading after 1 MB for 1.5 s: after `timeout` (0.5 s) of no progress
    the connection is dropped before the final dot, so the host has no mail when it reads
    on, and the retry is the only copy. Closed instead, the rest went out once the host read
    again, dot and all: the host took the mail that relay deferred and would send again."""
    host = SlowHost(per_read=256 * 1024, pause=0.0, stall=1 << 20)
    server = await asyncio.start_server(host.session, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        outcome = await send_once(port, BIG * 4, upstream_timeout=0.5)  # past socket buffers
        await asyncio.sleep(2.0)  # the host reads again
    finally:
        server.close()
    assert (True, 0) == (outcome.startswith("deferred:"), host.copies), outcome


class ScriptedHost:
    """A host whose replies are given: `ehlo` (its last line, after "250-host.test"), one
    for MAIL, one per RCPT (in order), one after the dot. What it was sent is kept."""

    def __init__(self, *, ehlo: str, mail: str, rcpt: list[str], dot: str) -> None:
        self.ehlo, self.mail, self.rcpt, self.dot = ehlo, mail, list(rcpt), dot
        self.lines: list[bytes] = []
        self.copies = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 host.test ESMTP\r\n")
        rcpts = iter(self.rcpt)
        try:
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":  # a refusal as it is; else host name, then `ehlo`
                    reply = self.ehlo if self.ehlo[:1] in "45" else f"250-host.test\r\n{self.ehlo}"
                elif verb == b"MAIL":
                    reply = self.mail
                elif verb == b"RCPT":
                    reply = next(rcpts)
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    self.copies += 1
                    reply = self.dot
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    reply = "250 2.0.0 Ok"
                writer.write(f"{reply}\r\n".encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def one_try(
    session: Session, mail: Mail, *, wait: float = 5.0
) -> UpstreamResult | TemporaryFailure | PermanentFailure:
    """One try of the real UpstreamClient (`upstream.timeout`: `wait`) against a host serving
    `session`: its answer, or the failure it raised."""
    server = await asyncio.start_server(session, "127.0.0.1", 0)
    upstream = Upstream(host="127.0.0.1", port=server.sockets[0].getsockname()[1], timeout=wait)
    client = UpstreamClient(upstream, hostname="relay.test")
    try:
        return await client.send(mail)
    except (TemporaryFailure, PermanentFailure) as exc:
        return exc
    finally:
        await client.close()
        server.close()


async def send_scripted(host: ScriptedHost, recipients: tuple[str, ...], raw: bytes) -> str:
    """One try of the real UpstreamClient against `host`: what came of it."""
    answer = await one_try(host.session, make_mail(raw=raw, recipients=recipients))
    if isinstance(answer, UpstreamResult):
        return f"sent to {','.join(answer.accepted)}: {answer.reply}"
    return f"{type(answer).__name__}: {answer}"


TWO = ("a@x.org", "b@x.org")
SCRIPTS = {
    # A 251 after the dot counted as a failure: the mail deferred, sent again at every try
    # (9 copies in a test with max_age 6 s), then a false "Undelivered" DSN to the sender.
    "251-after-the-dot": (
        dict(ehlo="250 8BITMIME", mail="250 2.1.0 Ok", rcpt=["250 Ok"] * 2, dot="251 2.0.0 X"),
        "sent to a@x.org,b@x.org: 251 2.0.0 X",
    ),
    # 252 (cannot verify, will try) to a RCPT was a temporary refusal of that recipient.
    "252-to-a-rcpt": (
        dict(ehlo="250 8BITMIME", mail="250 2.1.0 Ok", rcpt=["252 Ok", "250 Ok"], dot="250 Ok"),
        "sent to a@x.org,b@x.org: 250 Ok",
    ),
    # A malformed reply at RCPT was reported as refused "at MAIL FROM".
    "malformed-at-rcpt": (
        dict(ehlo="250 8BITMIME", mail="250 2.1.0 Ok", rcpt=["hello there"], dot="250 Ok"),
        "TemporaryFailure: upstream 127.0.0.1:{port} refused {id} at RCPT TO:",
    ),
}


@pytest.mark.parametrize(("script", "expected"), SCRIPTS.values(), ids=SCRIPTS.keys())
async def test_what_a_host_answers_is_read_as_rfc_5321_says(
    script: dict[str, str], expected: str
) -> None:
    """Any 2xx is an acceptance, as RFC 5321 4.2.1 reads a reply by its first digit (and
    Postfix's smtp client does): after the dot, to a RCPT. A refusal names the command the
    host refused. One copy reached the host each time."""
    host = ScriptedHost(**script)
    outcome = await send_scripted(host, TWO, b"Subject: x\r\n\r\nbody\r\n")
    head = expected.split("{port}")[0]
    assert outcome.startswith(head), outcome
    if "{id}" in expected:
        assert " at RCPT TO: " in outcome, outcome
    assert (1 if outcome.startswith("sent") else 0) == host.copies


async def test_a_mail_over_the_hosts_size_is_refused_before_it_goes_out() -> None:
    """The host offers SIZE 1000 (RFC 1870) and the mail is 5 KB: a dead letter with 552
    5.3.4 before MAIL, not 5 KB uploaded for a 552 after the dot (10 MB each time, for
    mail over the limit of an original host). Under its SIZE, MAIL says SIZE=."""
    raw = b"Subject: x\r\n\r\n" + b"x" * 5000 + b"\r\n"
    small = ScriptedHost(ehlo="250 SIZE 1000", mail="250 Ok", rcpt=["250 Ok"], dot="250 Ok")
    outcome = await send_scripted(small, ("a@x.org",), raw)
    size = len(make_mail(raw=raw).wire_bytes())  # with relay's Received: line
    assert outcome.startswith("PermanentFailure: "), outcome
    assert f"5.3.4 message size {size} exceeds size limit 1000 of upstream 127.0.0.1:" in outcome
    assert not any(line.startswith(b"MAIL") for line in small.lines)
    roomy = ScriptedHost(ehlo="250 SIZE 100000", mail="250 Ok", rcpt=["250 Ok"], dot="250 Ok")
    assert "sent to a@x.org: 250 Ok" == await send_scripted(roomy, ("a@x.org",), raw)
    [mail_from] = [line for line in roomy.lines if line.startswith(b"MAIL")]
    assert mail_from.rstrip().endswith(b" SIZE=%d" % size), mail_from


async def test_utf8_addresses_to_a_host_without_smtputf8_fail_as_5_6_7() -> None:
    """RFC 6531's status (Postfix's too) and relay's words: not 4.4.7, "delivery time
    expired", which a permanent failure with no status in its words got."""
    host = ScriptedHost(ehlo="250 8BITMIME", mail="250 Ok", rcpt=["250 Ok"], dot="250 Ok")
    refused = await one_try(host.session, make_mail(recipients=("jörg@x.org",)))
    assert isinstance(refused, PermanentFailure)
    assert "5.6.7" == refused.status
    assert refused.reply.startswith("5.6.7 SMTPUTF8 is required, but was not offered by ")
    assert not any(line.startswith(b"MAIL") for line in host.lines)


async def test_a_host_that_refuses_ehlo_gets_helo() -> None:
    """A host without ESMTP (behind a Cisco PIX/ASA's SMTP fixup EHLO reads as garbage and
    gets 500/502): HELO, as RFC 5321 3.2 says and Postfix and PHPMailer do. Every mail was
    deferred on the 502, then bounced after `retry.max_age`."""
    host = ScriptedHost(
        ehlo="502 5.5.1 EHLO not implemented", mail="250 Ok", rcpt=["250 Ok"], dot="250 Ok"
    )
    assert "sent to a@x.org: 250 Ok" == await send_scripted(
        host, ("a@x.org",), b"Subject: x\r\n\r\nx\r\n"
    )
    verbs = [line.split()[0] for line in host.lines if line.strip()]
    assert [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA"] == verbs[:5]


async def test_a_hosts_reply_is_kept_to_1000_characters() -> None:
    """A 4xx of 30 KiB to each of 50 recipients went onto the row, its history and the log at
    every try: 1.7 MB of spool a try, the disk Moodle's mail is accepted on. Postfix keeps
    2,048 bytes of a reply."""
    huge = "450-4.2.0 " + "x" * 990 + "\r\n"
    reply = huge * 30 + "450 4.2.0 try later"
    host = ScriptedHost(ehlo="250 8BITMIME", mail="250 Ok", rcpt=[reply], dot="250 Ok")
    refused = await one_try(host.session, make_mail(recipients=("a@x.org",)))
    assert isinstance(refused, TemporaryFailure)
    assert 1000 == len(refused.reply.removeprefix("450 "))  # the text, after the code
    assert refused.reply.startswith("450 4.2.0 xxx") and refused.reply.endswith("...")


async def test_a_host_that_does_not_answer_a_command_is_named_with_the_command() -> None:
    """The host never answers RCPT TO: the reply recorded (the DSN's, the log's) says which
    command timed out, in Postfix's words and with its 4.4.2; it read
    "SMTPReadTimeoutError('Timed out waiting for server response')"."""

    async def silent_at_rcpt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 host.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                if line.upper().startswith(b"RCPT"):
                    await reader.read()  # no answer: until relay gives up and closes
                    break
                ehlo = line[:4].upper() == b"EHLO"
                writer.write(b"250-host.test\r\n250 8BITMIME\r\n" if ehlo else b"250 Ok\r\n")
        finally:
            writer.close()

    failed = await one_try(silent_at_rcpt, make_mail(recipients=("a@x.org",)), wait=0.5)
    assert isinstance(failed, TemporaryFailure)
    assert "4.4.2" == failed.status
    assert re.fullmatch(
        r"4\.4\.2 conversation with upstream 127\.0\.0\.1:\d+ timed out while sending RCPT TO",
        failed.reply,
    )
