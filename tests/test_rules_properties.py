"""Properties: classify never raises on any bytes; the loader lets only ConfigError escape."""

from __future__ import annotations

import base64

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import rules
from relay.errors import ConfigError
from relay.mail import Mail
from relay.rules import Decision

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every condition kind, so each one meets every kind of input.
EVERYTHING = rules.parse(
    r"""
rules:
  - name: everything
    route: ses
    match:
      any:
        - header: {X-Moodle-Originating-Script: 'mod/reengagement/lib\.php:\d+\s*$'}
        - all: [{absent: [List-Id]}, {subject: 'ü'}]
        - {sender: '^$', recipient: '@'}
        - body: '\[\[relay:reengagement\]\]'
        - not: {multipart: false}
        - header: {To: '^\s*"?([^"<>\s]+@[^"<>\s]+)"?\s*<\1>\s*$', Content-Type: 'html'}
""",
    "everything.yaml",
)
SHIPPED = rules.load(rules.DEFAULT_RULES)

header_names = st.sampled_from(
    [
        "Subject",
        "To",
        "From",
        "Content-Type",
        "Content-Transfer-Encoding",
        "List-Id",
        "X-Moodle-Originating-Script",
        "MIME-Version",
        "Content-Disposition",
    ]
)
header_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "multipart/alternative; boundary=b",
            'multipart/mixed; boundary=""',
            "text/html; charset=nonexistent-charset",
            "text/plain; charset=utf-16",
            'text/plain; charset="rot13"',
            "base64",
            "quoted-printable",
            "=?UTF-8?B?!!!notbase64?=",
            "=?x-unknown?Q?=FF=FE?=",
            "=?utf-8?q?=E2=80?= =?utf-8?b?w6Q=?=",
            '"a@b.org" <a@b.org>',
            "<",
            "attachment; filename*=utf-8''%FF",
        ]
    ),
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=100).map(base64.encodebytes),
    st.just(b"--b\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b--\r\n"),
    st.just(b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" * 20),
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """Header lines from a mix of plausible and hostile values, then a body of any bytes."""
    lines = []
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=8)):
        lines.append(f"{name}: {value}".encode("utf-8", "surrogatepass"))
    separator = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    return separator.join([*lines, b"", draw(bodies)])


def classify_both(raw: bytes, sender: str, recipients: tuple[str, ...]) -> None:
    mail = Mail(id="h", sender=sender, recipients=recipients, raw=raw)
    for ruleset in (EVERYTHING, SHIPPED):
        assert isinstance(ruleset.classify(mail), Decision)


@BOUNDED
@given(raw=st.binary(max_size=2000))
def test_classify_any_bytes(raw: bytes) -> None:
    """Arbitrary bytes classify to a Decision, never an exception."""
    classify_both(raw, "", ())


@BOUNDED
@given(raw=messages(), sender=st.text(max_size=30), recipients=st.lists(st.text(max_size=30)))
def test_classify_hostile_mime(raw: bytes, sender: str, recipients: list[str]) -> None:
    """Broken MIME, unknown charsets, bad encodings and odd envelopes still classify."""
    classify_both(raw, sender, tuple(recipients))


def test_classify_deeply_nested_multipart() -> None:
    """Pathologically nested multiparts classify (the parser's limits are not ours to hit)."""
    part = b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n"
    raw = b"".join(part % (i, i) for i in range(2000)) + b"Content-Type: text/plain\r\n\r\nx"
    classify_both(raw, "", ())


def check_loader(text: str) -> None:
    try:
        loaded = rules.parse(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        assert all(p.file == "fuzz.yaml" for p in exc.problems)
    else:
        assert isinstance(loaded, rules.RuleSet)


@BOUNDED
@given(text=st.text(max_size=300))
def test_loader_any_text(text: str) -> None:
    """Any text at all: a RuleSet or a ConfigError, nothing else."""
    check_loader(text)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.sampled_from(["ses", "upstream", "(", "a+", "", "x" * 300, "2020-99-99", "?P<", "[[x]]"]),
    st.text(max_size=12),
)
keys = st.sampled_from(
    [
        "name",
        "route",
        "match",
        "ses",
        "description",
        "header",
        "absent",
        "sender",
        "recipient",
        "subject",
        "body",
        "multipart",
        "all",
        "any",
        "not",
        "tags",
        "configuration_set",
        "To",
        "default",
        "rules",
        "bogus",
    ]
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=25,
)


@st.composite
def rule_files(draw: st.DrawFn) -> str:
    """YAML documents shaped roughly like rules.yaml, with wrong values anywhere."""
    rule_list = draw(st.lists(st.dictionaries(keys, trees, max_size=6), max_size=4))
    doc: dict[str, object] = {"rules": rule_list}
    if draw(st.booleans()):
        doc["default"] = draw(scalars)
    return yaml.safe_dump(doc, allow_unicode=True)


@BOUNDED
@given(text=rule_files())
def test_loader_structures(text: str) -> None:
    """Rule-shaped documents with arbitrary structure and values: RuleSet or ConfigError only."""
    check_loader(text)


@pytest.mark.parametrize(
    ("name", "route", "match", "line"),
    [
        ("2020-99-99", "ses", "{subject: a}", 2),
        ("a", "2020-99-99", "{subject: a}", 3),
        ("a", "ses", "{multipart: 2020-99-99}", 4),
        ("a", "ses", "{body: 2020-99-99}", 4),
        ("a", "ses", "{absent: [2020-99-99]}", 4),
    ],
    ids=["name", "route", "multipart", "regex", "absent"],
)
def test_loader_impossible_date(name: str, route: str, match: str, line: int) -> None:
    """A scalar YAML resolves as an impossible date is a problem at its line, not a ValueError."""
    text = f"rules:\n  - name: {name}\n    route: {route}\n    match: {match}\n"
    with pytest.raises(ConfigError) as caught:
        rules.parse(text, "dates.yaml")
    expected = [(line, "unreadable value: month must be in 1..12")]
    actual = [(p.line, p.message) for p in caught.value.problems]
    assert expected == actual


def test_loader_deep_nesting() -> None:
    """Absurdly deep `not` nesting is a problem, not a RecursionError."""
    depth = 3000
    text = "rules:\n  - name: a\n    route: ses\n    match: " + "{not: " * depth + "{subject: a}"
    check_loader(text + "}" * depth + "\n")
