"""Sample Moodle mails for `relay demo`, shaped as PHPMailer 6 writes them for Moodle.

Header order and forms follow DESIGN section 5: Date, To, From, Reply-To,
Subject, Message-ID, X-Mailer, custom headers, MIME-Version, Content-Type.
"""

from __future__ import annotations

from dataclasses import dataclass

SITE = "moodle.example.org"
NOREPLY = f"noreply@{SITE}"
SUPPORT_FROM = f'"Admin User (via Example Moodle)" <{NOREPLY}>'
REPLY_TO = f'"Do not reply to this email" <{NOREPLY}>'
X_MAILER = "PHPMailer 6.9.1 (https://github.com/PHPMailer/PHPMailer)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    label: str
    sender: str
    recipient: str
    raw: bytes


def _mail(to: str, subject: str, uniq: str, extra: list[str], body: list[str]) -> bytes:
    lines = [
        "Date: Sat, 28 Nov 2026 10:00:00 +0000",
        f"To: {to}",
        f"From: {SUPPORT_FROM}",
        f"Reply-To: {REPLY_TO}",
        f"Subject: {subject}",
        f"Message-ID: <{uniq}@{SITE}>",
        f"X-Mailer: {X_MAILER}",
        *extra,
        "MIME-Version: 1.0",
        *body,
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def _script(path: str) -> str:
    return f"X-Moodle-Originating-Script: https://{SITE} => {SITE}:{path}"


_TEXT = ["Content-Type: text/plain; charset=UTF-8", "Content-Transfer-Encoding: 8bit", ""]


def samples() -> list[Sample]:
    """Four mails: re-engagement student and CC copies, a forum post, a password reset."""
    student = _mail(
        '"Ada Lovelace" <ada@student.example.net>',
        "We miss you in Physics 101",
        "6740a1b2c3d4e5.11111111",
        [_script("mod/reengagement/lib.php:564")],
        [
            'Content-Type: multipart/alternative; boundary="b1_demo"',
            "",
            "This is a multi-part message in MIME format.",
            "--b1_demo",
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Transfer-Encoding: quoted-printable",
            "",
            "Hi Ada, you have not visited Physics 101 for a while.",
            "--b1_demo",
            "Content-Type: text/html; charset=UTF-8",
            "Content-Transfer-Encoding: quoted-printable",
            "",
            '<div class=3D"text_to_html">Hi Ada, you have not visited Physics 101 for a =',
            "while.</div>",
            "--b1_demo--",
            "",
        ],
    )
    cc = _mail(
        '"tutor@school.example.net" <tutor@school.example.net>',
        "Ada Lovelace has not visited Physics 101",
        "6740a1b2c3d4e5.22222222",
        [_script("mod/reengagement/lib.php:564")],
        [*_TEXT, "Ada Lovelace has not visited Physics 101 for 14 days."],
    )
    forum = _mail(
        '"Ada Lovelace" <ada@student.example.net>',
        "PHYS101: Exam dates",
        "6740a1b2c3d4e5.33333333",
        [
            _script("mod/forum/classes/task/send_user_notifications.php:409"),
            "Precedence: Bulk",
            'List-Id: "PHYS101" <moodleforum7@moodle.example.org>',
            f"List-Unsubscribe: <https://{SITE}/mod/forum/subscribe.php?id=7>",
            "X-Course-Id: 2",
            "Auto-Submitted: auto-generated",
        ],
        [*_TEXT, "The exam dates are now on the course page."],
    )
    reset = _mail(
        '"Ada Lovelace" <ada@student.example.net>',
        "Example Moodle: Password reset request",
        "6740a1b2c3d4e5.44444444",
        [_script("lib/moodlelib.php:6352")],
        [*_TEXT, "Hi Ada, a password reset was requested for your account."],
    )
    return [
        Sample(
            label="re-engagement (student)",
            sender=NOREPLY,
            recipient="ada@student.example.net",
            raw=student,
        ),
        Sample(
            label="re-engagement (CC copy)",
            sender=NOREPLY,
            recipient="tutor@school.example.net",
            raw=cc,
        ),
        Sample(label="forum post", sender=NOREPLY, recipient="ada@student.example.net", raw=forum),
        Sample(
            label="password reset", sender=NOREPLY, recipient="ada@student.example.net", raw=reset
        ),
    ]
