"""The one exception tree of relay.

    RelayError
    ├── ConfigError (ValueError)        a settings or rules file is wrong; carries every Problem
    ├── SpoolError (OSError)            the spool could not commit or read; the client gets 451
    ├── MalformedEvent (ValueError)     an SES feedback message that is no SES event: dropped
    └── DeliveryError                   a send did not succeed
        ├── TemporaryFailure            try again later (4xx, timeouts, throttling, 5xx from SES)
        │   ├── Throttled               SES "Maximum sending rate exceeded": slow the pace
        │   ├── Unconfirmed             SES got the request but its answer never came: it
        │   │                           may have sent the mail (never to SES again)
        │   └── HostUnreachable         the original host refused or timed out the connection
        └── PermanentFailure            this message will not go this way (5xx, MessageRejected)
            ├── NotSent                 refused before any call to SES (too big, too many
            │                           recipients): SES said nothing, about anything
            ├── AccountFailure          the SES account cannot send for now (opens the circuit)
            └── ScopedFailure           one SES identity or configuration set cannot send (opens
                                        a circuit for that scope only)

Messages say what failed, for which message or file, and why; the cause is chained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class RelayError(Exception):
    """Root of every error relay raises on purpose."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong in a configuration file, located precisely enough to fix it."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class ConfigError(RelayError, ValueError):
    """A settings or rules file cannot be used; `problems` lists every reason."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SpoolError(RelayError, OSError):
    """The spool could not commit or read; nothing was half-written."""


class MalformedEvent(RelayError, ValueError):
    """A message on the SES feedback queue is not an SES event; it is logged and deleted."""


class DeliveryError(RelayError):
    """A send did not succeed. `reply` is what the far side said, for the record; `status`
    the RFC 3463 code when relay, not the far side, says why (else read from `reply`)."""

    def __init__(self, message: str, *, reply: str = "", status: str = "") -> None:
        super().__init__(message)
        self.reply = reply or message
        self.status = status


class TemporaryFailure(DeliveryError):
    """Try again later: the far side or the path to it is unavailable for now."""


class Throttled(TemporaryFailure):
    """SES refused for the sending rate ("Maximum sending rate exceeded"): slow down, retry."""


class Unconfirmed(TemporaryFailure):
    """The request went out to SES and no answer came in time (a read timeout, the whole
    call's deadline, a 200 without a MessageId): SES may have sent the mail, so another
    SES call may send another copy."""


class HostUnreachable(TemporaryFailure):
    """The original host could not be reached at all (refused, timed out, busy greeting)."""


class HostUnusable(TemporaryFailure):
    """The original host answered, but no session could be set up (EHLO, STARTTLS, the
    certificate, AUTH): the same for every mail, so the next ones wait (Postfix's
    smtp_sess_fail throttles the destination)."""


class PermanentFailure(DeliveryError):
    """This message will not be accepted this way; retrying the same way is pointless."""


class NotSent(PermanentFailure):
    """The message cannot go to SES as it is, known before any call (over the size limit,
    no or too many recipients, a request botocore will not build): no answer from SES,
    so nothing learnt about the account (a probe that ends so is no probe)."""


class AccountFailure(PermanentFailure):
    """The SES account cannot send at all for now (paused, quota spent, credentials)."""


class ScopedFailure(PermanentFailure):
    """One SES identity (a domain) or configuration set cannot send for now: unverified,
    custom MAIL FROM not verified, configuration set missing. `scope` names it
    ("identity lms.example.edu", "configuration set reminders"); `advice` says what to do."""

    def __init__(self, message: str, *, reply: str = "", scope: str, advice: str) -> None:
        super().__init__(message, reply=reply)
        self.scope = scope
        self.advice = advice
