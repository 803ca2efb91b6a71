"""Fuzz of the receive path: arbitrary SMTP conversations against the relay over a real socket.

The relay (`service.serve`, no background tasks) runs on its own thread and event
loop for the whole module, once without and once with AUTH; Hypothesis writes
conversations to it: well-formed transactions with hostile addresses, options
and DATA bytes, interleaved with arbitrary command lines and raw bytes, all
pipelined, then a fixed tail that ends any DATA or AUTH exchange and QUITs.

What must hold (DESIGN 3.4, STYLE 5): no reply is aiosmtpd's generic handler
failure ("500 Error: (...)") or relay's INTERNAL_ERROR; no ERROR is logged by
relay, aiosmtpd or asyncio; the session ends after QUIT; every "queued as ID" is
a spool row holding exactly that transaction's bytes; the service keeps running
and a normal mail still goes through afterwards. The classifier's own properties
are in test_rules_properties.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import smtplib
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import service
from relay import settings as settings_mod
from relay.receive import guesses
from relay.receive.handler import INTERNAL_ERROR
from relay.receive.passwords import hash_password
from relay.spool import open_existing

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_SIZE = 2048  # relay.yaml limits.max_message_size: small, so 552 is reached
MAX_RCPTS = 3
USER, PASSWORD = "moodle", "fuzz-secret"
TAIL = b"\r\n.\r\n*\r\n*\r\nRSET\r\nQUIT\r\n"  # ends DATA, cancels AUTH, then leaves
_QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\w+)$")


class Errors(logging.Handler):
    """Collects ERROR records of relay, aiosmtpd (mail.log) and asyncio."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in {"relay", "mail", "asyncio"}:
            self.records.append(record)


@dataclass
class Server:
    """`service.serve()` on a thread with its own loop; `port` once listening."""

    settings: settings_mod.Settings
    port: int = 0
    errors: Errors = field(default_factory=Errors)
    replies: Counter[str] = field(default_factory=Counter)  # reply codes seen while fuzzing
    examples: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-relay", daemon=True)
        self.crashed: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()

            def ready(ctx: service.Context) -> None:
                self.port = ctx.port
                self._ready.set()

            await service.serve(
                self.settings, background=[], stop=self._stop, ready=ready, drain=1.0
            )

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # reported by `alive`
            self.crashed = exc
        finally:
            self._ready.set()
            self._loop.close()

    def __enter__(self) -> Server:
        logging.getLogger().addHandler(self.errors)
        self._thread.start()
        assert self._ready.wait(15) and self.port, f"relay did not start: {self.crashed!r}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        logging.getLogger().removeHandler(self.errors)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.crashed is None


def make_server(directory: Path, *, auth: bool) -> Server:
    config: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "spool": "spool",
        "hostname": "relay.test",
        "metrics": None,
        "upstream": {"host": "127.0.0.1", "port": 9},
        "limits": {"max_message_size": MAX_SIZE, "max_recipients": MAX_RCPTS},
    }
    if auth:
        users = directory / "users"
        users.write_text(f"{USER}:{hash_password(PASSWORD, n=16)}\n", encoding="utf-8")
        config["auth"] = {"users_file": "users"}
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return Server(settings_mod.load(path))


@pytest.fixture(scope="module", params=["open", "auth"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The relay under fuzz, without and with AUTH (loopback: AUTH allowed without TLS).

    Without the delay before 535: the fuzz's hundreds of failures from one address would
    earn the per-address delay (up to 10 s, tests/reliability/test_hostile.py)."""
    with (
        pytest.MonkeyPatch.context() as patch,
        make_server(
            tmp_path_factory.mktemp(f"fuzz-{request.param}"), auth=request.param == "auth"
        ) as running,
    ):
        patch.setattr(guesses, "STEP", 0.0)
        yield running


# Strategies

_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_ANY_TEXT = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40
)
VALID = st.sampled_from(
    [
        "noreply@moodle.example.org",
        "ada@students.example.org",
        "mdl+AAAA@bounces.example.org",
        "x@moodle.local",
        "a@[192.0.2.1]",
    ]
)
addresses = st.one_of(
    VALID,
    VALID,
    VALID,
    st.sampled_from(
        [
            "noreply@moodle.example.org",
            "ada@students.example.org",
            "x@moodle.local",
            "<>",
            "",
            "a@[192.0.2.1",
            "a@[192.0.2.1]",
            "@a,@b:c@d.org",
            '"quoted local"@example.org',
            "user@-bad-.org",
            "a" * 70 + "@example.org",
            "user@" + "d" * 300 + ".org",
            "ü@example.org",
            "a@b@c",
            "<<a@b.org>>",
            "a@b.org> SIZE=1",
            "(comment)a@b.org",
            "a\\@b@c.org",
        ]
    ),
    st.emails().map(str),
    st.text(_PRINTABLE, max_size=40),
    _ANY_TEXT,
)
mail_options = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "SIZE=100",
                f"SIZE={MAX_SIZE * 10}",
                "SIZE=-1",
                "SIZE=x",
                "SIZE=",
                "BODY=8BITMIME",
                "BODY=7BIT",
                "BODY=BINARYMIME",
                "SMTPUTF8",
                "AUTH=<>",
                "RET=HDRS",
                "ENVID=x",
                "NOTIFY=NEVER",
                "FOO",
            ]
        ),
        st.text(_PRINTABLE, max_size=20),
    ),
    max_size=3,
).map(" ".join)


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


PLAIN = b64(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
auth_lines = st.one_of(
    st.just(f"AUTH PLAIN {PLAIN}"),
    st.just(f"AUTH LOGIN {b64(USER.encode())}\r\n{b64(PASSWORD.encode())}"),
    st.just("AUTH LOGIN\r\n" + b64(USER.encode()) + "\r\n" + b64(b"wrong")),
    st.binary(max_size=40).map(lambda b: f"AUTH PLAIN {b64(b)}"),
    st.text(_PRINTABLE, max_size=30).map(lambda t: f"AUTH PLAIN {t}"),
    st.sampled_from(
        [
            "AUTH PLAIN",
            "AUTH LOGIN",
            "AUTH CRAM-MD5",
            "AUTH",
            "AUTH PLAIN =",
            "AUTH LOGIN =",
            "AUTH PLAIN AAAA\r\n*",
        ]
    ),
)
commands = st.one_of(
    st.builds(
        lambda v, a: f"{v} {a}".rstrip(),
        st.sampled_from(
            [
                "EHLO",
                "HELO",
                "NOOP",
                "RSET",
                "VRFY",
                "EXPN",
                "HELP",
                "QUIT",
                "STARTTLS",
                "DATA",
                "BDAT",
                "ETRN",
                "MAIL",
                "RCPT",
                "mail from:",
                "rcpt to:",
                "xclient",
                "ehlo",
            ]
        ),
        st.one_of(st.just(""), st.text(_PRINTABLE, max_size=30), _ANY_TEXT),
    ),
    st.builds(lambda a, o: f"MAIL FROM:<{a}> {o}".rstrip(), addresses, mail_options),
    st.builds(lambda a, o: f"RCPT TO:<{a}> {o}".rstrip(), addresses, mail_options),
    st.builds(lambda a: f"MAIL FROM:{a}", addresses),
    auth_lines,
).map(lambda line: line.encode("utf-8", "surrogateescape") + b"\r\n")
raw_lines = st.binary(max_size=120)  # anything at all: NUL, bare LF/CR, 8-bit, CRLF inside
data_bodies = st.one_of(
    st.binary(max_size=MAX_SIZE + 200),
    st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from(
                [
                    b".",
                    b"..",
                    b". ",
                    b".\n",
                    b"\n.\n",
                    b"\r.\r",
                    b"X" * 1000,
                    b"\xff\xfe",
                    b"\0",
                    b"Message-ID: <fuzz@example.org>",
                    b"Subject: =?utf-8?B?w7w=?=",
                    b"",
                ]
            ),
        ),
        max_size=40,
    ).map(b"\r\n".join),
)


@st.composite
def conversations(draw: st.DrawFn) -> list[bytes]:
    """Chunks to send: a greeting, then transactions (possibly broken) and noise."""
    greetings = [b"EHLO moodle.test\r\n"] * 4 + [b"HELO moodle.test\r\n", b""]
    chunks = [draw(st.sampled_from(greetings))]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["transaction", "transaction", "command", "raw"]))
        if kind == "command":
            chunks.append(draw(commands))
        elif kind == "raw":
            chunks.append(draw(raw_lines))
        else:
            login = draw(st.sampled_from(["right", "right", "fuzzed", "none"]))
            if login != "none":
                line = f"AUTH PLAIN {PLAIN}" if login == "right" else draw(auth_lines)
                chunks.append(line.encode() + b"\r\n")
            options = draw(st.one_of(st.just(""), mail_options))
            mail_from = f"MAIL FROM:<{draw(addresses)}> {options}".rstrip()
            chunks.append(mail_from.encode("utf-8", "surrogateescape") + b"\r\n")
            for rcpt in draw(st.lists(addresses, min_size=0, max_size=MAX_RCPTS + 1)):
                chunks.append(f"RCPT TO:<{rcpt}>\r\n".encode("utf-8", "surrogateescape"))
            chunks.append(b"DATA\r\n")
            body = draw(data_bodies)
            chunks.append(body.replace(b"\r\n.\r\n", b"\r\n..\r\n") + b"\r\n.\r\n")
    return chunks


def converse(port: int, chunks: list[bytes]) -> tuple[list[str], bool, bytes]:
    """Send `chunks` + TAIL pipelined; replies until the server closes (or 10 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(chunks) + TAIL)
        received = b""
        closed = False
        try:
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except (TimeoutError, ConnectionResetError):
            pass
    return received.decode("utf-8", "replace").split("\r\n")[:-1], closed, b"".join(chunks)


def stored(server: Server, queue_ids: list[str]) -> dict[str, bytes]:
    """Bodies of `queue_ids` in the spool."""
    with closing(open_existing(server.settings.spool)) as conn:
        marks = ",".join("?" * len(queue_ids))
        return {
            row[0]: bytes(row[1])
            for row in conn.execute(f"SELECT id, body FROM bodies WHERE id IN ({marks})", queue_ids)
        }


def unstuffed(stream: bytes) -> bytes:
    """`stream` with one leading dot taken off every line, as the server does inside DATA."""
    return b"\r\n".join(line[1:] if line[:1] == b"." else line for line in stream.split(b"\r\n"))


def normalized(stream: bytes) -> bytes:
    """`stream` with every bare CR or LF made CRLF (relay's limits.bare_newline default)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", stream)


@BOUNDED
@given(chunks=conversations())
def test_any_conversation_gets_named_replies_and_the_service_survives(
    server: Server, chunks: list[bytes]
) -> None:
    """Arbitrary pipelined SMTP conversations: no generic 500 or internal error reply, no
    ERROR logged, the session ends at QUIT, each "queued as ID" is stored with the bytes
    of a DATA that was sent, and the service is still running."""
    before = len(server.errors.records)
    replies, closed, sent = converse(server.port, chunks)
    server.examples += 1
    server.replies.update(r[:3] for r in replies if r[3:4] != "-")
    server.replies["queued"] += sum(1 for r in replies if _QUEUED.match(r))
    generic = [r for r in replies if r.startswith("500 Error: (") or r == INTERNAL_ERROR]
    errors = [r.getMessage() for r in server.errors.records[before:]]
    queued = [m.group(1) for r in replies if (m := _QUEUED.match(r))]
    bodies = stored(server, queued) if queued else {}
    assert ([], [], True) == (generic, errors, closed), replies
    assert sorted(queued) == sorted(bodies)
    assert [] == [q for q, body in bodies.items() if body not in normalized(unstuffed(sent))]
    assert server.alive


def test_a_normal_mail_goes_through_after_the_fuzz(server: Server) -> None:
    """After the fuzz examples (same server, module scope): a well-formed transaction with
    smtplib gets "250 ... queued as ID" and the message is in the spool, byte for byte."""
    raw = b"Subject: after the fuzz\r\nMessage-ID: <after@moodle.example.org>\r\n\r\nHello.\r\n"
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="moodle.test", timeout=10) as c:
        c.ehlo()
        if server.settings.auth is not None:
            c.login(USER, PASSWORD)
        replies = [c.mail("noreply@moodle.example.org"), c.rcpt("ada@example.org"), c.data(raw)]
    texts = [f"{code} {text.decode()}" for code, text in replies]
    queued = _QUEUED.match(texts[-1])
    errors = [r.getMessage() for r in server.errors.records]
    kind = "auth" if server.settings.auth else "open"
    print(
        f"fuzz ({kind}): {server.examples} conversations, replies by code "
        f"{dict(sorted(server.replies.items()))}, {len(errors)} errors logged; after the fuzz "
        f"a normal mail got {texts[-1]!r}"
    )
    assert [] == errors
    assert queued is not None, texts
    assert {queued.group(1): raw} == stored(server, [queued.group(1)])
    assert server.alive
