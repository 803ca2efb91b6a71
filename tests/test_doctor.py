"""`relay doctor` as a process: moto for SES, fakedns for DNS, an aiosmtpd STARTTLS+AUTH host."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from relay import settings
from relay import spool as spool_mod
from relay.ops import upstreamcheck
from tests.support.aws import REGION
from tests.support.capture import CaptureServer
from tests.support.fakedns import FakeDns
from tests.support.fakeses import FakeSes
from tests.support.ports import free_port
from tests.support.processes import relay_cli
from tests.support.relays import ConfigWriter
from tests.support.tls import TlsFiles, server_context

DOMAIN = "doctor.example.org"  # verified in moto here (other tests use VERIFIED_DOMAIN)
SENDER = f"noreply@{DOMAIN}"
UNVERIFIED = "noreply@unverified.example.net"
PASSWORD = "upstream-secret-pw"
CONFIG_SETS = ("doctor-default", "doctor-reminders")
RULES = f"""\
default: upstream
rules:
  - name: reengagement
    route: ses
    ses: {{configuration_set: {CONFIG_SETS[1]}}}
    match:
      header: {{X-Moodle-Originating-Script: 'mod/reengagement/lib\\.php'}}
"""


@pytest.fixture
def auth_host(tls_files: TlsFiles) -> Iterator[CaptureServer]:
    """The "original host": STARTTLS and AUTH (moodle / PASSWORD) required."""
    login = (b"moodle", PASSWORD.encode())
    context = server_context(tls_files)
    with CaptureServer(tls="starttls", tls_context=context, login=login) as host:
        yield host


@pytest.fixture
def ses_ready(aws_env: None, moto_server: str) -> dict[str, Any]:
    """DOMAIN verified with Easy DKIM in moto, the configuration sets made; DNS records to match."""
    client = boto3.client("ses", region_name=REGION, endpoint_url=moto_server)
    client.verify_domain_identity(Domain=DOMAIN)
    tokens = client.verify_domain_dkim(Domain=DOMAIN)["DkimTokens"]
    existing = {c["Name"] for c in client.list_configuration_sets()["ConfigurationSets"]}
    for name in CONFIG_SETS:
        if name not in existing:
            client.create_configuration_set(ConfigurationSet={"Name": name})
    records = {
        (DOMAIN, "TXT"): ['"v=spf1 mx include:amazonses.com -all"'],
        (f"_dmarc.{DOMAIN}", "TXT"): ['"v=DMARC1; p=quarantine; rua=mailto:dmarc@' + DOMAIN + '"'],
        **{(f"{t}._domainkey.{DOMAIN}", "CNAME"): [f"{t}.dkim.amazonses.com."] for t in tokens},
    }
    return {"url": moto_server, "tokens": tokens, "records": records}


def doctor_config(
    write_config: ConfigWriter, tmp_path: Path, ses_url: str, upstream_port: int, **overrides: Any
) -> Path:
    """relay.yaml: upstream = the STARTTLS+AUTH host, SES = `ses_url`, rules with a config set."""
    (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
    config: dict[str, Any] = {
        "rules": "rules.yaml",
        "upstream": {
            "host": "127.0.0.1",
            "port": upstream_port,
            "security": "starttls",
            "verify_tls": False,
            "username": "moodle",
            "password_env": "DOCTOR_PW",
        },
        "ses": {"region": REGION, "endpoint_url": ses_url, "configuration_set": CONFIG_SETS[0]},
    }
    config.update(overrides)
    return write_config(**config)


def seed_spool(directory: Path, mails: list[tuple[str, str | None]]) -> None:
    """Rows as the service leaves them: (envelope sender, route or None while queued)."""

    async def seed() -> None:
        spool = await spool_mod.Spool.open(directory)
        try:
            for sender, route in mails:
                qid = await spool.add(
                    sender=sender,
                    recipients=["ada@example.net"],
                    raw=b"x\r\n",
                    peer="127.0.0.1",
                    trace=b"",
                    message_id="<m@x>",
                )
                if route is not None:
                    await spool.sent(qid, rule="r", route=route, reply="250 ok")
        finally:
            await spool.close()

    asyncio.run(seed())


def run_doctor(config: Path, *args: str, **env: str) -> tuple[int, list[str], float]:
    """`relay doctor --config CONFIG ARGS`: exit code, stdout lines, seconds taken."""
    started = time.monotonic()
    done = relay_cli(
        "doctor", "--config", str(config), *args, env={**os.environ, **env}, timeout=60
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines(), time.monotonic() - started


def test_doctor_all_good(
    ses_ready: dict[str, Any], auth_host: CaptureServer, write_config: ConfigWriter, tmp_path: Path
) -> None:
    """Everything in order: every line ok, exit 0; senders come from the spool (SES-routed
    mail of the last 7 days only); STARTTLS + AUTH were done, nothing was sent, and neither
    the upstream password nor the AWS secret key is printed."""
    config = doctor_config(write_config, tmp_path, ses_ready["url"], auth_host.port)
    seed_spool(tmp_path / "spool", [(SENDER, "ses"), (SENDER, None), (UNVERIFIED, "upstream")])
    with FakeDns(ses_ready["records"]) as dns:
        code, lines, took = run_doctor(config, "--nameserver", dns.address, DOCTOR_PW=PASSWORD)
    print("\n".join(lines), f"\n({took:.1f} s)")
    checks = [(line[:6].strip(), line[6:16].strip()) for line in lines]
    # moto does not implement GetAccountSendingEnabled (HTTP 500), SESv2 GetAccount nor
    # GetSuppressedDestination (404): doctor says it cannot tell.
    gap = "warn  ses       sending state unknown: GetAccountSendingEnabled: ResponseParserError"
    sandbox = "warn  ses       sandbox state unknown: GetAccount: 404"
    lookups = "warn  ses       suppression list lookups unknown (ses.suppressed: upstream): 404"
    expected = [
        ("ok", "config"),
        ("ok", "spool"),
        ("ok", "upstream"),
        ("ok", "ses"),
        ("warn", "ses"),
        ("warn", "ses"),
        ("warn", "ses"),
        ("ok", "identity"),
        ("ok", "configset"),
        ("ok", "configset"),
        ("ok", "spf"),
        ("ok", "dkim"),
        ("ok", "dmarc"),
    ]
    assert expected == checks, "\n".join(lines)
    assert lines[1].endswith(": writable and readable; 1 queued, 0 deferred, 0 failed, 0 bounced")
    assert lines[4].startswith(gap), lines[4]
    assert lines[5].startswith(sandbox), lines[5]
    assert lines[6].startswith(lookups), lines[6]
    assert 0 == code
    assert f"ok    identity  {DOMAIN} (Source): verified (1 address seen)" == lines[7]
    assert (
        f"ok    upstream  127.0.0.1:{auth_host.port}: EHLO, STARTTLS, AUTH as moodle ok "
        "(no mail sent)" == lines[2]
    )
    assert (
        f"ok    spf       {DOMAIN}: SES's own MAIL FROM (amazonses.com); no SPF record needed"
        == lines[10]
    )
    assert f"ok    dkim      {DOMAIN}: 3 CNAMEs to SES Easy DKIM (SES status Success)" == lines[11]
    # moto's server is shared by the session: other tests' sends count in "sent N".
    assert re.search(r"max send rate 1/s; sent \d+ of 200 in the last 24 h", lines[3]), lines[3]
    assert [(b"moodle", PASSWORD.encode())] == auth_host.logins
    assert [] == auth_host.messages
    output = "\n".join(lines)
    assert PASSWORD not in output and os.environ["AWS_SECRET_ACCESS_KEY"] not in output


def test_doctor_names_each_problem(
    ses_ready: dict[str, Any], write_config: ConfigWriter, tmp_path: Path
) -> None:
    """Upstream port closed, a sender domain not verified in SES, a configuration set SES
    lacks, no DMARC record, a wrong DKIM CNAME: exit 1 and one FAIL line naming each and what
    to do, the rest ok; the DNS of a domain SES cannot send for is not checked (the identity
    comes first)."""
    port = free_port()
    config = doctor_config(
        write_config,
        tmp_path,
        ses_ready["url"],
        port,
        ses={
            "region": REGION,
            "endpoint_url": ses_ready["url"],
            "configuration_set": "no-such-set",
        },
    )
    records = dict(ses_ready["records"])
    del records[(f"_dmarc.{DOMAIN}", "TXT")]
    token = ses_ready["tokens"][1]
    records[(f"{token}._domainkey.{DOMAIN}", "CNAME")] = ["elsewhere.example.com."]
    with FakeDns(records) as dns:
        code, lines, took = run_doctor(
            config,
            "--nameserver",
            dns.address,
            "--sender",
            SENDER,
            "--sender",
            UNVERIFIED,
            DOCTOR_PW=PASSWORD,
        )
    print("\n".join(lines), f"\n({took:.1f} s)")
    failed = [line for line in lines if line.startswith("FAIL")]
    expected = [
        f"FAIL  upstream  127.0.0.1:{port}: connection refused",
        "FAIL  identity  unverified.example.net (Source): not verified in SES: verify domain"
        f" unverified.example.net in {REGION}, or set ses.source to an address of a verified"
        " domain",
        f"FAIL  configset no-such-set: does not exist in {REGION}: create it",
        f"FAIL  dkim      {token}._domainkey.{DOMAIN} CNAME: elsewhere.example.com, "
        f"expected {token}.dkim.amazonses.com",
        f"FAIL  dmarc     _dmarc.{DOMAIN} TXT: does not exist (NXDOMAIN)",
    ]
    assert expected == failed, "\n".join(lines)
    assert 1 == code
    assert f"ok    configset {CONFIG_SETS[1]}: exists" in lines


def test_doctor_paused_account_and_dns_timeout(
    aws_env: None, write_config: ConfigWriter, tmp_path: Path
) -> None:
    """Against the fake SES: a paused account is a FAIL; GetIdentityDkimAttributes, which the
    fake lacks, is a warn (not checked); a nameserver that never answers gives a FAIL line
    naming the record within the 2 s DNS timeout, not a hang (no SPF lookup: no custom
    MAIL FROM)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes queries, never answers
    silent.bind(("127.0.0.1", 0))
    with (
        FakeSes(
            verified={DOMAIN}, configuration_sets=set(CONFIG_SETS), sending_enabled=False
        ) as fake,
        silent,
    ):
        config = doctor_config(write_config, tmp_path, fake.url, free_port())
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        code, lines, took = run_doctor(config, "--nameserver", address, "--sender", DOMAIN)
    print("\n".join(lines), f"\n({took:.1f} s)")
    assert 1 == code
    assert "FAIL  ses       sending paused for the account: resume it in the SES console" in lines
    assert f"ok    identity  {DOMAIN} (Source): verified" in lines
    dkim = [line for line in lines if line[6:16].strip() == "dkim"]
    assert [
        f"warn  dkim      {DOMAIN}: Easy DKIM tokens unknown (GetIdentityDkimAttributes: "
        "InvalidAction: unknown action 'GetIdentityDkimAttributes'); not checked"
    ] == dkim
    assert f"FAIL  dmarc     _dmarc.{DOMAIN} TXT: no answer within 2 s" in lines
    assert took < 15


def test_doctor_config_problems_stop_it(write_config: ConfigWriter, tmp_path: Path) -> None:
    """A broken rules file: every problem printed with file:line, nothing else checked, exit 1."""
    (tmp_path / "rules.yaml").write_text(
        "default: upstream\nrules:\n  - name: a\n    route: nowhere\n    match: {subject: '('}\n"
    )
    config = write_config(rules="rules.yaml")
    code, lines, _ = run_doctor(config)
    assert 1 == code
    assert 2 <= len(lines), lines
    assert all(line.startswith(f"FAIL  config    {tmp_path / 'rules.yaml'}:") for line in lines)
    assert any(":4:" in line and "route" in line for line in lines), lines
    assert any(":5:" in line for line in lines), lines


def test_doctor_warns_of_a_rule_that_never_decides(
    write_config: ConfigWriter, tmp_path: Path
) -> None:
    """A rule an earlier one always takes the mail from: one warn line at its line naming
    that rule; the rules still load, and doctor goes on (exit 0)."""
    (tmp_path / "rules.yaml").write_text(
        "rules:\n"
        "  - {name: any-reminder, route: ses, match: {subject: Reminder}}\n"
        "  - {name: cc-reminder, route: ses, match: {subject: Reminder, recipient: tutor}}\n"
    )
    with CaptureServer() as capture:
        config = write_config(
            rules="rules.yaml",
            upstream={"host": "127.0.0.1", "port": capture.port},
            ses={"enabled": False},
        )
        code, lines, _ = run_doctor(config)
    warned = [line for line in lines if line.startswith("warn  rules")]
    assert [
        f"warn  rules     {tmp_path / 'rules.yaml'}:3: rule 'cc-reminder' never decides: rule"
        " 'any-reminder' (line 2) above it asks nothing 'cc-reminder' does not ask, so it"
        " takes every mail 'cc-reminder' matches; put 'cc-reminder' first, or remove it"
    ] == warned, lines
    assert 0 == code


def test_doctor_warns_when_the_spool_disk_is_under_the_spill_reserve(
    write_config: ConfigWriter, tmp_path: Path
) -> None:
    """A spool disk with less free than limits.spill_min_free (here more than any disk has):
    one warn line naming the free space, the reserve and what it means; exit 0 still."""
    with CaptureServer() as capture:
        config = write_config(
            upstream={"host": "127.0.0.1", "port": capture.port},
            ses={"enabled": False},
            limits={"spill_min_free": 2**60},
        )
        code, lines, _ = run_doctor(config)
    warned = [line for line in lines if line.startswith("warn  spool")]
    assert len(warned) == 1, lines
    assert f"under limits.spill_min_free ({2**40} MiB)" in warned[0]
    assert "refused (452 4.3.1)" in warned[0]
    assert 0 == code


def test_doctor_without_senders_and_ses_disabled(
    write_config: ConfigWriter, tmp_path: Path
) -> None:
    """No spool yet and SES switched off: spool directory writable, SES and DNS skipped, exit 0
    when the upstream host answers EHLO (plain SMTP here)."""
    with CaptureServer() as capture:
        config = write_config(
            upstream={"host": "127.0.0.1", "port": capture.port}, ses={"enabled": False}
        )
        code, lines, _ = run_doctor(config)
    expected = [
        "ok    config    relay.yaml and rules.yaml load (2 rules)",
        f"ok    spool     {tmp_path / 'spool'}: writable; no database yet (made at first start)",
        f"ok    upstream  127.0.0.1:{capture.port}: EHLO ok (no mail sent)",
        "ok    ses       disabled (ses.enabled: false); SES and DNS checks skipped",
    ]
    assert expected == lines
    assert 0 == code
    assert [] == capture.messages


@pytest.mark.system  # ipv6_route routes 2001:db8:5e55::/64 to lo (root)
def test_doctor_warns_when_mail_or_a_password_would_go_in_clear(
    ipv6_route: str, tls_files: TlsFiles, write_config: ConfigWriter, tmp_path: Path
) -> None:
    """`upstream.security: none` to a host that is not this machine (2001:db8:5e55::25,
    answered by a listener on "::" but no address of this machine), which offers
    STARTTLS (and AUTH only after it): without a username, ok and a warn saying to set
    starttls; with one, the AUTH fails there and the warn names the password too. The
    same host on ::1 gets no warn: nothing leaves the machine. A username with the host
    down: the FAIL, and the warn still, from the config alone."""
    login = (b"moodle", PASSWORD.encode())
    context = server_context(tls_files)
    remote = "2001:db8:5e55::25"
    runs = {}
    with CaptureServer(host="::", tls="starttls", tls_context=context, login=login) as host:
        down = free_port()
        for name, address, port, user in (
            ("remote", remote, host.port, {}),
            ("remote, username", remote, host.port, {"username": "moodle"}),
            ("loopback", "::1", host.port, {}),
            ("remote down, username", remote, down, {"username": "moodle"}),
        ):
            upstream = {"host": address, "port": port, "security": "none", **user}
            if user:
                upstream["password_env"] = "DOCTOR_PW"
            config = write_config(upstream=upstream, ses={"enabled": False})
            code, lines, _ = run_doctor(config, DOCTOR_PW=PASSWORD)
            runs[name] = (code, [line for line in lines if "upstream" in line[:16]])
    print("\n".join(f"{name}: {run}" for name, run in runs.items()))
    where = f"{remote}:{host.port}"
    assert runs["remote"] == (
        0,
        [
            f"ok    upstream  {where}: EHLO ok (no mail sent)",
            f"warn  upstream  {where}: offers STARTTLS but security is none: every mail goes"
            " in clear; set upstream.security: starttls",
        ],
    )
    code, lines = runs["remote, username"]
    assert 1 == code
    assert lines[0].startswith(f"FAIL  upstream  {where}: AUTH failed: ")
    assert lines[1:] == [
        f"warn  upstream  {where}: security none: the password of moodle and every mail go in"
        " clear; set upstream.security: starttls"
    ]
    assert runs["loopback"] == (0, [f"ok    upstream  ::1:{host.port}: EHLO ok (no mail sent)"])
    code, lines = runs["remote down, username"]
    assert 1 == code
    assert lines == [
        f"FAIL  upstream  {remote}:{down}: connection refused",
        f"warn  upstream  {remote}:{down}: security none: the password of moodle and every"
        " mail go in clear; set upstream.security: starttls or tls, if the host has either",
    ]
    assert [] == host.messages


async def test_doctor_says_which_security_the_port_wants(
    tls_files: TlsFiles, write_config: ConfigWriter
) -> None:
    """The wrong kind of TLS for the host: `security: none` to a host that wants TLS at once
    (port 465) waits out its timeout for a greeting, and `security: tls` to a host speaking
    in clear (STARTTLS, ports 25 and 587) fails its handshake. Each FAIL says what to set;
    before, only "timed out" and an SSL error."""
    found = {}
    context = server_context(tls_files)
    for name, kind, security in (("smtps", "tls", "none"), ("plain", "none", "tls")):
        with CaptureServer(tls=kind, tls_context=context if kind == "tls" else None) as host:
            upstream = {"host": "127.0.0.1", "port": host.port, "security": security}
            config = write_config(upstream={**upstream, "timeout": 1}, ses={"enabled": False})
            found[name] = await upstreamcheck.lines(settings.load(config))
            await asyncio.sleep(0.3)  # the host sees the client go (its handshake ends)
    print(found)
    assert [("FAIL", "upstream")] * 2 == [line[:2] for lines in found.values() for line in lines]
    assert found["smtps"][0][2].endswith(
        "; no greeting: a host wanting TLS at once (port 465) needs upstream.security: tls"
    )
    assert found["plain"][0][2].endswith(
        "; the host does not speak TLS at once: for STARTTLS set upstream.security: starttls"
    )


async def test_doctor_warns_when_relay_accepts_mail_the_host_refuses_as_too_big(
    write_config: ConfigWriter,
) -> None:
    """The host takes 10,240,000 bytes (Postfix's message_size_limit) and relay accepts
    10 MiB: mail in between got relay's 250, then failed for good at the host, where Moodle
    would have logged the 552. The warn says what to set; set so, no warn."""
    found = {}
    with CaptureServer(size=10_240_000) as host:
        for name, limits in (("default", {}), ("under", {"max_message_size": 10_238_976})):
            upstream = {"host": "127.0.0.1", "port": host.port}
            config = write_config(upstream=upstream, limits=limits, ses={"enabled": False})
            found[name] = await upstreamcheck.lines(settings.load(config))
    where = f"127.0.0.1:{host.port}"
    assert found["default"] == [
        ("ok", "upstream", f"{where}: EHLO ok (no mail sent)"),
        (
            "warn",
            "upstream",
            f"{where}: takes mail up to 10240000 bytes (its SIZE), and relay accepts up to"
            " 10485760 (limits.max_message_size): set it to 10238976 or less, or mail in"
            " between is accepted, then refused there",
        ),
    ]
    assert found["under"] == [("ok", "upstream", f"{where}: EHLO ok (no mail sent)")]


async def test_doctor_reads_the_size_a_host_offers_inside_tls(
    tls_files: TlsFiles, write_config: ConfigWriter
) -> None:
    """aiosmtplib's starttls() forgets the extensions and says no EHLO again (only login()
    does): the SIZE read after STARTTLS was none, and no warn came for a host relay's
    delivery, which says EHLO again, then sent mail it refused."""
    context = server_context(tls_files)
    with CaptureServer(size=10_240_000, tls="starttls", tls_context=context) as host:
        upstream = {"host": "127.0.0.1", "port": host.port, "security": "starttls"}
        config = write_config(upstream={**upstream, "verify_tls": False}, ses={"enabled": False})
        found = await upstreamcheck.lines(settings.load(config))
    assert [("ok", "upstream"), ("warn", "upstream")] == [line[:2] for line in found]
    assert "takes mail up to 10240000 bytes (its SIZE)" in found[1][2]


async def test_doctor_says_a_host_answers_helo_only(write_config: ConfigWriter) -> None:
    """A host that refuses EHLO (no ESMTP): relay's delivery says HELO and sends; the
    doctor said FAIL and exited 1. Now ok, and a warn about what HELO leaves out."""

    async def helo_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 host.test SMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                writer.write(
                    b"502 5.5.2 command not recognized\r\n"
                    if verb == b"EHLO"
                    else b"221 Bye\r\n"
                    if verb == b"QUIT"
                    else b"250 host.test\r\n"
                )
                if verb == b"QUIT":
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(helo_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = write_config(upstream={"host": "127.0.0.1", "port": port}, ses={"enabled": False})
        found = await upstreamcheck.lines(settings.load(config))
    finally:
        server.close()
    assert found == [
        ("ok", "upstream", f"127.0.0.1:{port}: HELO ok (no mail sent)"),
        (
            "warn",
            "upstream",
            f"127.0.0.1:{port}: answers HELO only (no ESMTP): relay sends with HELO, without"
            " SIZE, 8BITMIME or SMTPUTF8 (mail with UTF-8 addresses fails)",
        ),
    ]


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("192.0.2.99", False),  # TEST-NET-1: no machine's address
        ("2001:db8::99", False),
        ("mail.example.org", False),  # a name: judged by the address connected to
    ],
)
def test_what_counts_as_this_machine(host: str, local: bool) -> None:
    assert local == upstreamcheck.on_this_machine(host)
