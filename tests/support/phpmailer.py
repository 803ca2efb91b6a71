"""Moodle's own SMTP client: PHPMailer under php-cli, driven by tests/clients/phpmailer_send.php
(a JSON job on stdin, one JSON line per mail on stdout). Needs Debian's php-cli and
libphp-phpmailer: the tests that use it are marked `system`."""

from __future__ import annotations

from pathlib import Path

CLIENT = Path(__file__).parent.parent / "clients" / "phpmailer_send.php"
PHPMAILER = Path("/usr/share/php/libphp-phpmailer/autoload.php")


def phpmailer_wire(mime: bytes) -> bytes:
    """What PHPMailer's SMTP::data() puts between DATA and the final dot (unstuffed):
    every line of the message, line ends normalised to CRLF, the last one included."""
    lines = mime.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"".join(line + b"\r\n" for line in lines)
