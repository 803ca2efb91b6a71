"""The rule language of DESIGN 3.3: conditions, combinators, order, default, SES settings."""

from __future__ import annotations

import base64
import gc
import signal
import sys
import time

import pytest

from relay import rules
from relay.rules import Decision, Route, timebox
from relay.rules.mimeview import BODY_LIMIT, HEADER_LIMIT, MailView
from tests.support.corpus import ruleset
from tests.support.mails import NOREPLY, ORIGIN, mail, message


def one_rule(match: str) -> rules.RuleSet:
    """A rule set whose only rule `hit` (route ses) has the given `match:` flow mapping."""
    return ruleset(f"""
        default: upstream
        rules:
          - name: hit
            route: ses
            match: {match}
        """)


def hit(
    match: str,
    raw: bytes | str,
    *,
    sender: str = NOREPLY,
    recipients: tuple[str, ...] = ("anna@example.org",),
) -> bool:
    """Whether a one-rule set with this match sends `raw` through the rule."""
    decision = one_rule(match).classify(mail(raw, sender=sender, recipients=recipients))
    return decision.rule == "hit"


PLAIN = message(
    "To: Anna Schmidt <anna@example.org>",
    "Subject: We miss you",
    f"X-Moodle-Originating-Script: {ORIGIN}",
)

CONDITIONS = [
    ("header-matches", "{header: {X-Moodle-Originating-Script: 'reengagement/lib'}}", PLAIN, True),
    ("header-name-any-case", "{header: {x-moodle-originating-script: '564$'}}", PLAIN, True),
    ("header-value-differs", "{header: {X-Moodle-Originating-Script: 'mod/forum'}}", PLAIN, False),
    ("header-missing", "{header: {List-Id: ''}}", PLAIN, False),
    ("header-empty-regex-exists", "{header: {Subject: ''}}", PLAIN, True),
    ("header-all-keys", "{header: {Subject: miss, To: 'Anna'}}", PLAIN, True),
    ("header-one-key-fails", "{header: {Subject: miss, To: 'Ben'}}", PLAIN, False),
    ("absent-holds", "{absent: [List-Id, Precedence]}", PLAIN, True),
    ("absent-fails", "{absent: [List-Id, subject]}", PLAIN, False),
    ("subject", "{subject: '^We miss'}", PLAIN, True),
    ("subject-no", "{subject: 'forum'}", PLAIN, False),
    ("body", "{body: 'Hello'}", PLAIN, True),
    ("body-no", "{body: 'Goodbye'}", PLAIN, False),
    ("sender", "{sender: '^noreply@'}", PLAIN, True),
    ("sender-no", "{sender: '^mdl\\+'}", PLAIN, False),
    ("recipient", "{recipient: '@example\\.org$'}", PLAIN, True),
    ("recipient-no", "{recipient: '@example\\.com$'}", PLAIN, False),
    ("multipart-false", "{multipart: false}", PLAIN, True),
    ("multipart-true", "{multipart: true}", PLAIN, False),
    ("not", "{not: {header: {List-Id: ''}}}", PLAIN, True),
    ("not-fails", "{not: {subject: miss}}", PLAIN, False),
    ("all", "{all: [{subject: miss}, {body: Hello}]}", PLAIN, True),
    ("all-one-fails", "{all: [{subject: miss}, {body: Bye}]}", PLAIN, False),
    ("any", "{any: [{subject: nope}, {body: Hello}]}", PLAIN, True),
    ("any-none", "{any: [{subject: nope}, {body: Bye}]}", PLAIN, False),
    ("mapping-means-all", "{subject: miss, body: Hello, multipart: false}", PLAIN, True),
    ("mapping-one-fails", "{subject: miss, body: Hello, multipart: true}", PLAIN, False),
]


@pytest.mark.parametrize(
    ("match", "raw", "expected"), [c[1:] for c in CONDITIONS], ids=[c[0] for c in CONDITIONS]
)
def test_condition(match: str, raw: str, expected: bool) -> None:
    """Each condition holds exactly when DESIGN 3.3 says."""
    assert expected == hit(match, raw)


def test_recipient_matches_any_of_several() -> None:
    """`recipient` holds when any one RCPT TO matches."""
    assert hit("{recipient: '^b@'}", PLAIN, recipients=("a@x.org", "b@x.org"))


def test_sender_null() -> None:
    """The null sender is the empty string."""
    assert hit("{sender: '^$'}", PLAIN, sender="")


def test_header_any_of_repeated_values() -> None:
    """A repeated header matches when any of its values does."""
    raw = message("Received: from a", "Received: from b", "Subject: x")
    assert hit("{header: {Received: 'from b'}}", raw)


def test_header_rfc2047_and_folding() -> None:
    """Header values are unfolded and RFC 2047 decoded before matching."""
    raw = message(
        "To: =?UTF-8?B?Wm/DqyBNw7xsbGVy?= <zoe@example.org>",
        "Subject: =?UTF-8?Q?Wir_vermissen_Sie_im_Kurs_=E2=80=9EEinf=C3=BChrung?=",
        " =?UTF-8?Q?_in_die_Biologie=E2=80=9C?=",
        "X-Moodle-Originating-Script: https://moodle.example.org =>",
        " web01:mod/reengagement/lib.php:565",
    )
    assert hit("{header: {To: '^Zoë Müller <'}}", raw)
    assert hit("{subject: '„Einführung in die Biologie“$'}", raw)
    assert hit("{header: {X-Moodle-Originating-Script: '=> web01:mod/reengagement/'}}", raw)


def test_subject_entities_stay_as_sent() -> None:
    """Moodle's subjects may carry HTML entities; they are matched as written."""
    raw = message("Subject: Don&#039;t forget: Biology &amp; Chemistry")
    assert hit("{subject: 'Biology &amp; Chemistry'}", raw)


def test_empty_and_missing_subject() -> None:
    """A missing or empty Subject is matched as the empty string."""
    assert hit("{subject: '^$'}", message("Subject: "))
    assert hit("{subject: '^$'}", message("To: a@b.org"))


def _multipart(text_part: str, html_part: str, cte: str = "quoted-printable") -> str:
    return "\n".join(
        [
            "Subject: x",
            "MIME-Version: 1.0",
            'Content-Type: multipart/alternative; boundary="b1_x"',
            "",
            "--b1_x",
            "Content-Type: text/plain; charset=UTF-8",
            f"Content-Transfer-Encoding: {cte}",
            "",
            text_part,
            "--b1_x",
            "Content-Type: text/html; charset=UTF-8",
            f"Content-Transfer-Encoding: {cte}",
            "",
            html_part,
            "--b1_x--",
            "",
        ]
    )


BODIES = [
    ("qp-soft-break", _multipart("Kurs seit z=\nwei Wochen", "<p>x</p>"), "zwei Wochen"),
    ("qp-utf8", _multipart("Gr=C3=BC=C3=9Fe", "<p>x</p>"), "Grüße"),
    (
        "base64-utf8",
        _multipart(
            base64.b64encode("Здравствуйте".encode()).decode(), "PHA+eDwvcD4=", cte="base64"
        ),
        "Здравствуйте",
    ),
    ("html-entities-unescaped", _multipart("x", "<p>Biology &amp; Chemistry</p>"), "Biology & Ch"),
    ("html-tags-stripped", _multipart("x", "<p>Dear <b>Anna</b>,</p>"), "Dear Anna,"),
    ("html-raw-comment", _multipart("x", "<p>a</p><!-- [[relay:reengagement]] -->"), "relay:reeng"),
]


@pytest.mark.parametrize(("raw", "needle"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_body_decoding(raw: str, needle: str) -> None:
    """`body` searches the decoded text: QP, base64, charsets, and HTML as visible text."""
    assert hit(f"{{body: '{needle}'}}", raw)


def test_body_latin1_bytes() -> None:
    """A declared 8-bit charset is honoured."""
    raw = b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nGr\xfc\xdfe\r\n"
    assert hit("{body: 'Grüße'}", raw)


def test_body_rules_see_the_first_100_kib_of_each_part() -> None:
    """A body rule searches the first BODY_LIMIT characters of a part: a marker past them is
    not seen. What bounds a regex that backtracks on hostile mail: unbounded, a rule of
    `reengagement.*reminder` on a 1 MB line of "reengagement " held the delivery process
    for minutes, and the same mail again after each restart."""
    early = "[[relay:reengagement]]" + "x" * (BODY_LIMIT - 30)
    assert hit("{body: 'relay:reengagement'}", f"Subject: x\r\n\r\n{early}\r\n")
    late = "x" * BODY_LIMIT + "[[relay:reengagement]]"
    assert not hit("{body: 'relay:reengagement'}", f"Subject: x\r\n\r\n{late}\r\n")
    html = (
        "Subject: x\r\nContent-Type: text/html\r\n\r\n<p>"
        + "x" * BODY_LIMIT
        + "[[relay:reengagement]]</p>\r\n"
    )
    assert not hit("{body: 'relay:reengagement'}", html)


def test_body_ignores_attachments_and_other_types() -> None:
    """Attachments and non-text parts are not searched."""
    raw = "\n".join(
        [
            "Subject: x",
            'Content-Type: multipart/mixed; boundary="m"',
            "",
            "--m",
            "Content-Type: text/plain",
            "",
            "visible",
            "--m",
            "Content-Type: text/plain",
            "Content-Disposition: attachment; filename=a.txt",
            "",
            "attached",
            "--m",
            "Content-Type: application/json",
            "",
            '{"secret": "json"}',
            "--m--",
        ]
    )
    assert (
        hit("{body: visible}", raw),
        hit("{body: attached}", raw),
        hit("{body: json}", raw),
    ) == (True, False, False)


def test_multipart_counts_body_parts() -> None:
    """multipart/alternative with text and HTML has more than one body part."""
    assert hit("{multipart: true}", _multipart("a", "<p>b</p>"))


def test_first_match_wins_and_default() -> None:
    """Rules are tried in order; unmatched mail takes `default` with no rule and no reasons."""
    rs = ruleset("""
        default: ses
        rules:
          - name: first
            route: upstream
            match: {subject: miss}
          - name: second
            route: ses
            match: {subject: We}
        """)
    assert rs.classify(mail(PLAIN)).rule == "first"
    expected = Decision(rule=None, route=Route.SES, reasons=())
    assert expected == rs.classify(mail(message("Subject: other")))


def test_default_route_defaults_to_upstream() -> None:
    """Without `default:`, unmatched mail goes upstream."""
    rs = ruleset("rules: []")
    assert rs.classify(mail(PLAIN)).route == Route.UPSTREAM


def test_no_rules_reads_no_head_and_sets_no_alarm(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no rules the default route is the decision: the head is not parsed and no
    SIGALRM is set (the delivery process classifies every mail it claims)."""
    rs = ruleset("rules: []")

    def refused(*_: object) -> None:
        raise AssertionError("classified a mail with no rules to test")

    monkeypatch.setattr(MailView, "headers", property(refused))
    monkeypatch.setattr(signal, "setitimer", refused)
    assert Decision(rule=None, route=Route.UPSTREAM, reasons=()) == rs.classify(mail(PLAIN))


def test_decision_carries_ses_settings_and_reasons() -> None:
    """A matching rule's configuration set, tags, identity ARN and the conditions that held
    are reported."""
    rs = ruleset("""
        rules:
          - name: reengagement-student
            route: ses
            ses:
              configuration_set: moodle-reminders
              tags: {category: reengagement, site: moodle_1}
              identity_arn: arn:aws:ses:eu-west-1:123456789012:identity/lms.example.edu
            match:
              all:
                - header: {X-Moodle-Originating-Script: 'mod/reengagement/lib\\.php:\\d+$'}
                - not: {header: {List-Id: ''}}
                - any: [{subject: nope}, {sender: noreply}]
        """)
    expected = Decision(
        rule="reengagement-student",
        route=Route.SES,
        reasons=(
            "header X-Moodle-Originating-Script matches 'mod/reengagement/lib\\.php:\\d+$'",
            "not (header List-Id matches '')",
            "sender matches 'noreply'",
        ),
        configuration_set="moodle-reminders",
        tags=(("category", "reengagement"), ("site", "moodle_1")),
        identity_arn="arn:aws:ses:eu-west-1:123456789012:identity/lms.example.edu",
    )
    assert expected == rs.classify(mail(PLAIN))


def test_reasons_of_absent_and_multipart() -> None:
    """`absent` and `multipart` explain themselves too."""
    rs = one_rule("{absent: [List-Id, Precedence], multipart: false}")
    assert rs.classify(mail(PLAIN)).reasons == ("no List-Id, Precedence header", "not multipart")


def test_ruleset_records_its_source() -> None:
    """The rule set names the file it came from (for logs and check-rules)."""
    assert str(rules.DEFAULT_RULES) == rules.load(rules.DEFAULT_RULES).source


ORIGINS = [
    ("relative", "web01:mod/reengagement/lib.php:546", True),
    ("line-547", "web01:mod/reengagement/lib.php:547", True),
    ("line-564", "web01:mod/reengagement/lib.php:564", True),
    ("line-565-trailing-space", "web01:mod/reengagement/lib.php:565 ", True),
    ("dirroot-prefix", "web01:/srv/moodle/mod/reengagement/lib.php:9", True),
    ("no-hostname", ":mod/reengagement/lib.php:1200", True),
    ("windows-path", "WIN:C:\\moodle\\mod\\reengagement\\lib.php:5", True),
    ("forum-lib", "web01:mod/forum/lib.php:546", False),
    ("moodlelib", "web01:lib/moodlelib.php:6353", False),
    ("other-plugin-file", "web01:mod/reengagement/locallib.php:5", False),
    ("lookalike-dir", "web01:mod/reengagementx/lib.php:546", False),
    ("backup-file", "web01:mod/reengagement/lib.php.orig:546", False),
    ("local-prefix-name", "web01:local/xmod/reengagement/lib.php:1", False),
    (
        "path-in-wwwroot",
        "https://m.example.org/mod/reengagement/lib.php => web01:index.php:3",
        False,
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"), [o[1:] for o in ORIGINS], ids=[o[0] for o in ORIGINS]
)
def test_shipped_origin_regex(value: str, expected: bool) -> None:
    """The shipped header regex accepts every way Moodle names mod/reengagement/lib.php, only it."""
    shipped = rules.load(rules.DEFAULT_RULES)
    if "=>" not in value:
        value = f"https://moodle.example.org => {value}"
    raw = message("To: Anna <anna@example.org>", f"X-Moodle-Originating-Script: {value}")
    decision = shipped.classify(mail(raw))
    assert expected == (decision.rule == "reengagement-student")


CC_TO = [
    ("quoted-self", '"tutor@example.org" <tutor@example.org>', "reengagement-cc"),
    ("unquoted-self", "tutor@example.org <tutor@example.org>", "reengagement-cc"),
    ("named", "Tutor Name <tutor@example.org>", "reengagement-student"),
    ("other-address", '"a@example.org" <b@example.org>', "reengagement-student"),
    ("bare-address", "tutor@example.org", "reengagement-student"),
]


@pytest.mark.parametrize(("to", "expected"), [c[1:] for c in CC_TO], ids=[c[0] for c in CC_TO])
def test_shipped_cc_rule(to: str, expected: str) -> None:
    """Only a To whose display name is its own address makes a re-engagement mail the CC copy."""
    shipped = rules.load(rules.DEFAULT_RULES)
    raw = message(f"To: {to}", f"X-Moodle-Originating-Script: {ORIGIN}")
    assert expected == shipped.classify(mail(raw)).rule


def test_a_rule_that_backtracks_without_end_does_not_hold(caplog: pytest.LogCaptureFixture) -> None:
    """`subject: '(a+)+$'` against a subject of forty a's and a b: Python's regex engine
    would take longer than the universe is old. The rule's test is cut off after RULE_TIME
    (SIGALRM), it does not hold, the next rule is tried, and a warning names the rule. Before,
    classify never returned: the delivery process hung on that mail at every restart."""
    ruleset_ = ruleset("""
        default: upstream
        rules:
          - name: greedy
            route: ses
            match: {subject: '(a+)+$'}
          - name: next
            route: ses
            match: {body: Hello}
        """)
    raw = message("To: anna@example.org", f"Subject: {'a' * 40}b")
    started = time.monotonic()
    decision = ruleset_.classify(mail(raw))
    took = time.monotonic() - started
    assert ("next", True) == (decision.rule, took < 3 * rules.RULE_TIME), took
    assert "event=rule_too_slow" in caplog.text and "rule=greedy" in caplog.text
    assert (signal.SIG_DFL, (0.0, 0.0)) == (
        signal.getsignal(signal.SIGALRM),
        signal.getitimer(signal.ITIMER_REAL),
    )  # put back as they were


def test_the_time_limit_does_not_raise_where_python_would_drop_it() -> None:
    """The alarm may come while a gc callback or a __del__ runs (hypothesis and others set
    gc callbacks): raised there, TooSlow was printed as "Exception ignored" and dropped, the
    rule's test went on without a limit, and the suite failed on the warning. There the
    alarm is put off by AGAIN seconds instead."""
    seen: list[bool] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        seen.append(timebox._in_finalizer(sys._getframe()))

    class Finalized:
        def __del__(self) -> None:
            seen.append(timebox._in_finalizer(sys._getframe()))

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    Finalized()
    assert (True, True, False) == (seen[0], seen[-1], timebox._in_finalizer(sys._getframe()))


PADDING = {
    "short-fields": "X-Pad: y\n" * 700_000,
    "folded-lines": "X-Junk: a\n" + " b\n" * 2_500_000,
}


@pytest.mark.parametrize("padding", PADDING.values(), ids=PADDING.keys())
def test_a_huge_header_block_still_routes_a_re_engagement_mail(padding: str) -> None:
    """A re-engagement CC mail (its marker near the top) padded to 7-10 MB of header block,
    with 700,000 short fields or one field of 2,500,000 folded lines: rules read each field
    up to HEADER_LIMIT and the fields in the first HEAD_LIMIT bytes, so the shipped rules
    still hold. The parse of it all ran past the rules' time limit, the view caught
    TooSlow as any error, saw no headers, and the mail went upstream unlogged; a first
    cut walked the folded lines in Python, past the limit again, once per rule."""
    shipped = rules.load(rules.DEFAULT_RULES)
    head = message("To: t@example.org <t@example.org>", f"X-Moodle-Originating-Script: {ORIGIN}")
    raw = head.replace("MIME-Version", padding + "MIME-Version", 1)
    decision = shipped.classify(mail(raw))
    assert ("reengagement-cc", Route.SES) == (decision.rule, decision.route)


def test_a_field_cut_at_its_limit_hides_none_after_it() -> None:
    """A Subject one byte over HEADER_LIMIT in a header block over HEAD_LIMIT: it is cut at
    a line's end, and the field after it is still read (a cut after its CR left a lone CR,
    which the parser took for the end of the header block)."""
    subject = "Subject: " + "z" * (HEADER_LIMIT - 10)
    raw = message(subject, "X-Mark: here", "X-Big: " + "q" * 300_000)
    assert ("here",) == MailView(mail(raw)).header("x-mark")


def test_a_time_limit_inside_the_views_parsing_is_not_swallowed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alarm comes while the view parses the header block, which reads leniently
    (`except Exception`): TooSlow is no Exception, so it reaches the time limit's owner
    instead of leaving the view with a head cut short (no headers: every rule on it fails
    without a word). Past the mail's own time, no rule holds and it is logged
    (`rule_too_slow`) as the README says."""
    padded = message("To: anna@example.org", *(f"X-Pad-{n}: {'y' * 20}" for n in range(9000)))
    with timebox.timebox() as box, pytest.raises(timebox.TooSlow):
        assert box is not None
        with box.limit(0.0005):
            _ = MailView(mail(padded)).headers
    monkeypatch.setattr(rules.ruleset, "MAIL_TIME", 0.0005)
    decision = one_rule("{header: {X-Pad-10: y}}").classify(mail(padded))
    assert (None, True) == (decision.rule, "event=rule_too_slow" in caplog.text)


def _empty_parts(size: int) -> bytes:
    part = b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    head = (
        b'Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    )
    return head + part * (size // len(part)) + b"--b--\r\n"


def _nested(depth: int) -> bytes:
    heads = [
        b'Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b0"\r\n\r\n'
    ]
    heads += [
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i - 1, i)
        for i in range(1, depth)
    ]
    return b"".join(heads) + b"--b%d\r\nContent-Type: text/plain\r\n\r\nx\r\n" % (depth - 1)


@pytest.mark.parametrize(
    "raw",
    [_empty_parts(10 * 1024 * 1024 - 4096), _nested(5000), _empty_parts(200_000)],
    ids=["10-MiB-of-empty-parts", "5000-deep", "200-KB-of-empty-parts"],
)
def test_a_mime_bomb_costs_the_rules_no_more_than_a_mail(
    raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Any client's 10 MiB of empty MIME parts, or 5,000 levels of nesting, against body and
    multipart rules: classified in well under a second, its body not read (none of those
    rules holds). Each took 2 s (the whole mail parsed, each rule stopped at its limit and
    the parse begun again for the next); a claim of 16 stopped the delivery loop for 32 s,
    and the process was killed as hung and restarted, to claim the same 16 again."""
    ruleset_ = ruleset("""
        default: upstream
        rules:
          - {name: marker, route: ses, match: {body: 'reengagement'}}
          - {name: cc, route: ses, match: {body: 'cc-marker'}}
          - {name: single, route: ses, match: {multipart: false}}
        """)
    started = time.monotonic()
    decision = ruleset_.classify(mail(raw))
    took = time.monotonic() - started
    assert (None, True) == (decision.rule, took < 0.2), took
    assert "event=body_not_read" in caplog.text


def test_a_mails_rules_together_stop_at_mail_time(caplog: pytest.LogCaptureFixture) -> None:
    """Eight rules that each run to their own limit on one mail: classify returns after
    MAIL_TIME, not eight times RULE_TIME, and the rules left do not hold."""
    listed = "\n".join(
        f"  - {{name: greedy{n}, route: ses, match: {{subject: '(a+)+$'}}}}" for n in range(8)
    )
    ruleset_ = ruleset(f"default: upstream\nrules:\n{listed}\n")
    started = time.monotonic()
    decision = ruleset_.classify(mail(message(f"Subject: {'a' * 40}b")))
    took = time.monotonic() - started
    assert 8 * rules.RULE_TIME > rules.ruleset.MAIL_TIME + 0.5
    assert (None, True) == (decision.rule, took < rules.ruleset.MAIL_TIME + 0.3), took
    assert 8 == caplog.text.count("event=rule_too_slow")


def test_a_marker_in_a_mail_with_a_large_attachment_is_read() -> None:
    """Moodle's marker in the text part of a mail with 3 MiB attached: read (the text comes
    before the attachment, inside the first MiB the rules parse)."""
    attachment = base64.encodebytes(b"\0" * (3 * 1024 * 1024)).replace(b"\n", b"\r\n")
    raw = (
        b'Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nYour reengagement reminder\r\n"
        b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + attachment
        + b"--b--\r\n"
    )
    assert hit("{body: 'reengagement reminder'}", raw)
    assert hit("{multipart: true}", raw)


def test_a_forum_digest_of_hundreds_of_posts_is_read() -> None:
    """Moodle's forum digest puts two lines of dashes in each post, and a signature starts
    "-- ": 300 posts are 600 lines starting "--", not 600 MIME parts. Counted as boundaries,
    the digest's body went unread and a body or multipart rule no longer held."""
    post = (
        "Topic {n}\r\nby Dr. Jane Doe\r\n"
        + "-" * 69
        + "\r\nRead the notes.\r\n"
        + "-" * 69
        + "\r\nSee this post in context\r\n-- \r\nBIO101\r\n"
    )
    body = "".join(post.format(n=n) for n in range(300))
    raw = (
        "Subject: digest\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1_x"\r\n\r\n'
        f"--b1_x\r\nContent-Type: text/plain\r\n\r\n{body}"
        "--b1_x\r\nContent-Type: text/html\r\n\r\n<p>digest</p>\r\n--b1_x--\r\n"
    )
    assert hit("{body: 'See this post in context'}", raw)
    assert hit("{multipart: true}", raw)
