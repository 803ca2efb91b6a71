"""Circuit (DESIGN 3.4, account-wide SES failures) on a virtual clock: open, cooldown, one
probe, close or re-open. Each row is a script of steps and what every step gave."""

from __future__ import annotations

import logging

import pytest

from relay.deliver.ses import scopes as scopes_mod
from relay.deliver.ses.circuit import Circuit, CircuitState
from relay.deliver.ses.scopes import Scopes
from relay.metrics import REGISTRY

COOLDOWN = 300.0


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(steps: list[str]) -> list[str]:
    """Play `steps` on a fresh closed circuit; each gives "<result> <state>".

    Steps: `allow`, `fail` (an account-wide failure), `ok` (SES took a call),
    `abort` (the probe ended without a verdict), `wait N` (seconds pass).
    """
    clock = Clock()
    circuit = Circuit(COOLDOWN, clock=clock)
    trace = []
    for step in steps:
        verb, _, arg = step.partition(" ")
        result: object = None
        if verb == "allow":
            result = circuit.allow()
        elif verb == "fail":
            result = circuit.failed("AccountSendingPausedException")
        elif verb == "ok":
            circuit.succeeded()
        elif verb == "abort":
            circuit.probe_aborted()
        elif verb == "wait":
            clock.now += float(arg)
            continue
        else:  # pragma: no cover - a typo in the table
            raise AssertionError(f"unknown step {step!r}")
        trace.append(f"{result} {circuit.state.value}")
    return trace


CASES = [
    pytest.param(["allow", "allow"], ["True closed", "True closed"], id="closed-allows-every-mail"),
    pytest.param(["fail"], ["True open"], id="first-failure-opens-and-alerts"),
    pytest.param(["fail", "fail"], ["True open", "False open"], id="second-failure-no-new-alert"),
    pytest.param(["fail", "allow"], ["True open", "False open"], id="open-blocks-at-once"),
    pytest.param(
        ["fail", "wait 299.999", "allow"], ["True open", "False open"], id="open-blocks-in-cooldown"
    ),
    pytest.param(
        ["fail", "wait 300", "allow", "allow"],
        ["True open", "True probing", "False probing"],
        id="cooldown-over-exactly-one-probe",
    ),
    pytest.param(
        ["fail", "wait 300", "allow", "ok", "allow"],
        ["True open", "True probing", "None closed", "True closed"],
        id="probe-success-closes",
    ),
    pytest.param(
        ["fail", "wait 300", "allow", "fail", "wait 299", "allow", "wait 1", "allow"],
        ["True open", "True probing", "False open", "False open", "True probing"],
        id="probe-failure-reopens-for-a-full-cooldown",
    ),
    pytest.param(
        ["fail", "ok", "allow", "wait 300", "allow"],
        ["True open", "None open", "False open", "True probing"],
        id="in-flight-success-while-open-does-not-close",
    ),
    pytest.param(
        ["fail", "wait 300", "allow", "abort", "allow"],
        ["True open", "True probing", "None open", "True probing"],
        id="aborted-probe-lets-next-mail-probe-at-once",
    ),
    pytest.param(
        ["fail", "abort", "allow"],
        ["True open", "None open", "False open"],
        id="abort-without-probe-keeps-cooldown",
    ),
    pytest.param(["abort", "allow"], ["None closed", "True closed"], id="abort-when-closed-no-op"),
    pytest.param(
        ["fail", "wait 200", "fail", "wait 200", "allow", "wait 100", "allow"],
        ["True open", "False open", "False open", "True probing"],
        id="failure-while-open-restarts-cooldown",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), CASES)
def test_circuit_steps(steps: list[str], expected: list[str]) -> None:
    """Each script of allow/fail/ok/abort/wait gives the documented result and state."""
    assert expected == run(steps)


def test_reason_kept_while_open_and_cleared_on_close() -> None:
    """The reason names the failure while the circuit is open and is cleared when it closes."""
    clock = Clock()
    circuit = Circuit(COOLDOWN, clock=clock)
    circuit.failed("Throttling: Daily message quota exceeded.")
    opened = (circuit.state, circuit.reason)
    clock.now += COOLDOWN
    circuit.allow()
    circuit.succeeded()
    assert [
        (CircuitState.OPEN, "Throttling: Daily message quota exceeded."),
        (CircuitState.CLOSED, ""),
    ] == [opened, (circuit.state, circuit.reason)]


def series(name: str) -> list[dict[str, str]]:
    """The label sets of relay's metric `name` now."""
    return [
        sample.labels
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == name
    ]


def test_scope_circuits_and_their_series_are_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The scope of a circuit comes from the mail's From domain: endless domains SES does not
    know grew the circuits and their metric series without end. At MAX_SCOPES the closed ones
    are forgotten, series and all; with none closed, no new circuit opens and a sampled
    warning says so."""
    monkeypatch.setattr(scopes_mod, "MAX_SCOPES", 3)
    clock = [0.0]
    scopes = Scopes(60, clock=lambda: clock[0])
    for n in range(3):
        scopes.failed(f"identity d{n}.example", reply="MessageRejected: x", advice="verify")
    clock[0] = 61  # past the cooldown: d0's probe goes and SES takes it
    assert ("identity d0.example",) == scopes.begin(["identity d0.example"])
    scopes.succeeded(["identity d0.example"])
    scopes.failed("identity d3.example", reply="MessageRejected: x", advice="verify")
    with caplog.at_level(logging.WARNING, logger="relay.ses"):
        scopes.failed("identity d4.example", reply="MessageRejected: x", advice="verify")
    names = {"d1.example", "d2.example", "d3.example"}
    assert names == set(n.removeprefix("identity ") for n in scopes.circuits)
    opened = {labels["identity"] for labels in series("relay_ses_identity_circuit_open")}
    counted = {labels["identity"] for labels in series("relay_ses_identity_circuit_openings_total")}
    assert (set(), set()) == (opened & {"d0.example", "d4.example"}, counted & {"d0.example"})
    assert names <= opened and names <= counted
    assert (
        "event=scope_circuits_full" in caplog.text and 'scope="identity d4.example"' in caplog.text
    )
