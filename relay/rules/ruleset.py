"""rules.yaml -> RuleSet; `RuleSet.classify(mail)` -> Decision(rule, route, reasons).

The deliver loop classifies each claimed message here to pick SES or the
original host. Rules are ordered and the first match wins; unmatched mail takes
`default`. Loading reports every problem with file:line:key (`ConfigError`);
classifying never raises, whatever the bytes.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from relay import logs, yamlfile
from relay.errors import ConfigError
from relay.mail import Mail
from relay.rules import conditions as c
from relay.rules.grammar import condition, text
from relay.rules.mimeview import MailView
from relay.rules.shadows import shadowed
from relay.rules.timebox import TooSlow, timebox

DEFAULT_RULES = Path(__file__).parent / "rules.yaml"  # the same file as rules.yaml at the top
RULE_TIME = 0.25  # seconds a rule's test of one mail may take; ms for any sane pattern
MAIL_TIME = 1.0  # ... and all rules together, the rest then do not hold: a claim takes 16
# mails, classified one after another on the delivery loop, whose pings are missed at 30 s
RULE_TAG = "rule"  # the SES tag the deliver loop sets to the rule name

log = logging.getLogger("relay.rules")

# SES MessageTag names and values, and configuration set names, allow only these.
_SES_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_SES_CHARS = "ASCII letters, digits, '_' and '-'"
# An SES configuration set name (`configuration_set`, global or per rule).
CONFIG_SET = re.compile(r"[A-Za-z0-9_-]{1,64}")
CONFIG_SET_FORM = f"a configuration set name: 1-64 of {_SES_CHARS}"
# An SES identity ARN, as sending authorization needs it (`identity_arn`, global or per rule).
# The Region `*` for an identity duplicated in a secondary Region (SES's Global endpoints).
IDENTITY_ARN = re.compile(r"arn:aws[a-z-]*:ses:(?:[a-z0-9-]+|\*):\d{12}:identity/[^\s/]+")
IDENTITY_ARN_FORM = "an identity ARN like arn:aws:ses:eu-west-1:123456789012:identity/example.org"


def region_problem(arn: str, region: str) -> str | None:
    """Why SES would refuse every send for identity `arn` through `region`, or None.

    SES sends for an identity only from the Region it was verified in (its Developer
    Guide, sending authorization): every send failed, and the mail went upstream."""
    arn_region = arn.split(":")[3]
    if arn_region in ("*", region):
        return None
    return (
        f"its Region is {arn_region}, and ses.region is {region}: SES sends for an"
        " identity only through the Region it was verified in (or `*` in the ARN, for"
        " an identity in the Global endpoints' Regions)"
    )


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
    identity_arn: str | None = None  # None: `ses.identity_arn` (if any)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    route: Route
    match: c.Condition
    configuration_set: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    identity_arn: str | None = None  # None: `ses.identity_arn` (if any)


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSet:
    """The loaded rules of one file (`source`), in order; `warnings`: what loads but
    cannot be meant (a rule that never decides), said by check-config, check-rules,
    doctor and relay serve's log, each as file:line: text."""

    source: str
    default: Route
    rules: tuple[Rule, ...]
    warnings: tuple[str, ...] = ()

    def classify(self, mail: Mail) -> Decision:
        """The first matching rule's decision, else the default route. Never raises. A rule
        whose test runs past RULE_TIME, or past MAIL_TIME for all of them, does not hold
        (relay.rules.timebox says why)."""
        if not self.rules:  # nothing to read the head for, nor an alarm to set
            return Decision(rule=None, route=self.default, reasons=())
        view = MailView(mail)
        deadline = time.monotonic() + MAIL_TIME
        with timebox() as box:
            # The head's parse serves every rule: charged to the mail's time, not to the first
            # rule's (a 7 MB head took that rule past RULE_TIME on a busy machine, and the
            # mail went by the next rule that held).
            with (
                contextlib.suppress(TooSlow),
                box.limit(MAIL_TIME) if box else contextlib.nullcontext(),
            ):
                _ = view.headers
            for rule in self.rules:
                left = min(RULE_TIME, deadline - time.monotonic())
                try:
                    if left <= 0:
                        raise TooSlow
                    with box.limit(left) if box else contextlib.nullcontext():
                        reasons = rule.match.test(view)
                except TooSlow:
                    logs.event(
                        log,
                        "rule_too_slow",
                        level=logging.WARNING,
                        id=mail.id,
                        rule=rule.name,
                        limit=round(max(left, 0.0), 3),
                    )
                    reasons = None
                except Exception:  # a condition that cannot be evaluated does not hold
                    reasons = None
                if reasons is not None:
                    return self._decision(rule, reasons)
        return Decision(rule=None, route=self.default, reasons=())

    @staticmethod
    def _decision(rule: Rule, reasons: tuple[str, ...]) -> Decision:
        return Decision(
            rule=rule.name,
            route=rule.route,
            reasons=reasons,
            configuration_set=rule.configuration_set,
            tags=rule.tags,
            identity_arn=rule.identity_arn,
        )


def warn(ruleset: RuleSet) -> None:
    """Log the rules' warnings (relay serve's start and reload), one line each."""
    for warning in ruleset.warnings:
        logs.event(log, "rules_warning", level=logging.WARNING, warning=warning)


def load(path: Path, *, ses_region: str | None = None) -> RuleSet:
    """Read and check the rules file at `path`; ConfigError lists every problem.
    `ses_region`: relay.yaml's, which every rule's `ses.identity_arn` must suit."""
    return _build(str(path), lambda: yamlfile.load(path), ses_region)


def parse(text: str, name: str, *, ses_region: str | None = None) -> RuleSet:
    """Check rules given as YAML `text`; `name` stands for the file in problems."""
    return _build(name, lambda: yamlfile.parse(text, name), ses_region)


def _build(
    name: str,
    read: Callable[[], tuple[yamlfile.Doc, yamlfile.Node | None]],
    ses_region: str | None,
) -> RuleSet:
    try:
        doc, root = read()
        ruleset = _ruleset(doc, root, ses_region)
    except RecursionError:  # PyYAML and the condition parser both recurse per nesting level
        doc = yamlfile.Doc(name)
        doc.problem(None, "", "the rules are nested too deeply")
        ruleset = None
    doc.raise_if_any()
    if ruleset is None:  # pragma: no cover - every None comes with a problem
        raise ConfigError([])
    return ruleset


def _ruleset(
    doc: yamlfile.Doc, root: yamlfile.Node | None, ses_region: str | None
) -> RuleSet | None:
    if root is None:
        return None
    top = root.mapping(allowed=("default", "rules"), required=("rules",))
    if top is None:
        return None
    default: Route | None = Route.UPSTREAM
    if "default" in top:
        default = _route(top["default"])
    placed: list[tuple[Rule, int]] = []
    seen: dict[str, int] = {}
    items = top["rules"].sequence() if "rules" in top else None
    for item in items or ():
        rule = _rule(item, seen, ses_region)
        if rule is not None:
            placed.append((rule, item.line))
    if doc.problems or default is None:
        return None
    return RuleSet(
        source=doc.name,
        default=default,
        rules=tuple(rule for rule, _ in placed),
        warnings=tuple(
            shadowed(doc.name, [(rule.name, rule.match, line) for rule, line in placed])
        ),
    )


def _route(node: yamlfile.Node) -> Route | None:
    try:  # as_choice itself: it names `on`/`off` (read as true/false) and how to quote them
        value = node.as_choice([r.value for r in Route])
    except ValueError as exc:  # as in grammar.text(): an impossible date
        node.problem(f"unreadable value: {exc}")
        return None
    return None if value is None else Route(value)


def _rule(node: yamlfile.Node, seen: dict[str, int], ses_region: str | None) -> Rule | None:
    entries = node.mapping(
        allowed=("name", "route", "match", "ses", "description"),
        required=("name", "route", "match"),
    )
    if entries is None:
        return None
    name = text(entries["name"]) if "name" in entries else None
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
    match = condition(entries["match"]) if "match" in entries else None
    if "description" in entries:
        text(entries["description"], allow_empty=True)
    config_set, tags, arn = (
        _ses(entries["ses"], ses_region) if "ses" in entries else (None, (), None)
    )
    if name is None or route is None or match is None or tags is None:
        return None
    return Rule(
        name=name,
        route=route,
        match=match,
        configuration_set=config_set,
        tags=tags,
        identity_arn=arn,
    )


def _ses(
    node: yamlfile.Node, ses_region: str | None
) -> tuple[str | None, tuple[tuple[str, str], ...] | None, str | None]:
    entries = node.mapping(allowed=("configuration_set", "tags", "identity_arn"))
    if entries is None:
        return None, None, None
    arn = text(entries["identity_arn"]) if "identity_arn" in entries else None
    if arn is not None and not IDENTITY_ARN.fullmatch(arn):
        entries["identity_arn"].problem(f"expected {IDENTITY_ARN_FORM}, got {arn!r}")
        arn = None
    elif arn is not None and ses_region and (problem := region_problem(arn, ses_region)):
        entries["identity_arn"].problem(problem)
        arn = None
    config_set = None
    if "configuration_set" in entries:
        config_set = text(entries["configuration_set"])
        if config_set is not None and not CONFIG_SET.fullmatch(config_set):
            entries["configuration_set"].problem(
                f"configuration set {config_set!r} must be 1-64 of {_SES_CHARS}"
            )
    tags: list[tuple[str, str]] = []
    ok = True
    tag_entries = entries["tags"].mapping() if "tags" in entries else {}
    for tag_name, value_node in (tag_entries or {}).items():
        value = text(value_node)
        if tag_name == RULE_TAG:
            value_node.problem(f"tag name {RULE_TAG!r} is reserved: relay sets it to the rule name")
            ok = False
        for what, token in (("tag name", tag_name), ("tag value", value)):
            if token is not None and not _SES_TOKEN.fullmatch(token):
                value_node.problem(f"{what} {token!r} must be 1-256 of {_SES_CHARS}")
                ok = False
        if value is None:
            ok = False
        else:
            tags.append((tag_name, value))
    return config_set, (tuple(tags) if ok and tag_entries is not None else None), arn
