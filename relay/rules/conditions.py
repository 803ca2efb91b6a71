"""The conditions a rule in rules.yaml can test, evaluated against a `MailView`.

Each condition's `test()` returns None when it does not hold, or the reasons it
holds (short human-readable phrases that end up in logs and `check-rules`).
`describe()` says what the condition asks, for reasons of a `not`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from relay.rules.mimeview import MailView

Reasons = tuple[str, ...]


class Condition(Protocol):
    def test(self, view: MailView) -> Reasons | None: ...

    def describe(self) -> str: ...


def _quote(pattern: re.Pattern[str]) -> str:
    return f"'{pattern.pattern}'"


@dataclass(frozen=True, slots=True)
class Header:
    """The header exists and one of its decoded values matches."""

    name: str
    pattern: re.Pattern[str]

    def test(self, view: MailView) -> Reasons | None:
        if any(self.pattern.search(value) for value in view.header(self.name)):
            return (self.describe(),)
        return None

    def describe(self) -> str:
        return f"header {self.name} matches {_quote(self.pattern)}"


@dataclass(frozen=True, slots=True)
class Absent:
    """None of the headers exist."""

    names: tuple[str, ...]

    def test(self, view: MailView) -> Reasons | None:
        if any(view.header(name) for name in self.names):
            return None
        return (self.describe(),)

    def describe(self) -> str:
        return f"no {', '.join(self.names)} header"


@dataclass(frozen=True, slots=True)
class Sender:
    """The envelope MAIL FROM ("" for the null sender) matches."""

    pattern: re.Pattern[str]

    def test(self, view: MailView) -> Reasons | None:
        return (self.describe(),) if self.pattern.search(view.mail.sender) else None

    def describe(self) -> str:
        return f"sender matches {_quote(self.pattern)}"


@dataclass(frozen=True, slots=True)
class Recipient:
    """Any envelope RCPT TO matches."""

    pattern: re.Pattern[str]

    def test(self, view: MailView) -> Reasons | None:
        hit = any(self.pattern.search(rcpt) for rcpt in view.mail.recipients)
        return (self.describe(),) if hit else None

    def describe(self) -> str:
        return f"recipient matches {_quote(self.pattern)}"


@dataclass(frozen=True, slots=True)
class Subject:
    """The decoded Subject ("" when missing) matches."""

    pattern: re.Pattern[str]

    def test(self, view: MailView) -> Reasons | None:
        return (self.describe(),) if self.pattern.search(view.subject) else None

    def describe(self) -> str:
        return f"subject matches {_quote(self.pattern)}"


@dataclass(frozen=True, slots=True)
class Body:
    """Some decoded text/plain or text/html part (or the HTML's visible text) matches."""

    pattern: re.Pattern[str]

    def test(self, view: MailView) -> Reasons | None:
        hit = any(self.pattern.search(text) for text in view.body_texts)
        return (self.describe(),) if hit else None

    def describe(self) -> str:
        return f"body matches {_quote(self.pattern)}"


@dataclass(frozen=True, slots=True)
class Multipart:
    """The message has (`expected` true) or has not more than one body part."""

    expected: bool

    def test(self, view: MailView) -> Reasons | None:
        count = view.part_count
        return (self.describe(),) if count is not None and (count > 1) == self.expected else None

    def describe(self) -> str:
        return "multipart" if self.expected else "not multipart"


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every condition holds; the reasons are all of theirs."""

    conditions: tuple[Condition, ...]

    def test(self, view: MailView) -> Reasons | None:
        reasons: list[str] = []
        for condition in self.conditions:
            held = condition.test(view)
            if held is None:
                return None
            reasons.extend(held)
        return tuple(reasons)

    def describe(self) -> str:
        return " and ".join(c.describe() for c in self.conditions)


@dataclass(frozen=True, slots=True)
class AnyOf:
    """Some condition holds; the reasons are those of the first that does."""

    conditions: tuple[Condition, ...]

    def test(self, view: MailView) -> Reasons | None:
        for condition in self.conditions:
            held = condition.test(view)
            if held is not None:
                return held
        return None

    def describe(self) -> str:
        return "any of (" + "; ".join(c.describe() for c in self.conditions) + ")"


@dataclass(frozen=True, slots=True)
class Not:
    """The condition does not hold."""

    condition: Condition

    def test(self, view: MailView) -> Reasons | None:
        return None if self.condition.test(view) is not None else (self.describe(),)

    def describe(self) -> str:
        return f"not ({self.condition.describe()})"
