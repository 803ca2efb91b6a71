"""rules.yaml -> RuleSet; `RuleSet.classify(mail)` -> Decision(rule, route, reasons).

The deliver loop classifies each claimed message here to pick SES or the
original host. Rules are ordered and the first match wins; unmatched mail takes
`default`. Loading reports every problem with file:line:key (`ConfigError`);
classifying never raises, whatever the bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from relay import yamlfile
from relay.errors import ConfigError
from relay.mail import Mail
from relay.rules import conditions as c
from relay.rules.mimeview import MailView

DEFAULT_RULES = Path(__file__).parent / "rules.yaml"  # the same file as rules.yaml at the top
RULE_TAG = "rule"  # the SES tag the deliver loop sets to the rule name

# SES MessageTag names and values, and configuration set names, allow only these.
_SES_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_SES_CONFIG_SET = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 printable ASCII except ':'
_SES_CHARS = "ASCII letters, digits, '_' and '-'"


class Route(StrEnum):
    SES = "ses"
    UPSTREAM = "upstream"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Where a message goes and why. `rule` is None when the default route applied."""

    rule: str | None
    route: Route
    reasons: tuple[str, ...]
    configuration_set: str | None = None
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    route: Route
    match: c.Condition
    configuration_set: str | None = None
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSet:
    """The loaded rules of one file (`source`), in order."""

    source: str
    default: Route
    rules: tuple[Rule, ...]

    def classify(self, mail: Mail) -> Decision:
        """The first matching rule's decision, else the default route. Never raises."""
        view = MailView(mail)
        for rule in self.rules:
            try:
                reasons = rule.match.test(view)
            except Exception:  # a condition that cannot be evaluated does not hold
                reasons = None
            if reasons is not None:
                return Decision(
                    rule=rule.name,
                    route=rule.route,
                    reasons=reasons,
                    configuration_set=rule.configuration_set,
                    tags=rule.tags,
                )
        return Decision(rule=None, route=self.default, reasons=())


def load(path: Path) -> RuleSet:
    """Read and check the rules file at `path`; ConfigError lists every problem."""
    return _build(str(path), lambda: yamlfile.load(path))


def parse(text: str, name: str) -> RuleSet:
    """Check rules given as YAML `text`; `name` stands for the file in problems."""
    return _build(name, lambda: yamlfile.parse(text, name))


def _build(name: str, read: Callable[[], tuple[yamlfile.Doc, yamlfile.Node | None]]) -> RuleSet:
    try:
        doc, root = read()
        ruleset = _ruleset(doc, root)
    except RecursionError:  # PyYAML and the condition parser both recurse per nesting level
        doc = yamlfile.Doc(name)
        doc.problem(None, "", "the rules are nested too deeply")
        ruleset = None
    doc.raise_if_any()
    if ruleset is None:  # pragma: no cover - every None comes with a problem
        raise ConfigError([])
    return ruleset


def _ruleset(doc: yamlfile.Doc, root: yamlfile.Node | None) -> RuleSet | None:
    if root is None:
        return None
    top = root.mapping(allowed=("default", "rules"), required=("rules",))
    if top is None:
        return None
    default: Route | None = Route.UPSTREAM
    if "default" in top:
        default = _route(top["default"])
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    items = top["rules"].sequence() if "rules" in top else None
    for item in items or ():
        rule = _rule(item, seen)
        if rule is not None:
            rules.append(rule)
    if doc.problems or default is None:
        return None
    return RuleSet(source=doc.name, default=default, rules=tuple(rules))


def _str(node: yamlfile.Node, *, allow_empty: bool = False) -> str | None:
    try:
        return node.as_str(allow_empty=allow_empty)
    except ValueError as exc:  # an impossible date (2020-99-99) trips the YAML constructor
        node.problem(f"unreadable value: {exc}")
        return None


def _bool(node: yamlfile.Node) -> bool | None:
    try:
        return node.as_bool()
    except ValueError as exc:  # as in _str
        node.problem(f"unreadable value: {exc}")
        return None


def _route(node: yamlfile.Node) -> Route | None:
    if _str(node) is None:
        return None
    value = node.as_choice([r.value for r in Route])
    return None if value is None else Route(value)


def _rule(node: yamlfile.Node, seen: dict[str, int]) -> Rule | None:
    entries = node.mapping(
        allowed=("name", "route", "match", "ses", "description"),
        required=("name", "route", "match"),
    )
    if entries is None:
        return None
    name = _str(entries["name"]) if "name" in entries else None
    if name is not None:
        name_node = entries["name"]
        if not _SES_TOKEN.fullmatch(name):
            name_node.problem(f"rule name {name!r} must be 1-256 of {_SES_CHARS} (an SES tag)")
            name = None
        elif name in seen:
            name_node.problem(f"duplicate rule name {name!r} (first at line {seen[name]})")
            name = None
        else:
            seen[name] = name_node.line
    route = _route(entries["route"]) if "route" in entries else None
    match = _condition(entries["match"]) if "match" in entries else None
    if "description" in entries:
        _str(entries["description"], allow_empty=True)
    config_set, tags = _ses(entries["ses"]) if "ses" in entries else (None, ())
    if name is None or route is None or match is None or tags is None:
        return None
    return Rule(name=name, route=route, match=match, configuration_set=config_set, tags=tags)


def _ses(node: yamlfile.Node) -> tuple[str | None, tuple[tuple[str, str], ...] | None]:
    entries = node.mapping(allowed=("configuration_set", "tags"))
    if entries is None:
        return None, None
    config_set = None
    if "configuration_set" in entries:
        config_set = _str(entries["configuration_set"])
        if config_set is not None and not _SES_CONFIG_SET.fullmatch(config_set):
            entries["configuration_set"].problem(
                f"configuration set {config_set!r} must be 1-64 of {_SES_CHARS}"
            )
    tags: list[tuple[str, str]] = []
    ok = True
    tag_entries = entries["tags"].mapping() if "tags" in entries else {}
    for tag_name, value_node in (tag_entries or {}).items():
        value = _str(value_node)
        if tag_name == RULE_TAG:
            value_node.problem(f"tag name {RULE_TAG!r} is reserved: relay sets it to the rule name")
            ok = False
        for what, text in (("tag name", tag_name), ("tag value", value)):
            if text is not None and not _SES_TOKEN.fullmatch(text):
                value_node.problem(f"{what} {text!r} must be 1-256 of {_SES_CHARS}")
                ok = False
        if value is None:
            ok = False
        else:
            tags.append((tag_name, value))
    return config_set, (tuple(tags) if ok and tag_entries is not None else None)


def _regex(node: yamlfile.Node) -> re.Pattern[str] | None:
    pattern = _str(node, allow_empty=True)  # '' matches anything: "the header exists"
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
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
    names = [_str(item) for item in items]
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
    parts = [_condition(item) for item in items]
    if any(part is None for part in parts):
        return None
    return kind(tuple(part for part in parts if part is not None))


def _multipart(node: yamlfile.Node) -> c.Condition | None:
    value = _bool(node)
    return None if value is None else c.Multipart(value)


def _not(node: yamlfile.Node) -> c.Condition | None:
    inner = _condition(node)
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


def _condition(node: yamlfile.Node) -> c.Condition | None:
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
