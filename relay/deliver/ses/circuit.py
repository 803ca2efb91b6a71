"""Circuit breaker for account-wide SES failures.

When SES says the whole account cannot send (sending paused, daily quota spent,
configuration set missing, bad credentials), every SES-routed message would
fail the same way. The circuit opens: SES-routed mail goes upstream for
`cooldown` seconds, then one message is let through as a probe. Its success
closes the circuit; its failure opens it for another cooldown.

A circuit with a `scope` ("identity lms.example.edu", "configuration set x") does the
same for the mail of one identity or configuration set only (`scopes.Scopes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from relay import logs

log = logging.getLogger("relay.deliver")


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


class Circuit:
    def __init__(
        self, cooldown: float, *, clock: Callable[[], float] = time.monotonic, scope: str = ""
    ) -> None:
        self.cooldown = cooldown
        self.scope = scope
        self.state = CircuitState.CLOSED
        self.reason = ""
        self.clock = clock
        self._opened_at = 0.0

    def allow(self) -> bool:
        """May this message try SES? While open, only one probe after the cooldown."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN and self.clock() - self._opened_at >= self.cooldown:
            self.state = CircuitState.PROBING
            logs.event(log, "circuit_probe", reason=self.reason, **self._scoped())
            return True
        return False

    def waiting(self) -> bool:
        """True while no message may try SES: open within the cooldown, or a probe in flight."""
        if self.state is CircuitState.PROBING:
            return True
        return self.state is CircuitState.OPEN and self.clock() - self._opened_at < self.cooldown

    def _scoped(self, **fields: str) -> dict[str, Any]:
        return {"scope": self.scope, **fields} if self.scope else {}

    def succeeded(self) -> None:
        """SES took a call. Only the probe's success closes the circuit: a send that was
        already in flight when the circuit opened proves nothing about the account now."""
        if self.state is CircuitState.PROBING:
            logs.event(
                log, "circuit_closed", level=logging.WARNING, after=self.reason, **self._scoped()
            )
            self.state = CircuitState.CLOSED
            self.reason = ""

    def failed(self, reason: str, *, advice: str = "") -> bool:
        """Open (or re-open) the circuit; True when it was closed before (alert once, with
        `advice`: what an admin should do)."""
        was_closed = self.state is CircuitState.CLOSED
        self.state = CircuitState.OPEN
        self.reason = reason
        self._opened_at = self.clock()
        if was_closed:
            logs.event(
                log,
                "circuit_open",
                level=logging.ERROR,
                cooldown=self.cooldown,
                reason=reason,
                effect=f"SES-routed mail{' of ' + self.scope if self.scope else ''} goes upstream",
                **self._scoped(do=advice),
            )
        return was_closed

    def probe_aborted(self) -> None:
        """The probe never reached SES (e.g. pacing): let the next message probe."""
        if self.state is CircuitState.PROBING:
            self.state = CircuitState.OPEN
            self._opened_at = self.clock() - self.cooldown
