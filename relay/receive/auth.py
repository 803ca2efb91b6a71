"""AUTH PLAIN and LOGIN for the SMTP front door: relay's users file, and guessing made slow.

    AUTH --aiosmtpd--> Auth.auth_PLAIN / auth_LOGIN --> passwords.Users.verify (scrypt, on a
        thread) --> 235, or a 535 delayed by guesses.Guesses, or 421 and close at
        `limits.max_auth_failures` on one connection (relay.receive.guard counts them)

They replace aiosmtpd's built-in mechanisms: the scrypt check never blocks the event
loop, and the password is never kept on the session. `Auth` is a base of the handler
(relay.receive.handler), where aiosmtpd looks for `auth_*` methods.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from base64 import b64decode
from typing import Protocol, runtime_checkable

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, _Missing

from relay import logs, metrics
from relay.receive.caps import Refusal, client_of, peer_ip_of
from relay.receive.guesses import TOO_MANY_FAILURES, Guesses
from relay.receive.passwords import Users

log = logging.getLogger("relay.receive")

USER_SHOWN = 64  # characters of a user name a log line shows
# An AUTH whose client hung up before its answer: counted like any failure, logged at most
# once per 10 s with how many (700 lines a second, 340 KB/s, from one client before)
_ABANDONED = logs.Sampled(log, "auth_abandoned")
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_BAD_PLAIN = "501 5.5.2 Cannot split AUTH PLAIN value"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"  # RFC 4954, 4


@runtime_checkable
class Limited(Protocol):
    """What `Auth` needs of a session to close it at `max_auth_failures`
    (relay.receive.guard.Guard, a base of relay.receive.session.Session)."""

    auth_failures: int

    def close_for(self, reason: Refusal, reply: str) -> None: ...


class Auth:
    """aiosmtpd's AUTH hooks, against `users` (None: no accounts, AUTH always fails)."""

    users: Users | None
    guesses: Guesses
    max_auth_failures: int

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await (_challenge(server, "") if len(args) == 1 else _b64(server, args[1]))
        if not isinstance(blob, bytes):
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push(AUTH_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        challenge = SMTP.AuthLoginUsernameChallenge
        user = await (_challenge(server, challenge) if len(args) == 1 else _b64(server, args[1]))
        if not isinstance(user, bytes):
            return AuthResult(success=False, handled=True)
        password = await _challenge(server, SMTP.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(server, user, password)

    async def _check(self, server: SMTP, user: bytes, password: bytes) -> AuthResult:
        """235, or (see relay.receive.guesses) a delayed 535, or 421 and close at
        `max_auth_failures` on this connection."""
        name = user.decode("utf-8", "replace")
        if self.users is None:  # no accounts, so nothing to guess: no delay, no count
            metrics.REJECTED.labels("auth_failed").inc()
            return AuthResult(success=False, handled=False, message=AUTH_FAILED)
        try:
            ok = await self.users.verify(user, password)
        except asyncio.CancelledError:  # hung up before the answer: a guess all the same
            self._failed(server, name, hung_up=True)  # (Postfix's anvil counts AUTH requests)
            raise
        if ok:
            return AuthResult(success=True, auth_data=name, message=AUTH_OK)
        failures, delay = self._failed(server, name)
        await asyncio.sleep(delay)
        if failures >= self.max_auth_failures and isinstance(server, Limited):
            server.close_for(Refusal.AUTH_FAILURES, TOO_MANY_FAILURES)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=AUTH_FAILED)

    def _failed(self, server: SMTP, name: str, *, hung_up: bool = False) -> tuple[int, float]:
        """Count and log a failed AUTH: (failures on this connection, the delay earned)."""
        metrics.REJECTED.labels("auth_failed").inc()
        metrics.AUTH_FAILURES.inc()
        peer = peer_ip_of(server.session) if server.session else "?"
        limited = server if isinstance(server, Limited) else None  # relay's Session
        failures = 1 if limited is None else limited.auth_failures + 1
        if limited is not None:
            limited.auth_failures = failures
        client = client_of(peer)
        delay = self.guesses.failed(client, failures)
        user, guessed = name[:USER_SHOWN], self.guesses.count(client)
        if hung_up:  # no scrypt, no delay: a client can do this as fast as it connects
            _ABANDONED(user=user, peer=peer, from_peer=guessed)
            return failures, delay
        logs.event(
            log,
            "auth_failed",
            level=logging.WARNING,
            user=user,
            peer=peer,
            on_connection=failures,
            from_peer=guessed,
            delay=delay,
        )
        return failures, delay


async def _challenge(server: SMTP, challenge: str) -> bytes | _Missing:
    """aiosmtpd's challenge_auth, except that an answer longer than a line may be (its
    readline raises ValueError) gets RFC 4954's 500 5.5.6, a 5xx that counts as junk,
    instead of 451 and a traceback in the log for each."""
    try:
        return await server.challenge_auth(challenge)
    except ValueError:
        await server.push(AUTH_LINE_TOO_LONG)
        return MISSING


async def _b64(server: SMTP, text: str) -> bytes | _Missing:
    try:
        return b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        await server.push(AUTH_BAD_BASE64)
        return MISSING
