"""Circuits for one SES identity or configuration set, next to the account's circuit.

An unverified identity, a custom MAIL FROM domain SES cannot use, or a configuration set
that does not exist stop the mail of that identity or set only (`faults.scoped` names the
scope). The mail's scopes are its Source domain, its From header's domain and its
configuration set: while one of their circuits is open, the mail goes upstream without an
SES call; after the cooldown one mail probes for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from email.utils import parseaddr

from relay import logs, metrics
from relay.deliver.ses.circuit import Circuit, CircuitState
from relay.mail import Mail, first_header

IDENTITY = "identity"
CONFIGURATION_SET = "configuration set"
# Circuits kept at a time. A site has a handful of identities and sets, but the From
# domain is the mail's: a client sending SES-bound mail from endless domains SES does not
# know would grow the circuits, and the metric series, without end. Past this, closed
# circuits are forgotten (their series too); with none closed, no new one opens (the mail
# goes upstream all the same, only the next of that scope tries SES again).
MAX_SCOPES = 100
FROM_LIMIT = 10_000  # characters of a From header read for its domain (Moodle's: under 200)

log = logging.getLogger("relay.ses")
_FULL = logs.Sampled(log, "scope_circuits_full", limit=MAX_SCOPES)


def keys(mail: Mail, *, source: str, configuration_set: str | None) -> tuple[str, ...]:
    """The scopes `mail` sends under: Source and From domains, configuration set."""
    found = [f"{IDENTITY} {source.rpartition('@')[2].lower()}"]
    try:  # not the whole message parsed: see first_header
        sender = parseaddr(first_header(mail.raw, "From", FROM_LIMIT))[1]
    except (
        Exception
    ):  # a From the parser cannot read (RecursionError on "((((..."): SES will say so
        sender = ""
    if "@" in sender:
        found.append(f"{IDENTITY} {sender.rpartition('@')[2].lower()}")
    if configuration_set:
        found.append(f"{CONFIGURATION_SET} {configuration_set}")
    return tuple(dict.fromkeys(found))


class Scopes:
    """One Circuit per scope that failed, made on first failure."""

    def __init__(self, cooldown: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self.circuits: dict[str, Circuit] = {}
        self._codes: dict[str, set[str]] = {}  # the openings' codes, for their series

    def waiting(self, scopes: Iterable[str]) -> Circuit | None:
        """The first circuit among `scopes` that lets no mail through now, or None."""
        for scope in scopes:
            circuit = self.circuits.get(scope)
            if circuit is not None and circuit.waiting():
                return circuit
        return None

    def begin(self, scopes: Iterable[str]) -> tuple[str, ...]:
        """This mail tries SES: it is the probe of every scope past its cooldown."""
        probes = []
        for scope in scopes:
            circuit = self.circuits.get(scope)
            if circuit is not None and circuit.state is CircuitState.OPEN and circuit.allow():
                probes.append(scope)
        return tuple(probes)

    def failed(self, scope: str, *, reply: str, advice: str) -> None:
        """SES refused `scope`: open its circuit (one ERROR line and one count when it opens)."""
        circuit = self.circuits.get(scope)
        if circuit is None:
            if len(self.circuits) >= MAX_SCOPES:
                self._forget_closed()
            if len(self.circuits) >= MAX_SCOPES:
                _FULL(scope=scope)
                return
            circuit = self.circuits[scope] = Circuit(self.cooldown, clock=self._clock, scope=scope)
        if circuit.failed(reply, advice=advice):
            code = reply.split(":", 1)[0].strip()[:64]
            metrics.SCOPE_CIRCUIT_OPENINGS.labels(_kind(scope), _name(scope), code).inc()
            self._codes.setdefault(scope, set()).add(code)
        metrics.SCOPE_CIRCUIT_OPEN.labels(_kind(scope), _name(scope)).set(1)

    def _forget_closed(self) -> None:
        for scope, circuit in list(self.circuits.items()):
            if circuit.state is CircuitState.CLOSED:
                del self.circuits[scope]
                labels = (_kind(scope), _name(scope))
                with contextlib.suppress(KeyError):
                    metrics.SCOPE_CIRCUIT_OPEN.remove(*labels)
                for code in self._codes.pop(scope, ()):
                    with contextlib.suppress(KeyError):
                        metrics.SCOPE_CIRCUIT_OPENINGS.remove(*labels, code)

    def succeeded(self, scopes: Iterable[str]) -> None:
        """SES took the probe: close those circuits."""
        for scope in scopes:
            circuit = self.circuits[scope]
            circuit.succeeded()
            if circuit.state is CircuitState.CLOSED:
                metrics.SCOPE_CIRCUIT_OPEN.labels(_kind(scope), _name(scope)).set(0)

    def aborted(self, scopes: Iterable[str]) -> None:
        """The probe said nothing about these scopes: the next mail probes."""
        for scope in scopes:
            self.circuits[scope].probe_aborted()


def _kind(scope: str) -> str:
    return "configuration_set" if scope.startswith(CONFIGURATION_SET) else IDENTITY


def _name(scope: str) -> str:
    prefix = CONFIGURATION_SET if scope.startswith(CONFIGURATION_SET) else IDENTITY
    return scope.removeprefix(prefix).strip()
