"""`relay doctor`'s check of the original host (relay.deliver.upstream):

    ok    upstream  smtp.example.org:587: EHLO, STARTTLS, AUTH as moodle ok (no mail sent)
    warn  upstream  10.0.0.25:25: offers STARTTLS but security is none: every mail goes ...

Connects, says EHLO, then STARTTLS and AUTH as configured, and QUITs without sending.
With `upstream.security: none` to a host that is not this machine (judged by the
address connected to), a warn when a password would go there in clear or the host
offers STARTTLS that relay leaves unused. Returns (status, check, detail) lines.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl

import aiosmtplib

from relay.settings import Security, Settings, Upstream

OK, WARN, FAIL = "ok", "warn", "FAIL"
SMTP_TIMEOUT = 10.0  # seconds per SMTP step, at most
# Bytes relay adds before a mail goes on (its Received: line, bare line ends made CRLF), and
# a margin: a mail within them of max_message_size must still fit the host's SIZE.
TRACE_ROOM = 1024

Line = tuple[str, str, str]


async def lines(settings: Settings) -> list[Line]:
    """EHLO, then STARTTLS and AUTH as configured; QUIT without sending."""
    s = settings.upstream
    context = ssl.create_default_context()
    if not s.verify_tls:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    smtp = aiosmtplib.SMTP(
        hostname=s.host,
        port=s.port,
        local_hostname=settings.hostname,
        start_tls=False,
        timeout=min(s.timeout, SMTP_TIMEOUT),
        use_tls=s.security is Security.TLS,
        tls_context=context,
    )
    step, done = "", ["TLS" if s.security is Security.TLS else "EHLO"]
    in_clear = _in_clear(settings, offered=False)  # unreachable: what the config says
    helo_only = False
    try:
        await smtp.connect()
        step = "EHLO failed: "
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo()  # a host without ESMTP: relay's delivery says HELO too
            helo_only = True
            done[0] = done[0].replace("EHLO", "HELO")
        in_clear = _in_clear(
            settings,
            offered=smtp.supports_extension("starttls"),
            peer=smtp.get_transport_info("peername"),
        )
        if s.security is Security.STARTTLS:
            step = "STARTTLS failed: "
            await smtp.starttls()
            await smtp.ehlo()  # the extensions again, inside TLS (SIZE among them)
            done.append("STARTTLS")
        if s.username:
            step = "AUTH failed: "
            password = s.password()
            if password is None:
                raise aiosmtplib.SMTPException("password_env/password_file gives no password")
            await smtp.login(s.username, password)
            done.append(f"AUTH as {s.username}")
        too_small = _size_problem(settings, smtp.esmtp_extensions.get("size", ""))
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        if isinstance(exc.__cause__ or exc, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(exc, aiosmtplib.SMTPResponseException):
            why = f"{exc.code} {' '.join(exc.message.split())}"
        else:
            why = str(exc) or type(exc).__name__
        found = [(FAIL, "upstream", f"{s.host}:{s.port}: {step}{why}{_tls_hint(s, step, exc)}")]
    else:
        found = [(OK, "upstream", f"{s.host}:{s.port}: {', '.join(done)} ok (no mail sent)")]
        if too_small:
            found.append((WARN, "upstream", f"{s.host}:{s.port}: {too_small}"))
        if helo_only:
            found.append(
                (
                    WARN,
                    "upstream",
                    f"{s.host}:{s.port}: answers HELO only (no ESMTP): relay sends with HELO,"
                    " without SIZE, 8BITMIME or SMTPUTF8 (mail with UTF-8 addresses fails)",
                )
            )
    finally:
        smtp.close()
    if in_clear is not None:
        found.append((WARN, "upstream", f"{s.host}:{s.port}: {in_clear}"))
    return found


def _size_problem(settings: Settings, offered: str) -> str:
    """Why mail relay accepts may be too big for the host's SIZE (RFC 1870), or "". Such
    mail gets relay's 250 and then fails for good there: Moodle, which would have logged the
    host's 552, counts it sent (only the sender's DSN says otherwise)."""
    limit = int(offered) if offered.strip().isdigit() else 0
    accepted = settings.limits.max_message_size
    if not limit or accepted + TRACE_ROOM <= limit:
        return ""
    return (
        f"takes mail up to {limit} bytes (its SIZE), and relay accepts up to {accepted}"
        f" (limits.max_message_size): set it to {limit - TRACE_ROOM} or less, or mail in"
        " between is accepted, then refused there"
    )


def _tls_hint(s: Upstream, step: str, exc: Exception) -> str:
    """What to set when the failure looks like the wrong kind of TLS for the port: no
    greeting in clear (a host that wants TLS at once, port 465), or a TLS handshake answered
    in clear (a host that speaks STARTTLS, ports 25 and 587)."""
    if step:  # past the greeting: not this
        return ""
    if s.security is Security.TLS and isinstance(exc.__cause__ or exc, ssl.SSLError):
        return "; the host does not speak TLS at once: for STARTTLS set upstream.security: starttls"
    if s.security is not Security.TLS and isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return "; no greeting: a host wanting TLS at once (port 465) needs upstream.security: tls"
    return ""


def _in_clear(
    settings: Settings, *, offered: bool, peer: tuple[str, int] | None = None
) -> str | None:
    """What crosses the network unencrypted with `upstream.security: none` to a host that
    is not this machine (judged by the address connected to, `peer`, when there is one;
    else by the configured host), and what to set instead (Postfix's
    smtp_tls_note_starttls_offer notes a STARTTLS left unused); None when nothing does."""
    s = settings.upstream
    if s.security is not Security.NONE or on_this_machine(peer[0] if peer else s.host):
        return None
    fix = "set upstream.security: starttls"
    if s.username:
        if not offered:
            fix += " or tls, if the host has either"
        return f"security none: the password of {s.username} and every mail go in clear; {fix}"
    if offered:
        return f"offers STARTTLS but security is none: every mail goes in clear; {fix}"
    return None


def on_this_machine(host: str) -> bool:
    """A loopback address (also mapped into IPv6), or one of this machine's own."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET) as probe,
    ):
        probe.bind((str(ip), 0))  # only an address of this machine can be bound
        return True
    return False
