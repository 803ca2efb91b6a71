"""rules: the stage between spool and deliver that picks each mail's route.

    rules.yaml --load()--> RuleSet --classify(mail)--> Decision(rule, route, reasons)

`ruleset` reads rules.yaml (every problem with file:line) and classifies,
`grammar` turns its `match:` mappings into `conditions`, `mimeview` the decoded view of a mail
they look at, `timebox` the time limit on each rule's test of a mail. `DEFAULT_RULES` is
the shipped rules.yaml (Moodle's re-engagement mail).
"""

from relay.rules.ruleset import (
    CONFIG_SET,
    CONFIG_SET_FORM,
    DEFAULT_RULES,
    IDENTITY_ARN,
    IDENTITY_ARN_FORM,
    RULE_TAG,
    RULE_TIME,
    Decision,
    Route,
    Rule,
    RuleSet,
    load,
    parse,
    region_problem,
    warn,
)

__all__ = [
    "CONFIG_SET",
    "CONFIG_SET_FORM",
    "DEFAULT_RULES",
    "IDENTITY_ARN",
    "IDENTITY_ARN_FORM",
    "RULE_TAG",
    "RULE_TIME",
    "Decision",
    "Route",
    "Rule",
    "RuleSet",
    "load",
    "parse",
    "region_problem",
    "warn",
]
