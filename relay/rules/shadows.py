"""Rules that load but never decide: a rule below one that asks nothing it does not ask.

    rules.yaml -> ruleset._ruleset -> shadowed(...) -> RuleSet.warnings -> check-config,
    check-rules, doctor, relay serve's log

Off the data path: it runs once per load, not per mail. A rule's conditions are compared
as the set it needs all of (`all:` and the keys of one mapping, flattened; `any:` and
`not:` stay whole), so it says nothing it cannot be sure of.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.rules import conditions as c


def shadowed(source: str, placed: Sequence[tuple[str, c.Condition, int]]) -> list[str]:
    """A warning for each rule (name, match, line) an earlier one always takes the mail
    from: every condition of the earlier rule is one of its own (reengagement-student above
    reengagement-cc, say: every CC copy went out under the student rule's tags and
    configuration set)."""
    found = []
    needs = [conjuncts(match) for _, match, _ in placed]
    for later, (name, _, line) in enumerate(placed):
        for earlier in range(later):
            if needs[earlier] <= needs[later]:
                first, _, first_line = placed[earlier]
                found.append(
                    f"{source}:{line}: rule {name!r} never decides: rule {first!r}"
                    f" (line {first_line}) above it asks nothing {name!r} does not ask,"
                    f" so it takes every mail {name!r} matches; put {name!r}"
                    " first, or remove it"
                )
                break
    return found


def conjuncts(condition: c.Condition) -> frozenset[c.Condition]:
    """The conditions `condition` needs all of: `all:` and the keys of one mapping,
    flattened (`any:` and `not:` stay whole)."""
    if isinstance(condition, c.AllOf):
        return frozenset().union(*(conjuncts(one) for one in condition.conditions))
    return frozenset((condition,))
