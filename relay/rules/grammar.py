"""The `match:` grammar of rules.yaml: a YAML node -> a condition (`relay.rules.conditions`).

Every problem is recorded on the node with its line (`yamlfile`), and the parser
returns None for that part; `ruleset` raises them all together.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

from relay import yamlfile
from relay.rules import conditions as c

_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 printable ASCII except ':'


def text(node: yamlfile.Node, *, allow_empty: bool = False) -> str | None:
    try:
        return node.as_str(allow_empty=allow_empty)
    except ValueError as exc:  # an impossible date (2020-99-99) trips the YAML constructor
        node.problem(f"unreadable value: {exc}")
        return None


def _flag(node: yamlfile.Node) -> bool | None:
    try:
        return node.as_bool()
    except ValueError as exc:  # as in text()
        node.problem(f"unreadable value: {exc}")
        return None


def _regex(node: yamlfile.Node) -> re.Pattern[str] | None:
    pattern = text(node, allow_empty=True)  # '' matches anything: "the header exists"
    if pattern is None:
        return None
    try:
        with warnings.catch_warnings():
            # "Possible nested set" (`[[:digit:]]`, a POSIX class Python does not have, read
            # as a set of ':', 'd', ... and then ']'): a pattern that does not mean what it
            # says, whose meaning a later Python changes. Printed as a warning at each
            # load, or an error where warnings are errors; a problem at its line here.
            warnings.simplefilter("error", FutureWarning)
            return re.compile(pattern)
    except FutureWarning as exc:
        node.problem(f"regular expression '{pattern}': {exc}: write '\\[' for a literal '['")
        return None
    except (re.error, OverflowError, RecursionError) as exc:
        node.problem(f"invalid regular expression '{pattern}': {exc}")
        return None


def _header(node: yamlfile.Node) -> c.Condition | None:
    entries = node.mapping()
    if entries is None:
        return None
    if not entries:
        node.problem("name at least one header, e.g. {List-Id: '.'}")
        return None
    parts: list[c.Condition] = []
    for name, value in entries.items():
        pattern = _regex(value)
        if not _FIELD_NAME.fullmatch(name):
            value.problem(f"{name!r} is not a header name")
        elif pattern is not None:
            parts.append(c.Header(name, pattern))
    if len(parts) != len(entries):
        return None
    return parts[0] if len(parts) == 1 else c.AllOf(tuple(parts))


def _absent(node: yamlfile.Node) -> c.Condition | None:
    items = node.sequence()
    if items is None:
        return None
    if not items:
        node.problem("name at least one header")
        return None
    names = [text(item) for item in items]
    for item, name in zip(items, names, strict=True):
        if name is not None and not _FIELD_NAME.fullmatch(name):
            item.problem(f"{name!r} is not a header name")
            return None
    if any(name is None for name in names):
        return None
    return c.Absent(tuple(name for name in names if name is not None))


def _combined(node: yamlfile.Node, kind: type[c.AllOf] | type[c.AnyOf]) -> c.Condition | None:
    items = node.sequence()
    if items is None:
        return None
    if not items:
        node.problem("expected a non-empty list of conditions")
        return None
    parts = [condition(item) for item in items]
    if any(part is None for part in parts):
        return None
    return kind(tuple(part for part in parts if part is not None))


def _multipart(node: yamlfile.Node) -> c.Condition | None:
    value = _flag(node)
    return None if value is None else c.Multipart(value)


def _not(node: yamlfile.Node) -> c.Condition | None:
    inner = condition(node)
    return None if inner is None else c.Not(inner)


def _pattern_of(kind: Callable[[re.Pattern[str]], c.Condition]) -> _Parser:
    def parse(node: yamlfile.Node) -> c.Condition | None:
        pattern = _regex(node)
        return None if pattern is None else kind(pattern)

    return parse


_Parser = Callable[[yamlfile.Node], "c.Condition | None"]
_CONDITIONS: dict[str, _Parser] = {
    "header": _header,
    "absent": _absent,
    "sender": _pattern_of(c.Sender),
    "recipient": _pattern_of(c.Recipient),
    "subject": _pattern_of(c.Subject),
    "body": _pattern_of(c.Body),
    "multipart": _multipart,
    "all": lambda node: _combined(node, c.AllOf),
    "any": lambda node: _combined(node, c.AnyOf),
    "not": _not,
}


def condition(node: yamlfile.Node) -> c.Condition | None:
    """One condition mapping; several keys mean all of them must hold."""
    entries = node.mapping(allowed=_CONDITIONS)
    if entries is None:
        return None
    if not node.node.value:
        node.problem(f"expected a condition ({', '.join(_CONDITIONS)})")
        return None
    parts = [_CONDITIONS[key](value) for key, value in entries.items()]
    if any(part is None for part in parts) or len(entries) != len(node.node.value):
        return None  # the problems are recorded already
    found = tuple(part for part in parts if part is not None)
    return found[0] if len(found) == 1 else c.AllOf(found)
