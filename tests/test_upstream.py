"""relay.deliver.upstream against the capture server of tests/support on port 0 (plain, STARTTLS,
implicit TLS)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from relay.deliver import pool, upstream
from relay.deliver.upstream import UpstreamClient, UpstreamResult
from relay.deliver.wire import send_data
from relay.errors import HostUnreachable, HostUnusable, PermanentFailure, TemporaryFailure
from relay.settings import Security, Upstream
from tests.support.capture import CaptureServer
from tests.support.mails import make_mail
from tests.support.tls import TlsFiles, server_context

StartCapture = Callable[..., Awaitable[tuple[CaptureServer, int]]]
QUEUED = "250 2.0.0 Ok: queued as CAPTURED"


@pytest.fixture
async def start_capture(tls_files: TlsFiles) -> AsyncIterator[StartCapture]:
    """Start capture servers on port 0: `await start_capture(tls="starttls", auth=True)`
    (AUTH as moodle / s3cret required)."""
    servers: list[CaptureServer] = []

    async def start(*, tls: str = "none", auth: bool = False) -> tuple[CaptureServer, int]:
        server = CaptureServer(
            accepted_reply=QUEUED,
            tls=tls,
            tls_context=server_context(tls_files),
            login=(b"moodle", b"s3cret") if auth else None,
        )
        servers.append(server)
        await asyncio.to_thread(server.start)
        return server, server.port

    yield start
    for server in servers:
        await asyncio.to_thread(server.close)


def _client(port: int, **changes: Any) -> UpstreamClient:
    fields: dict[str, Any] = {"host": "127.0.0.1", "port": port, "timeout": 5.0}
    fields.update(changes)
    return UpstreamClient(Upstream(**fields), hostname="relay.test")


@pytest.mark.parametrize(
    ("security", "verify"),
    [(Security.NONE, True), (Security.STARTTLS, False), (Security.TLS, False)],
    ids=["none", "starttls", "implicit-tls"],
)
async def test_delivers_bytes_and_envelope_unchanged(
    start_capture: StartCapture, security: Security, verify: bool
) -> None:
    """The host gets MAIL FROM, every RCPT TO and wire_bytes() exactly, over the chosen security."""
    capture, port = await start_capture(tls=security.value)
    mail = make_mail(recipients=("ada@example.net", "bob@example.net"))

    result = await _client(port, security=security, verify_tls=verify).send(mail)

    expected = UpstreamResult(accepted=mail.recipients, reply="250 2.0.0 Ok: queued as CAPTURED")
    assert expected == result
    [captured] = capture.messages
    assert (mail.sender, mail.recipients) == (captured.mail_from, captured.rcpt_tos)
    assert mail.wire_bytes() == captured.content
    assert (security is not Security.NONE) == captured.tls


@pytest.mark.parametrize("security", [Security.NONE, Security.STARTTLS], ids=["none", "starttls"])
async def test_the_first_mail_on_a_connection_declares_8bit(
    start_capture: StartCapture, security: Security
) -> None:
    """An 8-bit body to a host offering 8BITMIME goes with BODY=8BITMIME, the first mail on
    a connection too. Without AUTH relay had not said EHLO yet when it looked at the host's
    extensions (aiosmtplib says it inside login() or mail()): the first mail of every
    connection went without it, the next ones with."""
    capture, port = await start_capture(tls=security.value)
    client = _client(port, security=security, verify_tls=False)
    raw = "Subject: Grüße\r\n\r\nGrüße aus Köln\r\n".encode()
    for n in range(2):
        await client.send(make_mail(id=f"Q{n}", raw=raw))
    await client.close()
    size = f"SIZE={len(make_mail(raw=raw).wire_bytes())}"  # the capture host offers SIZE
    assert [("BODY=8BITMIME", size)] * 2 == [m.mail_options for m in capture.messages]


async def test_null_sender(start_capture: StartCapture) -> None:
    """A bounce (MAIL FROM:<>) goes upstream with the null sender intact."""
    capture, port = await start_capture()
    await _client(port).send(make_mail(sender=""))
    assert "<>" == capture.messages[0].mail_from


async def test_auth_over_starttls(
    start_capture: StartCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AUTH with the password from its env var, after STARTTLS."""
    monkeypatch.setenv("UPSTREAM_PASSWORD", "s3cret")
    capture, port = await start_capture(tls="starttls", auth=True)
    client = _client(
        port,
        security=Security.STARTTLS,
        verify_tls=False,
        username="moodle",
        password_env="UPSTREAM_PASSWORD",
    )
    await client.send(make_mail())
    assert b"moodle" == capture.messages[0].login


@pytest.mark.parametrize("password", ["wrong", None], ids=["wrong-password", "password-env-unset"])
async def test_auth_problems_are_temporary(
    start_capture: StartCapture, monkeypatch: pytest.MonkeyPatch, password: str | None
) -> None:
    """A bad or missing password defers the mail (the relay's problem, not the message's)."""
    if password is None:
        monkeypatch.delenv("UPSTREAM_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("UPSTREAM_PASSWORD", password)
    capture, port = await start_capture(tls="starttls", auth=True)
    client = _client(
        port,
        security=Security.STARTTLS,
        verify_tls=False,
        username="moodle",
        password_env="UPSTREAM_PASSWORD",
    )
    with pytest.raises(TemporaryFailure) as caught:
        await client.send(make_mail())
    assert HostUnusable is type(caught.value)  # the next mails wait (the dead-host cache)
    assert [] == capture.messages


async def test_per_recipient_replies(start_capture: StartCapture) -> None:
    """2xx, 4xx and 5xx recipients come back apart; only the accepted ones get the message."""
    capture, port = await start_capture()
    capture.refuse_rcpt("later@example.net", "450 4.2.1 Mailbox busy")
    capture.refuse_rcpt("gone@example.net", "550 5.1.1 No such user")
    mail = make_mail(recipients=("ada@example.net", "later@example.net", "gone@example.net"))

    result = await _client(port).send(mail)

    expected = UpstreamResult(
        accepted=("ada@example.net",),
        temporary=(("later@example.net", "450 4.2.1 Mailbox busy"),),
        permanent=(("gone@example.net", "550 5.1.1 No such user"),),
        reply="250 2.0.0 Ok: queued as CAPTURED",
    )
    assert expected == result
    assert ("ada@example.net",) == capture.messages[0].rcpt_tos


async def test_mixed_refusals_without_acceptance(start_capture: StartCapture) -> None:
    """4xx and 5xx refusals with nothing accepted return a result; DATA is not sent."""
    capture, port = await start_capture()
    capture.refuse_rcpt("later@example.net", "450 4.2.1 Mailbox busy")
    capture.refuse_rcpt("gone@example.net", "550 5.1.1 No such user")
    mail = make_mail(recipients=("later@example.net", "gone@example.net"))

    result = await _client(port).send(mail)

    assert () == result.accepted
    assert (("later@example.net", "450 4.2.1 Mailbox busy"),) == result.temporary
    assert (("gone@example.net", "550 5.1.1 No such user"),) == result.permanent
    assert [] == capture.messages


@pytest.mark.parametrize(
    ("rcpt", "data", "expected"),
    [
        ("450 4.2.1 Mailbox busy", "554 5.7.1 Rejected by policy", "temporary, permanent"),
        ("550 5.1.1 No such user", "451 4.3.0 Try again later", "permanent, temporary"),
        ("550 5.1.1 No such user", "554 5.7.1 Rejected by policy", "permanent, permanent"),
        ("450 4.2.1 Mailbox busy", "451 4.3.0 Try again later", "temporary, temporary"),
    ],
    ids=["rcpt-4xx-data-5xx", "rcpt-5xx-data-4xx", "both-5xx", "both-4xx"],
)
async def test_the_reply_to_data_is_for_the_recipients_accepted_at_rcpt(
    start_capture: StartCapture, rcpt: str, data: str, expected: str
) -> None:
    """RFC 5321, 3.3: a refusal at DATA is for the recipients accepted at RCPT. One refused
    at RCPT keeps its own reply: refused for now there, it is retried even when DATA got a
    5xx (it was failed for good with the others, with a DSN saying so). Refused alike, each
    keeps its own reply too: not all the first one's (a DSN gave a DATA refusal the other
    recipient's 550 5.1.1)."""
    capture, port = await start_capture()
    capture.refuse_rcpt("other@example.net", rcpt)
    capture.data_reply = data
    mail = make_mail(recipients=("ada@example.net", "other@example.net"))

    result = await _client(port).send(mail)

    kinds = {"temporary": result.temporary, "permanent": result.permanent}
    first, second = (kinds[k] for k in expected.split(", "))
    assert () == result.accepted
    assert ("other@example.net", rcpt) in first
    assert ("ada@example.net", f"{data} (at DATA)") in second
    assert 2 == len(result.temporary) + len(result.permanent)
    assert [] == capture.messages


TRANSACTION_FAILURES = [
    ("rcpt", "450 4.2.1 Mailbox busy", TemporaryFailure),
    ("rcpt", "550 5.1.1 No such user", PermanentFailure),
    ("mail", "451 4.3.0 Try again later", TemporaryFailure),
    ("mail", "553 5.7.1 Sender rejected", PermanentFailure),
    ("data", "452 4.3.1 Insufficient storage", TemporaryFailure),
    ("data", "554 5.6.0 Message rejected", PermanentFailure),
]


@pytest.mark.parametrize(
    ("stage", "reply", "expected"),
    TRANSACTION_FAILURES,
    ids=[f"{stage}-{reply[:3]}" for stage, reply, _ in TRANSACTION_FAILURES],
)
async def test_whole_transaction_failures(
    start_capture: StartCapture, stage: str, reply: str, expected: type[Exception]
) -> None:
    """4xx at MAIL/DATA or to every RCPT is temporary; 5xx there is permanent."""
    capture, port = await start_capture()
    mail = make_mail(recipients=("ada@example.net", "bob@example.net"))
    if stage == "rcpt":
        for recipient in mail.recipients:
            capture.refuse_rcpt(recipient, reply)
    else:
        setattr(capture, f"{stage}_reply", reply)

    with pytest.raises((TemporaryFailure, PermanentFailure)) as caught:
        await _client(port).send(mail)

    assert expected is type(caught.value)
    assert reply == caught.value.reply
    assert mail.id in str(caught.value)


async def test_a_421_to_one_rcpt_defers_the_mail_in_the_hosts_words(
    start_capture: StartCapture,
) -> None:
    """A 421 to the second of three RCPTs (the host closes the session, RFC 5321 3.8): every
    recipient waits, with the host's reply. The next RCPT raised "Server not connected",
    which stood in the row, the log and the DSN instead."""
    capture, port = await start_capture()
    reply = "421 4.7.0 rate limit for this recipient domain, closing"
    capture.refuse_rcpt("bob@example.net", reply)
    mail = make_mail(recipients=("ada@example.net", "bob@example.net", "cy@example.net"))
    client = _client(port)
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await client.send(mail)
    finally:
        await client.close()
    assert reply == caught.value.reply
    assert "at RCPT TO" in str(caught.value)
    assert [] == capture.messages


async def test_connection_refused_is_temporary() -> None:
    """Nothing listening is HostUnreachable, a TemporaryFailure (the loop stops trying a while)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TemporaryFailure) as caught:
        await _client(port).send(make_mail())
    assert HostUnreachable is type(caught.value)


async def test_silent_server_times_out() -> None:
    """A host that accepts the connection but never greets is a TemporaryFailure on time."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TemporaryFailure):
            await _client(port, timeout=0.3).send(make_mail())
        assert loop.time() - started < 2.0
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "security", [Security.STARTTLS, Security.TLS], ids=["starttls", "implicit-tls"]
)
async def test_certificate_verified_by_default(
    start_capture: StartCapture, security: Security
) -> None:
    """verify_tls (the default) refuses a self-signed certificate: temporary, nothing sent."""
    capture, port = await start_capture(tls=security.value)
    with pytest.raises(TemporaryFailure) as caught:
        await _client(port, security=security).send(make_mail())
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert [] == capture.messages


async def test_starttls_required_but_not_offered(start_capture: StartCapture) -> None:
    """security: starttls never falls back to plain text."""
    capture, port = await start_capture(tls="none")
    with pytest.raises(TemporaryFailure) as caught:
        await _client(port, security=Security.STARTTLS).send(make_mail())
    assert "STARTTLS" in caught.value.reply
    assert [] == capture.messages


async def test_connection_is_reused_between_mails(start_capture: StartCapture) -> None:
    """Three mails in a row go over one connection, each delivered in full."""
    capture, port = await start_capture()
    client = _client(port)
    mails = [make_mail(recipients=(f"r{i}@example.net",)) for i in range(3)]
    try:
        for mail in mails:
            assert (await client.send(mail)).accepted == mail.recipients
    finally:
        await client.close()
    assert len(capture.sessions) == 1
    assert [m.rcpt_tos for m in capture.messages] == [m.recipients for m in mails]
    assert [m.content for m in capture.messages] == [m.wire_bytes() for m in mails]


async def test_a_host_limiting_connections_gets_every_mail_over_those_it_takes(
    start_capture: StartCapture,
) -> None:
    """A host that takes 3 connections from one client and greets the next with 421 (Postfix's
    smtpd_client_connection_count_limit): sixteen sends at once all go out over 3 connections,
    none fails. Each 421 was an unreachable host: that mail deferred to the next step of
    the schedule, and the deliver loop paused the host for every other mail as well."""
    capture, port = await start_capture()
    capture.max_connections = 3
    client = _client(port)
    mails = [make_mail(id=f"Q{i}", recipients=(f"r{i}@example.net",)) for i in range(16)]
    try:
        results = await asyncio.gather(*(client.send(mail) for mail in mails))
        more = await client.send(make_mail(id="Q16"))  # the cap holds: no new greeting
    finally:
        await client.close()
    assert [m.recipients for m in mails] == [r.accepted for r in results]
    assert ("ada@example.net",) == more.accepted
    assert 17 == len(capture.messages)
    assert 3 == capture.most_connections
    assert 1 <= capture.busy_greetings <= 13, capture.busy_greetings  # at most once each


async def test_a_busy_greeting_with_no_connection_open_is_an_unreachable_host(
    start_capture: StartCapture,
) -> None:
    """A 421 greeting to each of three connects at once, while relay has no connection to
    the host: the host is down (the deliver loop's dead-host pause), not at its connection
    limit, and said so at once. Each connect waited for the others' answer until the
    timeout, holding every delivery slot for it."""
    capture, port = await start_capture()
    capture.max_connections = 0
    client = _client(port)
    started = time.monotonic()
    try:
        results = await asyncio.gather(
            *(client.send(make_mail(id=f"Q{n}")) for n in range(3)), return_exceptions=True
        )
    finally:
        await client.close()
    took = time.monotonic() - started
    assert [HostUnreachable] * 3 == [type(r) for r in results], results
    assert all(
        str(r).endswith("421 4.7.0 relay.test Error: too many connections from 127.0.0.1")
        for r in results
    )
    assert took < 1.0, took


async def test_waiting_for_a_connection_under_the_cap_ends_at_the_timeout(
    start_capture: StartCapture,
) -> None:
    """Every connection the host takes stays busy: a mail waiting for one is deferred after
    `upstream.timeout` (4.4.5 in relay's words), not held without end."""
    capture, port = await start_capture()
    capture.max_connections = 1
    client = _client(port, timeout=0.5)
    hold = asyncio.Event()

    async def slow(smtp: Any, data: bytes) -> Any:
        await hold.wait()
        return await send_data(smtp, data)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(upstream, "send_data", slow)
            first = asyncio.ensure_future(client.send(make_mail(id="Q1")))
            await asyncio.sleep(0.2)  # Q1 holds the one connection
            with pytest.raises(TemporaryFailure) as caught:
                await client.send(make_mail(id="Q2"))
            hold.set()
            assert ("ada@example.net",) == (await first).accepted
    finally:
        await client.close()
    assert caught.value.reply.startswith("4.4.5 upstream 127.0.0.1:"), caught.value.reply
    assert not isinstance(caught.value, HostUnreachable)


async def test_reuse_keeps_tls_and_auth(start_capture: StartCapture) -> None:
    capture, port = await start_capture(tls="starttls", auth=True)
    client = _client(
        port,
        security=Security.STARTTLS,
        verify_tls=False,
        username="moodle",
        password_env="RELAY_TEST_UPSTREAM_PASSWORD",
    )
    os.environ["RELAY_TEST_UPSTREAM_PASSWORD"] = "s3cret"
    try:
        for _ in range(2):
            await client.send(make_mail())
    finally:
        await client.close()
        del os.environ["RELAY_TEST_UPSTREAM_PASSWORD"]
    assert len(capture.sessions) == 1
    assert [(m.tls, m.login) for m in capture.messages] == [(True, b"moodle")] * 2


@pytest.mark.parametrize("how", ["closed", "421"])
async def test_host_dropping_an_idle_connection_costs_nothing(
    start_capture: StartCapture, how: str
) -> None:
    """The host closes (or 421s) the idle connection: the next mail goes on a fresh one."""
    capture, port = await start_capture()
    client = _client(port)
    try:
        await client.send(make_mail())
        if how == "closed":
            capture.drop_connections()
            await asyncio.sleep(0.05)
        else:
            capture.mail_reply = "421 4.4.2 idle too long, closing"
            first = capture.sessions[0]
            original = first.event_handler

            class Closing:  # only the first (idle) session says 421; the next is normal
                def __getattr__(self, name: str) -> Any:
                    return getattr(original, name)

                async def handle_MAIL(self, server: SMTP, *args: Any) -> str:
                    capture.mail_reply = None
                    return "421 4.4.2 idle too long, closing"

            first._handle_hooks["MAIL"] = Closing().handle_MAIL
        result = await client.send(make_mail(recipients=("second@example.net",)))
    finally:
        await client.close()
    assert result.accepted == ("second@example.net",)
    assert len(capture.sessions) == 2
    assert [m.rcpt_tos[0] for m in capture.messages][-1] == "second@example.net"


async def test_idle_connections_are_closed_after_a_while(
    start_capture: StartCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "REUSE_IDLE", 0.1)
    capture, port = await start_capture()
    client = _client(port)
    try:
        await client.send(make_mail())
        await asyncio.sleep(0.4)
        assert capture.sessions[0].transport is None  # QUIT was sent, the session ended
        await client.send(make_mail())
    finally:
        await client.close()
    assert len(capture.sessions) == 2


async def test_a_connection_carries_at_most_reuse_limit_mails(
    start_capture: StartCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "REUSE_LIMIT", 2)
    capture, port = await start_capture()
    client = _client(port)
    try:
        for _ in range(5):
            await client.send(make_mail())
    finally:
        await client.close()
    assert len(capture.sessions) == 3
    assert len(capture.messages) == 5


async def test_a_failed_transaction_is_not_reused(start_capture: StartCapture) -> None:
    capture, port = await start_capture()
    client = _client(port)
    try:
        capture.data_reply = "451 4.3.0 try later"
        with pytest.raises(TemporaryFailure):
            await client.send(make_mail())
        capture.data_reply = None
        await client.send(make_mail())
    finally:
        await client.close()
    assert len(capture.sessions) == 2


async def test_close_quits_idle_connections(start_capture: StartCapture) -> None:
    capture, port = await start_capture()
    client = _client(port)
    await client.send(make_mail())
    await client.close()
    await asyncio.sleep(0.05)
    assert capture.sessions[0].transport is None
