"""Every corpus message goes where tests/corpus/expected.yaml says, by API and by CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay import rules
from relay.cli import main
from tests.support.corpus import CORPUS, Expected, expectations, shipped_with_marker_rules

EXPECTED = expectations()
IDS = [e.name for e in EXPECTED]


@pytest.fixture(scope="module")
def shipped() -> rules.RuleSet:
    """The rules shipped in relay/rules/rules.yaml."""
    return rules.load(rules.DEFAULT_RULES)


@pytest.fixture(scope="module")
def with_marker() -> rules.RuleSet:
    """The shipped rules with the commented body-marker alternative enabled."""
    return rules.parse(shipped_with_marker_rules(), "rules.yaml (marker enabled)")


def test_corpus_is_complete() -> None:
    """Each .eml in the corpus has an expectation and each expectation a file."""
    on_disk = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.eml"))
    assert on_disk == sorted(IDS)
    assert len(on_disk) >= 30


def test_corpus_files_are_crlf() -> None:
    """Corpus mails are written as they travel over SMTP: every line ends in CRLF."""
    bare_lf = [e.name for e in EXPECTED if b"\n" in e.path.read_bytes().replace(b"\r\n", b"")]
    assert bare_lf == []


@pytest.mark.parametrize("case", EXPECTED, ids=IDS)
def test_shipped_rules(case: Expected, shipped: rules.RuleSet) -> None:
    """The shipped rules send each message by the expected rule and route."""
    decision = shipped.classify(case.mail())
    assert (case.rule, case.route) == (decision.rule, decision.route.value)
    if case.rule is not None:
        assert decision.reasons


@pytest.mark.parametrize("case", EXPECTED, ids=IDS)
def test_marker_rules(case: Expected, with_marker: rules.RuleSet) -> None:
    """With the body-marker alternative enabled, marked mail goes to SES and nothing else moves."""
    decision = with_marker.classify(case.mail())
    route = "upstream" if case.marker_rule is None else "ses"
    assert (case.marker_rule, route) == (decision.rule, decision.route.value)


def test_marker_rules_keep_the_header_rules_first(with_marker: rules.RuleSet) -> None:
    """Enabling the alternative appends rules; the header rules still come first."""
    expected = [
        "reengagement-cc",
        "reengagement-student",
        "reengagement-cc-marker",
        "reengagement-student-marker",
    ]
    assert expected == [rule.name for rule in with_marker.rules]


def test_cli_json_over_the_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """`relay check-rules --json tests/corpus` agrees with the expectations, one line each."""
    monkeypatch.chdir(CORPUS)  # no ./rules.yaml here: the shipped defaults apply
    result = CliRunner().invoke(main, ["check-rules", "--json", "."])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    actual = {line["source"].removeprefix("./"): (line["rule"], line["route"]) for line in lines}
    expected = {e.name: (e.rule, e.route) for e in EXPECTED}
    assert expected == actual
    assert all(set(line) == {"source", "rule", "route", "reasons"} for line in lines)


def test_cli_subprocess_over_the_corpus(tmp_path: Path) -> None:
    """The same through a real process: exit 0 and one JSON line per corpus message."""
    command = [sys.executable, "-c", "from relay.cli import main; main()"]
    done = subprocess.run(
        [*command, "check-rules", "--json", str(CORPUS)],
        cwd=tmp_path,  # no ./rules.yaml here
        capture_output=True,
        check=False,
        timeout=60,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    actual = {Path(line["source"]).relative_to(CORPUS).as_posix(): line["route"] for line in lines}
    expected = {e.name: e.route for e in EXPECTED}
    assert (0, b"", expected) == (done.returncode, done.stderr, actual)
