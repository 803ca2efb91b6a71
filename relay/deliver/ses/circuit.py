"""Circuit breaker for account-wide SES failures.

When SES says the whole account cannot send (sending paused, daily quota spent,
configuration set missing, bad credentials), every SES-routed message would
fail the same way. The circuit opens: SES-routed mail goes upstream for
`cooldown` seconds, then one message is let through as a probe. Its success
closes the circuit; its failure opens it for another cooldown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

from relay import logs

log = logging.getLogger("relay.deliver")


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


class Circuit:
    def __init__(self, cooldown: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self.state = CircuitState.CLOSED
        self.reason = ""
        self._clock = clock
        self._opened_at = 0.0

    def allow(self) -> bool:
        """May this message try SES? While open, only one probe after the cooldown."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self.state = CircuitState.PROBING
            logs.event(log, "circuit_probe", reason=self.reason)
            return True
        return False

    def succeeded(self) -> None:
        """SES took a call. Only the probe's success closes the circuit: a send that was
        already in flight when the circuit opened proves nothing about the account now."""
        if self.state is CircuitState.PROBING:
            logs.event(log, "circuit_closed", level=logging.WARNING, after=self.reason)
            self.state = CircuitState.CLOSED
            self.reason = ""

    def failed(self, reason: str) -> bool:
        """Open (or re-open) the circuit; True when it was closed before (alert once)."""
        was_closed = self.state is CircuitState.CLOSED
        self.state = CircuitState.OPEN
        self.reason = reason
        self._opened_at = self._clock()
        if was_closed:
            logs.event(
                log,
                "circuit_open",
                level=logging.ERROR,
                cooldown=self.cooldown,
                reason=reason,
                effect="SES-routed mail goes upstream",
            )
        return was_closed

    def probe_aborted(self) -> None:
        """The probe never reached SES (e.g. pacing): let the next message probe."""
        if self.state is CircuitState.PROBING:
            self.state = CircuitState.OPEN
            self._opened_at = self._clock() - self.cooldown
