"""Loading rules.yaml: every problem is reported, each with file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay import rules
from relay.cli import main
from relay.errors import ConfigError, Problem


def problems(text: str) -> list[tuple[int | None, str, str]]:
    """(line, key, message) of every problem in the rules `text` (dedented)."""
    with pytest.raises(ConfigError) as caught:
        rules.parse(textwrap.dedent(text).lstrip("\n"), "rules.yaml")
    assert all(p.file == "rules.yaml" for p in caught.value.problems)
    return [(p.line, p.key, p.message) for p in caught.value.problems]


def lines_and_keys(text: str) -> list[tuple[int | None, str]]:
    """Only where the problems are: (line, key)."""
    return [(line, key) for line, key, _ in problems(text)]


BAD_REGEX_AND_UNKNOWN_KEY = """\
default: upstream
rules:
  - name: reengagement
    route: ses
    match:
      header:
        X-Moodle-Originating-Script: 'mod/reengagement/lib\\.php:(\\d+'
  - name: forum
    route: upstream
    match:
      absent: [List-Id]
      bodyy: 'Forum'
"""


def test_bad_regex_and_unknown_key_both_reported() -> None:
    """A bad regex (line 7) and an unknown key (line 12) are both reported, with the regex error."""
    expected = [
        (
            7,
            "rules[0].match.header.X-Moodle-Originating-Script",
            "invalid regular expression 'mod/reengagement/lib\\.php:(\\d+': "
            "missing ), unterminated subpattern at position 26",
        ),
        (
            12,
            "rules[1].match.bodyy",
            "unknown key (valid: absent, all, any, body, header, multipart, not, recipient, "
            "sender, subject)",
        ),
    ]
    assert expected == problems(BAD_REGEX_AND_UNKNOWN_KEY)


def test_a_posix_class_python_does_not_have_is_a_problem_at_its_line() -> None:
    """`[[:digit:]]` is no POSIX class in Python but a set of ':', 'd', ... then a ']': it
    does not mean what it says, and Python warns of a nested set at each load (under
    pytest's warnings-as-errors, the loader raised instead of reporting a problem)."""
    text = "rules:\n  - name: x\n    route: ses\n    match:\n      sender: '[[:digit:]]'\n"
    assert [
        (
            5,
            "rules[0].match.sender",
            "regular expression '[[:digit:]]': Possible nested set at position 1:"
            " write '\\[' for a literal '['",
        )
    ] == problems(text)


def test_cli_check_rules_reports_both_lines(tmp_path: Path) -> None:
    """`relay check-rules --rules bad.yaml` exits 1 and prints both problems as file:line: key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_REGEX_AND_UNKNOWN_KEY)
    mail = tmp_path / "m.eml"
    mail.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    result = CliRunner().invoke(main, ["check-rules", "--rules", str(bad), str(mail)])
    expected_prefixes = [
        f"{bad}:7: rules[0].match.header.X-Moodle-Originating-Script: invalid regular expression",
        f"{bad}:12: rules[1].match.bodyy: unknown key",
    ]
    errors = result.stderr.splitlines()
    actual = [line[: len(p)] for line, p in zip(errors, expected_prefixes, strict=False)]
    assert expected_prefixes == actual
    expected = (1, 2, "")
    assert expected == (result.exit_code, len(errors), result.stdout)


def test_duplicate_rule_names() -> None:
    """A second rule with a taken name is a problem on its name line, citing the first."""
    found = problems("""
        rules:
          - name: same
            route: ses
            match: {subject: a}
          - name: same
            route: upstream
            match: {subject: b}
        """)
    expected = [(5, "rules[1].name", "duplicate rule name 'same' (first at line 2)")]
    assert expected == found


def test_unknown_route_lists_valid_ones() -> None:
    """An unknown route, in a rule or as default, says which routes exist."""
    found = problems("""
        default: smtp
        rules:
          - name: a
            route: sess
            match: {subject: a}
        """)
    expected = [
        (1, "default", "'smtp' is not one of: ses, upstream"),
        (4, "rules[0].route", "'sess' is not one of: ses, upstream"),
    ]
    assert expected == found


def test_a_route_yaml_reads_as_true_or_false_says_to_quote_it() -> None:
    """`on` and `off` are booleans to YAML 1.1; the problem says so, as relay.yaml's `mode:`
    does, not only "expected a string"."""
    found = problems("""
        default: on
        rules:
          - name: a
            route: off
            match: {subject: a}
        """)
    expected = [
        (1, "default", "on is read as true or false: quote it, or one of: ses, upstream"),
        (4, "rules[0].route", "off is read as true or false: quote it, or one of: ses, upstream"),
    ]
    assert expected == found


def test_missing_name_route_match() -> None:
    """A rule without name, route or match is a problem on the rule's first line, one per key."""
    found = problems("""
        rules:
          - description: nothing else
          - name: ok
            route: ses
            match: {subject: a}
        """)
    expected = [
        (2, "rules[0]", "missing required key 'name'"),
        (2, "rules[0]", "missing required key 'route'"),
        (2, "rules[0]", "missing required key 'match'"),
    ]
    assert expected == found


WRONG_TYPES = [
    ("rules-not-list", "rules: {a: 1}\n", [(1, "rules")]),
    ("rule-not-mapping", "rules:\n  - just a string\n", [(2, "rules[0]")]),
    (
        "name-not-string",
        "rules:\n  - name: [a]\n    route: ses\n    match: {subject: a}\n",
        [(2, "rules[0].name")],
    ),
    (
        "regex-not-string",
        "rules:\n  - name: a\n    route: ses\n    match: {subject: {x: 1}}\n",
        [(4, "rules[0].match.subject")],
    ),
    (
        "multipart-not-bool",
        "rules:\n  - name: a\n    route: ses\n    match:\n      multipart: 'yes please'\n",
        [(5, "rules[0].match.multipart")],
    ),
    (
        "header-not-mapping",
        "rules:\n  - name: a\n    route: ses\n    match:\n      header: List-Id\n",
        [(5, "rules[0].match.header")],
    ),
    (
        "absent-not-list",
        "rules:\n  - name: a\n    route: ses\n    match:\n      absent: List-Id\n",
        [(5, "rules[0].match.absent")],
    ),
    (
        "any-empty",
        "rules:\n  - name: a\n    route: ses\n    match:\n      any: []\n",
        [(5, "rules[0].match.any")],
    ),
    (
        "not-a-list",
        "rules:\n  - name: a\n    route: ses\n    match:\n      not: [{subject: a}]\n",
        [(5, "rules[0].match.not")],
    ),
    (
        "match-empty",
        "rules:\n  - name: a\n    route: ses\n    match: {}\n",
        [(4, "rules[0].match")],
    ),
    (
        "tag-value-int",
        "rules:\n  - name: a\n    route: ses\n    ses: {tags: {n: 2}}\n    match: {subject: a}\n",
        [(4, "rules[0].ses.tags.n")],
    ),
    ("top-not-mapping", "- a\n- b\n", [(1, "")]),
    ("unknown-top-key", "rules: []\ndefualt: ses\n", [(2, "defualt")]),
]


@pytest.mark.parametrize(
    ("text", "expected"), [w[1:] for w in WRONG_TYPES], ids=[w[0] for w in WRONG_TYPES]
)
def test_wrong_types(text: str, expected: list[tuple[int, str]]) -> None:
    """A value of the wrong type is a problem at its own line and key."""
    assert expected == lines_and_keys(text)


def test_nested_problems_all_reported() -> None:
    """Problems deep in combinators are found alongside the others, none stopping the rest."""
    found = lines_and_keys("""
        rules:
          - name: a
            route: ses
            match:
              any:
                - all:
                    - subject: '['
                    - not: {body: '(?P<x'}
                - sender: '*'
          - name: b
            route: upstream
            match: {recipient: '+'}
        """)
    expected = [
        (7, "rules[0].match.any[0].all[0].subject"),
        (8, "rules[0].match.any[0].all[1].not.body"),
        (9, "rules[0].match.any[1].sender"),
        (12, "rules[1].match.recipient"),
    ]
    assert expected == found


def test_yaml_syntax_error_has_its_line() -> None:
    """A YAML syntax error is one problem at the line where the broken construct began."""
    found = problems("""
        rules:
          - name: a
            route: ses
            match: {subject: 'unclosed}
          - name: b
        """)
    # PyYAML gives up at the end of the file; its context mark points at the opening quote.
    expected = [
        (
            4,
            "",
            "YAML syntax error: found unexpected end of stream (while scanning a quoted scalar)",
        )
    ]
    assert expected == found


@pytest.mark.parametrize(
    "text",
    ["rules:\n  - name: a\n\troute: ses\n", "rules:\n  - name: a\n    match: {subject: a]\n"],
    ids=["tab-indent", "bracket-mismatch"],
)
def test_yaml_syntax_error_exact_line(text: str) -> None:
    """A tab used for indentation or a mismatched bracket is reported at its line."""
    found = problems(text)
    expected = [3]
    assert expected == [line for line, _, _ in found]


def test_empty_file() -> None:
    """An empty rules file is a problem, not an empty rule set."""
    expected = [(1, "", "the file is empty")]
    assert expected == problems("")


SES_VALUES = [
    ("rule-name-space", "rules:\n  - name: a b\n    route: ses\n    match: {subject: a}\n", 2),
    (
        "rule-name-too-long",
        f"rules:\n  - name: {'a' * 257}\n    route: ses\n    match: {{subject: a}}\n",
        2,
    ),
    (
        "config-set-dot",
        "rules:\n  - name: a\n    route: ses\n    ses: {configuration_set: a.b}\n"
        "    match: {subject: a}\n",
        4,
    ),
    (
        "identity-arn-domain",
        "rules:\n  - name: a\n    route: ses\n    ses: {identity_arn: example.org}\n"
        "    match: {subject: a}\n",
        4,
    ),
    (
        "tag-name-colon",
        "rules:\n  - name: a\n    route: ses\n    ses:\n      tags:\n        'ses:x': y\n"
        "    match: {subject: a}\n",
        6,
    ),
    (
        "tag-value-slash",
        "rules:\n  - name: a\n    route: ses\n    ses:\n      tags:\n        x: a/b\n"
        "    match: {subject: a}\n",
        6,
    ),
    (
        "reserved-tag-name",
        "rules:\n  - name: a\n    route: ses\n    ses:\n      tags:\n        rule: b\n"
        "    match: {subject: a}\n",
        6,
    ),
    (
        "unknown-ses-key",
        "rules:\n  - name: a\n    route: ses\n    ses:\n      configuration: x\n"
        "    match: {subject: a}\n",
        5,
    ),
    (
        "bad-header-name",
        "rules:\n  - name: a\n    route: ses\n    match:\n      absent: ['List Id']\n",
        5,
    ),
]


@pytest.mark.parametrize(
    ("text", "line"), [s[1:] for s in SES_VALUES], ids=[s[0] for s in SES_VALUES]
)
def test_values_ses_and_headers_accept(text: str, line: int) -> None:
    """Names, tags and configuration sets outside what SES accepts are problems at their line."""
    expected = [line]
    assert expected == [found_line for found_line, _, _ in problems(text)]


def test_load_unreadable_file(tmp_path: Path) -> None:
    """A missing rules file is a ConfigError naming the file, not an OSError."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        rules.load(missing)
    expected = [str(missing)]
    assert expected == [p.file for p in caught.value.problems]


def test_problem_text_is_file_line_key_message() -> None:
    """Problems print as file:line: key: message, the form check-rules and check-config use."""
    with pytest.raises(ConfigError) as caught:
        rules.parse("rules:\n  - name: a\n    route: x\n    match: {subject: a}\n", "r.yaml")
    problem = Problem(
        file="r.yaml", line=3, key="rules[0].route", message="'x' is not one of: ses, upstream"
    )
    expected = ((problem,), "r.yaml:3: rules[0].route: 'x' is not one of: ses, upstream")
    assert expected == (caught.value.problems, str(caught.value))


def test_shipped_rules_load() -> None:
    """The shipped rules.yaml loads, and ./rules.yaml at the top of the repo is the same file."""
    shipped = rules.load(rules.DEFAULT_RULES)
    expected = ["reengagement-cc", "reengagement-student"]
    assert expected == [r.name for r in shipped.rules]
    top = Path(__file__).parent.parent / "rules.yaml"
    assert top.resolve() == rules.DEFAULT_RULES.resolve()


def test_check_config_reports_the_rules_problems_even_when_relay_yaml_has_some(
    tmp_path: Path,
) -> None:
    """relay.yaml with a bad `mode` and a rules file with a bad regex: `relay check-config`
    prints both problems, each with file:line, and exits 1 (it used to stop at relay.yaml's)."""
    bad_rules = tmp_path / "rules.yaml"
    bad_rules.write_text(
        "rules:\n  - name: a\n    route: ses\n    match: {subject: '('}\n", encoding="utf-8"
    )
    config = tmp_path / "relay.yaml"
    config.write_text(
        "mode: bogus\nrules: rules.yaml\nupstream: {host: 127.0.0.1}\n", encoding="utf-8"
    )
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    errors = result.stderr.splitlines()
    assert 1 == result.exit_code, result.output
    expected = [f"{config}:1: mode:", f"{bad_rules}:4: rules[0].match.subject:"]
    assert expected == [line[: len(p)] for line, p in zip(errors, expected, strict=True)], errors


def test_a_rules_identity_in_another_region_than_ses_region_is_a_problem_at_its_line(
    tmp_path: Path,
) -> None:
    """A rule's `ses.identity_arn` of us-east-1 with relay.yaml's `ses.region: eu-west-1`:
    SES refuses every send for it through eu-west-1, and each such mail went upstream after
    an SES call, while check-config said ok. Now `relay check-config` names the rule's line,
    and relay serve refuses the rules at start and at a reload (the same `rules.load`); the
    Region `*` and the same Region pass."""
    rules_file = tmp_path / "rules.yaml"
    arn = "arn:aws:ses:{}:123456789012:identity/lms.example.edu"
    rule = "rules:\n  - name: a\n    route: ses\n    ses: {{identity_arn: '{}'}}\n"
    config = tmp_path / "relay.yaml"
    config.write_text(
        "rules: rules.yaml\nupstream: {host: 127.0.0.1}\nses: {region: eu-west-1}\n",
        encoding="utf-8",
    )
    rules_file.write_text(rule.format(arn.format("us-east-1")) + "    match: {subject: a}\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert 1 == result.exit_code, result.output
    assert [
        f"{rules_file}:4: rules[0].ses.identity_arn: its Region is us-east-1, and ses.region"
        " is eu-west-1: SES sends for an identity only through the Region it was verified in"
        " (or `*` in the ARN, for an identity in the Global endpoints' Regions)"
    ] == result.stderr.splitlines()
    for region in ("eu-west-1", "*"):
        rules_file.write_text(rule.format(arn.format(region)) + "    match: {subject: a}\n")
        result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
        assert 0 == result.exit_code, result.output
    assert rules.parse(rule.format(arn.format("us-east-1")) + "    match: {subject: a}\n", "r")


def test_check_config_on_a_file_nested_too_deeply_says_so_without_a_traceback(
    tmp_path: Path,
) -> None:
    """3,000 nested lists: `relay check-config` reports it in one line and exits 1 (reading
    the rules file's name from it raised RecursionError, a traceback)."""
    config = tmp_path / "relay.yaml"
    config.write_text("retry: " + "[" * 3000 + "]" * 3000 + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert 1 == result.exit_code, result.output
    assert [f"{config}: YAML nested too deeply"] == result.stderr.splitlines()


def test_check_config_on_an_impossible_date_says_so_without_a_traceback(tmp_path: Path) -> None:
    """A value YAML reads as a date that cannot be (`2024-13-01`): `relay check-config`
    names it once and exits 1; reading the rules file's name from relay.yaml raised
    ValueError, a traceback (check-rules too, with relay.yaml in the current directory)."""
    config = tmp_path / "relay.yaml"
    config.write_text(
        "upstream: {host: 127.0.0.1}\nses:\n  configuration_set: 2024-13-01\n", encoding="utf-8"
    )
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert 1 == result.exit_code, result.output
    expected = f"{config}:3: ses.configuration_set: unreadable value: month must be in 1..12"
    assert [expected] == result.stderr.splitlines()


SHIPPED_UPSIDE_DOWN = """\
rules:
  - name: student
    route: ses
    match:
      header: {X-Moodle-Originating-Script: 'mod/reengagement/lib\\.php'}
  - name: cc
    route: ses
    ses: {tags: {category: cc}}
    match:
      header:
        X-Moodle-Originating-Script: 'mod/reengagement/lib\\.php'
        To: '^\\s*"?([^"<>\\s@]+@[^"<>\\s]+)"?\\s*<\\1>\\s*$'
  - name: forum-digest
    route: upstream
    match: {any: [{subject: digest}, {sender: forum}]}
  - name: forum
    route: upstream
    match: {subject: digest}
  - name: lists
    route: upstream
    match: {all: [{absent: [List-Id]}, {subject: x}], sender: y}
  - name: lists-y
    route: ses
    match: {sender: y, subject: x, absent: [List-Id], recipient: z}
"""


def test_a_rule_an_earlier_rule_always_takes_the_mail_from_is_a_warning_at_its_line(
    tmp_path: Path,
) -> None:
    """The shipped rules upside down (the student rule first: every CC copy went by it,
    with its tags and configuration set, and nothing said so) load, with a warning at the
    CC rule's line naming the rule that takes its mail; `relay check-config` prints it and
    exits 0. So does a rule whose conditions include all of an earlier one's (`all:` and
    a mapping's keys flattened); an `any:` above a rule is not read into (no warning)."""
    path = tmp_path / "rules.yaml"
    path.write_text(SHIPPED_UPSIDE_DOWN, encoding="utf-8")
    loaded = rules.load(path)
    assert ["student", "cc", "forum-digest", "forum", "lists", "lists-y"] == [
        r.name for r in loaded.rules
    ]
    expected = [
        f"{path}:6: rule 'cc' never decides: rule 'student' (line 2) above it asks nothing"
        " 'cc' does not ask, so it takes every mail 'cc' matches; put 'cc' first, or remove it",
        f"{path}:22: rule 'lists-y' never decides: rule 'lists' (line 19) above it asks"
        " nothing 'lists-y' does not ask, so it takes every mail 'lists-y' matches; put"
        " 'lists-y' first, or remove it",
    ]
    assert expected == list(loaded.warnings)
    assert () == rules.load(rules.DEFAULT_RULES).warnings
    config = tmp_path / "relay.yaml"
    config.write_text("rules: rules.yaml\nupstream: {host: 127.0.0.1}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert 0 == result.exit_code, result.output
    assert [f"warning: {line}" for line in expected] == result.stderr.splitlines()
