"""The corpus of Moodle mails (tests/corpus) and where each must go, and rule sets to classify
mail with.

- `expectations()`: every entry of tests/corpus/expected.yaml as an `Expected` (the file,
  its Moodle envelope, the rule and route it must get);
- `ruleset(text)`: rules parsed from a YAML snippet;
- `shipped_with_marker_rules()`: the shipped rules.yaml with its body-marker block enabled.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from relay import rules
from relay.mail import Mail

CORPUS = Path(__file__).parent.parent / "corpus"


def ruleset(text: str) -> rules.RuleSet:
    """Rules parsed from YAML `text` (dedented by the caller's indentation)."""
    return rules.parse(textwrap.dedent(text).lstrip("\n"), "test-rules.yaml")


@dataclass(frozen=True, slots=True, kw_only=True)
class Expected:
    """One corpus message and where it must go."""

    name: str
    note: str
    sender: str
    recipients: tuple[str, ...]
    rule: str | None
    route: str
    marker_rule: str | None

    @property
    def path(self) -> Path:
        return CORPUS / self.name

    def mail(self) -> Mail:
        """The message with the envelope Moodle gave it."""
        raw = self.path.read_bytes()
        return Mail(id=self.name, sender=self.sender, recipients=self.recipients, raw=raw)


def expectations() -> list[Expected]:
    """Every entry of tests/corpus/expected.yaml, in file order."""
    data = yaml.safe_load((CORPUS / "expected.yaml").read_text(encoding="utf-8"))
    return [
        Expected(
            name=name,
            note=entry["note"],
            sender=entry["sender"],
            recipients=tuple(entry["recipients"]),
            rule=entry["rule"],
            route=entry["route"],
            marker_rule=entry.get("marker_rule", entry["rule"]),
        )
        for name, entry in data.items()
    ]


_BLOCK = re.compile(
    r"^  # ---- alternative: body marker \(begin\) ----\n(.*?)"
    r"^  # ---- alternative: body marker \(end\)",
    re.S | re.M,
)


def shipped_with_marker_rules() -> str:
    """The shipped rules.yaml with its commented body-marker block enabled as an admin would:
    removing the leading "# " from the rule lines of the block."""
    text = rules.DEFAULT_RULES.read_text(encoding="utf-8")
    block = _BLOCK.search(text)
    assert block is not None, "the body-marker block markers are missing from rules.yaml"
    lines = block.group(1).splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - name:"))
    enabled = [line.replace("  # ", "  ", 1) for line in lines[start:]]
    return text[: block.start(1)] + "".join(lines[:start] + enabled) + text[block.end(1) :]
