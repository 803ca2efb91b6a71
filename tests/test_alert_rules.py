"""The shipped Prometheus alert rules (contrib/prometheus/relay-alerts.yaml) are valid, pass
their unit tests, use only metric names relay exports, and each is explained in the README.

promtool comes from the Debian package `prometheus` (scripts/test installs it). Without it
these tests fail, never skip: CI must not pass with the rules unchecked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from relay import metrics

ROOT = Path(__file__).parent.parent
RULES = ROOT / "contrib" / "prometheus" / "relay-alerts.yaml"
RULE_TESTS = RULES.with_name("relay-alerts.test.yaml")
README = ROOT / "README.md"
_METRIC = re.compile(r"\b(relay_[a-z0-9_]+|up)\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool not found: apt-get install prometheus (scripts/test does)"
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=120, check=False, cwd=RULES.parent
    )


def alerts() -> dict[str, dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def exported() -> set[str]:
    """Every series name relay's registry can expose (counters as NAME_total, ...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


@pytest.mark.system
def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts the file: valid PromQL, durations, templates."""
    checked = promtool("check", "rules", RULES.name)
    assert 0 == checked.returncode, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout


@pytest.mark.system
def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules`: each alert fires in its situation (labels and annotations as
    written) and stays quiet in the look-alikes (shadow-mode fallbacks, few mails, ...)."""
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert 0 == tested.returncode, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_firing() -> None:
    """No alert without a promtool test in which it fires."""
    doc = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    fired = {
        case["alertname"]
        for test in doc["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert sorted(alerts()) == sorted(fired)


def test_rules_use_only_metrics_relay_exports() -> None:
    """Every relay_* name in an expression is a series relay's registry exposes (a renamed
    metric would otherwise leave an alert that can never fire)."""
    used = {name for rule in alerts().values() for name in _METRIC.findall(str(rule["expr"]))}
    assert set() == used - exported() - {"up"}


def test_readme_lists_every_alert() -> None:
    """README's "Alerts" section names each alert (and says what to do about it)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Alerts") :]
    assert [] == [name for name in alerts() if f"`{name}`" not in section]
