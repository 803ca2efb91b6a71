"""`relay check-rules`: inputs (files, directories, stdin), broken input, table and JSON output."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay import rules
from relay.cli import main
from relay.ops import checkrules
from tests.support.corpus import CORPUS
from tests.support.processes import relay_cli

CC = CORPUS / "reengagement" / "cc-564.eml"
STUDENT = CORPUS / "reengagement" / "student-html-564.eml"
FORUM = CORPUS / "lookalike" / "forum-post.eml"


def check_rules(*args: str, stdin: bytes | None = None) -> Result:
    """Run `relay check-rules ARGS` in-process."""
    return CliRunner().invoke(main, ["check-rules", *args], input=stdin)


def json_lines(result: Result) -> list[dict[str, object]]:
    """The JSON objects check-rules --json printed, one per line."""
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(autouse=True)
def _no_local_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory, so no ./rules.yaml is picked up unless a test writes one."""
    monkeypatch.chdir(tmp_path)


def test_json_one_object_per_message() -> None:
    """--json prints source, rule, route and the full reasons, one line per message."""
    result = check_rules("--json", str(CC), str(FORUM))
    expected = [
        {
            "source": str(CC),
            "rule": "reengagement-cc",
            "route": "ses",
            "reasons": [
                "header X-Moodle-Originating-Script matches "
                "'(?:^|[\\s:/\\\\])mod[/\\\\]reengagement[/\\\\]lib\\.php:\\s*\\d+\\s*$'",
                'header To matches \'^\\s*"?([^"<>\\s@]+@[^"<>\\s]+)"?\\s*<\\1>\\s*$\'',
            ],
        },
        {"source": str(FORUM), "rule": None, "route": "upstream", "reasons": []},
    ]
    assert (0, expected) == (result.exit_code, json_lines(result))


def test_table_and_summary() -> None:
    """The default output is an aligned table, reasons without their regexes, and a summary."""
    result = check_rules(str(CC), str(STUDENT), str(FORUM))
    header, *rows, summary = result.stdout.splitlines()
    rule, route, reasons = (header.index(name) for name in ("RULE", "ROUTE", "REASONS"))
    expected = [
        [str(CC), "reengagement-cc", "ses", "header X-Moodle-Originating-Script, header To"],
        [str(STUDENT), "reengagement-student", "ses", "header X-Moodle-Originating-Script"],
        [str(FORUM), "-", "upstream", "(default route)"],
    ]
    cells = [
        [row[:rule].strip(), row[rule:route].strip(), row[route:reasons].strip(), row[reasons:]]
        for row in rows
    ]
    assert expected == cells
    expected_summary = f"3 messages: 2 ses, 1 upstream, 0 unreadable (rules: {rules.DEFAULT_RULES})"
    assert (0, expected_summary) == (result.exit_code, summary)


def test_the_shipped_rules_upside_down_say_which_rule_never_decides(tmp_path: Path) -> None:
    """The student rule moved above the CC rule: the CC copy goes by the student rule (its
    tags, its configuration set), and check-rules says why before its table: a warning at
    the CC rule's line naming the rule that takes its mail. Exit 0: the rules load."""
    shipped = rules.DEFAULT_RULES.read_text(encoding="utf-8")
    head, cc_and_student = shipped.split("  - name: reengagement-cc", 1)
    cc, student = cc_and_student.split("  - name: reengagement-student", 1)
    path = tmp_path / "rules.yaml"
    path.write_text(
        f"{head}  - name: reengagement-student{student}\n  - name: reengagement-cc{cc}",
        encoding="utf-8",
    )
    result = check_rules("--rules", str(path), "--json", str(CC))
    student_line = 1 + path.read_text().splitlines().index("  - name: reengagement-student")
    cc_line = 1 + path.read_text().splitlines().index("  - name: reengagement-cc")
    assert [
        f"warning: {path}:{cc_line}: rule 'reengagement-cc' never decides: rule"
        f" 'reengagement-student' (line {student_line}) above it asks nothing"
        " 'reengagement-cc' does not ask, so it takes every mail 'reengagement-cc' matches;"
        " put 'reengagement-cc' first, or remove it"
    ] == result.stderr.splitlines()
    assert (0, "reengagement-student") == (result.exit_code, json_lines(result)[0]["rule"])


def test_directory_recursive_sorted(tmp_path: Path) -> None:
    """A directory is searched recursively for *.eml, in sorted order; other files are skipped."""
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "b" / "deep" / "z.eml").write_bytes(CC.read_bytes())
    (tmp_path / "a.eml").write_bytes(FORUM.read_bytes())
    (tmp_path / "b" / "notes.txt").write_text("not mail")
    (tmp_path / "b" / "c.EML").write_bytes(STUDENT.read_bytes())
    result = check_rules("--json", str(tmp_path))
    expected = [
        (str(tmp_path / "a.eml"), "upstream"),
        (str(tmp_path / "b" / "c.EML"), "ses"),
        (str(tmp_path / "b" / "deep" / "z.eml"), "ses"),
    ]
    assert expected == [(line["source"], line["route"]) for line in json_lines(result)]


def test_a_pipe_named_eml_in_a_directory_is_reported_not_read(tmp_path: Path) -> None:
    """A named pipe called x.eml in a directory: reading it waited for a writer for good
    (`relay check-rules DIR` hung). It is reported unreadable, and the rest classified."""
    os.mkfifo(tmp_path / "x.eml")
    (tmp_path / "y.eml").write_bytes(CC.read_bytes())
    done = relay_cli("check-rules", "--json", str(tmp_path), timeout=10)
    assert 1 == done.returncode, done.stderr
    assert [
        {"source": str(tmp_path / "x.eml"), "error": checkrules.IRREGULAR},
        {"source": str(tmp_path / "y.eml"), "route": "ses"},
    ] == [
        {k: v for k, v in json.loads(line).items() if k in ("source", "error", "route")}
        for line in done.stdout.splitlines()
    ]


def test_stdin() -> None:
    """`-` reads one message from standard input."""
    result = check_rules("--json", "-", stdin=CC.read_bytes())
    expected = [("-", "reengagement-cc", "ses")]
    assert expected == [(d["source"], d["rule"], d["route"]) for d in json_lines(result)]


def test_broken_inputs_do_not_stop_the_others(tmp_path: Path) -> None:
    """Unreadable files, empty directories and garbage are reported; the rest is classified."""
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    garbage = tmp_path / "garbage.eml"
    garbage.write_bytes(bytes(range(256)) * 4)
    blank = tmp_path / "blank.eml"
    blank.write_bytes(b"\r\n\r\n")
    text = tmp_path / "notmail.eml"
    text.write_bytes(b"just some words\nwithout any header\n")
    missing = tmp_path / "missing.eml"
    args = [str(missing), str(empty_dir), str(garbage), str(CC), str(blank), str(text)]
    result = check_rules("--json", *args)
    expected = [
        {"source": str(missing), "error": "cannot read: No such file or directory"},
        {"source": str(empty_dir), "error": "no .eml files in this directory"},
        {"source": str(garbage), "error": "binary data, not an email message"},
        {"source": str(CC), "route": "ses"},
        {"source": str(blank), "error": "empty"},
        {
            "source": str(text),
            "error": "not an email message: it does not start with a header line",
        },
    ]
    actual = [
        {k: v for k, v in line.items() if k in ("source", "error", "route")}
        for line in json_lines(result)
    ]
    assert (1, expected) == (result.exit_code, actual)


def test_broken_input_in_table_mode_goes_to_stderr(tmp_path: Path) -> None:
    """Without --json, a broken input is one stderr line and counts as unreadable."""
    missing = tmp_path / "missing.eml"
    result = check_rules(str(missing), str(CC))
    expected = (1, [f"{missing}: cannot read: No such file or directory"])
    assert expected == (result.exit_code, result.stderr.splitlines())
    assert "2 messages: 1 ses, 0 upstream, 1 unreadable" in result.stdout


def test_mbox_from_line_and_8bit_garbage_body(tmp_path: Path) -> None:
    """An mbox "From " line is skipped; 8-bit garbage in a body still classifies."""
    saved = tmp_path / "saved.eml"
    saved.write_bytes(
        b"From noreply@moodle.example.org Tue Mar  4 09:05:02 2025\n" + CC.read_bytes()
    )
    odd = tmp_path / "odd.eml"
    odd.write_bytes(
        b"Subject: \xff\xfe\r\nContent-Type: text/plain; charset=x-nope\r\n\r\n\xc3\x28\r\n"
    )
    result = check_rules("--json", str(saved), str(odd))
    expected = [("reengagement-cc", "ses"), (None, "upstream")]
    assert (0, expected) == (
        result.exit_code,
        [(d["rule"], d["route"]) for d in json_lines(result)],
    )


def test_rules_option_and_local_rules_file(tmp_path: Path) -> None:
    """--rules wins; else ./rules.yaml; else the shipped defaults."""
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - name: local\n    route: ses\n    match: {subject: '.'}\n"
    )
    other = tmp_path / "other.yaml"
    other.write_text("default: ses\nrules: []\n")
    local = json_lines(check_rules("--json", str(FORUM)))
    chosen = json_lines(check_rules("--json", "--rules", str(other), str(FORUM)))
    expected = [("local", "ses"), (None, "ses")]
    assert expected == [
        (local[0]["rule"], local[0]["route"]),
        (chosen[0]["rule"], chosen[0]["route"]),
    ]


def test_the_rules_relay_yaml_names_come_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a relay.yaml (--config, $RELAY_CONFIG or ./relay.yaml) the rules it names are
    tried, as relay serve would use them, before ./rules.yaml; --rules still wins. Before,
    an admin on a server tried the shipped rules, not the ones relay.yaml names."""
    (tmp_path / "rules.yaml").write_text("default: upstream\nrules: []\n")
    site = tmp_path / "etc"
    site.mkdir()
    (site / "site-rules.yaml").write_text(
        "rules:\n  - name: site\n    route: ses\n    match: {subject: '.'}\n"
    )
    (site / "relay.yaml").write_text("rules: site-rules.yaml\n")
    other = tmp_path / "other.yaml"
    other.write_text("default: ses\nrules: []\n")

    def rule(*args: str) -> object:
        result = check_rules("--json", *args, str(FORUM))
        assert 0 == result.exit_code, result.output
        return json_lines(result)[0]["rule"]

    by_option = rule("--config", str(site / "relay.yaml"))
    by_option_and_rules = rule("--config", str(site / "relay.yaml"), "--rules", str(other))
    monkeypatch.setenv("RELAY_CONFIG", str(site / "relay.yaml"))
    by_env = rule()
    monkeypatch.delenv("RELAY_CONFIG")
    (tmp_path / "relay.yaml").write_text("spool: spool\n")  # no rules: the shipped ones
    beside = rule()
    assert ["site", None, "site", None] == [by_option, by_option_and_rules, by_env, beside]
    shipped = check_rules(str(CC))
    assert str(rules.DEFAULT_RULES) in shipped.stdout


def test_a_relay_yaml_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    """--config naming a file that is not there: exit 1, the file named, nothing classified."""
    result = check_rules("--config", str(tmp_path / "nowhere.yaml"), str(CC))
    assert (1, "") == (result.exit_code, result.stdout)
    assert f"{tmp_path / 'nowhere.yaml'}: no such file" in result.stderr


def test_envelope_from_headers(tmp_path: Path) -> None:
    """A saved mail's envelope: Return-Path (else From) and the To/Cc addresses."""
    rules_file = tmp_path / "env.yaml"
    rules_file.write_text(
        "rules:\n"
        "  - name: bounce\n    route: ses\n    match: {sender: '^mdl\\+x@bounces\\.'}\n"
        "  - name: from\n    route: ses\n    match: {sender: '^noreply@moodle\\.example\\.org$'}\n"
        "  - name: cc\n    route: ses\n    match: {recipient: '^c@example\\.org$'}\n"
    )
    with_return_path = tmp_path / "rp.eml"
    with_return_path.write_bytes(b"Return-Path: <mdl+x@bounces.example.org>\r\n" + CC.read_bytes())
    cc_only = tmp_path / "cc.eml"
    cc_only.write_bytes(
        b"From: x@example.org\r\nTo: a@example.org\r\nCc: B <c@example.org>\r\n\r\nx\r\n"
    )
    result = check_rules(
        "--json", "--rules", str(rules_file), str(with_return_path), str(CC), str(cc_only)
    )
    expected = ["bounce", "from", "cc"]
    assert expected == [line["rule"] for line in json_lines(result)]


def test_bad_rules_file_exits_1(tmp_path: Path) -> None:
    """A rules file that cannot be used prints its problems and classifies nothing."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: a\n    route: nowhere\n    match: {subject: '('}\n")
    result = check_rules("--rules", str(bad), str(CC))
    expected = (
        1,
        "",
        [
            f"{bad}:3: rules[0].route: 'nowhere' is not one of: ses, upstream",
            f"{bad}:4: rules[0].match.subject: invalid regular expression '(': "
            "missing ), unterminated subpattern at position 0",
        ],
    )
    assert expected == (result.exit_code, result.stdout, result.stderr.splitlines())


def test_missing_rules_file(tmp_path: Path) -> None:
    """--rules naming a missing file is a problem naming it, exit 1."""
    missing = tmp_path / "none.yaml"
    result = check_rules("--rules", str(missing), str(CC))
    expected = (1, f"{missing}: cannot read the file")
    assert expected == (result.exit_code, result.stderr[: len(expected[1])])


def test_a_megabyte_header_does_not_stall_classification(tmp_path: Path) -> None:
    """A re-engagement mail whose To: is a megabyte of "a@a@a@...": the shipped CC rule's
    regex used to backtrack over it for hours (its time grows with the square of the
    length), stopping the delivery loop. `relay check-rules`, as a process, classifies it
    in seconds, as the student copy; rules see at most HEADER_LIMIT of any header."""
    eml = tmp_path / "huge-to.eml"
    eml.write_bytes(
        b"From: noreply@moodle.example.org\r\n"
        b"To: " + b"a@" * 500_000 + b"a\r\n"
        b"X-Moodle-Originating-Script: https://moodle.example.org => web01:"
        b"mod/reengagement/lib.php:564\r\n"
        b"Subject: We miss you\r\n\r\nCome back.\r\n"
    )
    started = time.monotonic()
    done = relay_cli("check-rules", "--json", str(eml), timeout=60)
    took = time.monotonic() - started
    [verdict] = [json.loads(line) for line in done.stdout.splitlines()]
    print(f"a 1 MB To: classified in {took:.2f}s as {verdict['rule']}")
    assert 0 == done.returncode, done.stderr
    assert ("reengagement-student", "ses") == (verdict["rule"], verdict["route"])
    assert took < 20
