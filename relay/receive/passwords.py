"""Password hashes for `auth.users_file` and checking SMTP AUTH credentials against them.

The users file has one `user:hash` line per user (`#` comments and blank lines
allowed). The hash format is scrypt with its parameters spelled out:

    $scrypt$n=16384,r=8,p=1$<salt, base64>$<key, base64>

(base64 without padding). `hash_password()` makes one; `relay hash-password`
prints it. Plain-text passwords in the file are refused, never compared.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from relay import logs

log = logging.getLogger("relay.receive")
_UNUSABLE = logs.Sampled(log, "users_file_unusable")  # each AUTH would log it

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
_KEY_LEN = 32
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A `$scrypt$n=..,r=..,p=..$salt$key` line for `password`, with a fresh random salt."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=_KEY_LEN
    )
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """True when `password` matches `encoded`; False for a wrong password or unknown format."""
    try:
        _, scheme, params, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        values = dict(item.split("=", 1) for item in params.split(","))
        n, r, p = int(values["n"]), int(values["r"]), int(values["p"])
        expected = _unb64(key)
        actual = hashlib.scrypt(
            password, salt=_unb64(salt), n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(expected)
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(expected, actual)


@dataclass(frozen=True, slots=True)
class _Loaded:
    stamp: tuple[int, int]
    hashes: dict[str, str]


class Users:
    """The users file, re-read when it changes; verifies without blocking the event loop.

    A successful check is remembered (as an HMAC of the password under a
    per-process key, never the password) so that Moodle, which logs in on every
    connection, pays for scrypt once per process, not once per mail.

    An unknown user costs the same scrypt as a known one (against a hash of a random
    password with the first user's parameters), so timing does not tell which users
    exist. One scrypt runs at a time: guessers queue behind each other and take at
    most one core, not the whole machine (Moodle's remembered login skips the queue).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: _Loaded | None = None
        self._key = secrets.token_bytes(32)
        self._good: set[tuple[str, bytes]] = set()
        self._decoy: str | None = None
        self._turn = asyncio.Semaphore(1)

    def _hashes(self) -> dict[str, str]:
        """The users, re-read when the file changes. A file gone, unreadable or without a
        user line (being rewritten, or written by root with umask 077) keeps the users last
        read: relay refuses to start on such a file, and meanwhile answered Moodle's every
        AUTH with 535, and Moodle does not send again."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if self._loaded is not None and self._loaded.stamp == stamp:
                return self._loaded.hashes
            hashes = parse_users(self.path.read_text(encoding="utf-8"))
            problem = None if hashes else "no user:$scrypt$... line"
        except (OSError, UnicodeDecodeError) as exc:
            if self._loaded is None:
                raise
            problem = getattr(exc, "strerror", None) or str(exc)
        if problem is not None and self._loaded is not None:
            _UNUSABLE(path=str(self.path), error=problem, keeping="the users last read")
            return self._loaded.hashes
        self._loaded = _Loaded(stamp, hashes)
        self._good.clear()
        self._decoy = None
        return hashes

    def _decoy_hash(self, hashes: dict[str, str]) -> str:
        """A hash no password matches, costing what the users' hashes cost."""
        if self._decoy is None:
            params = {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
            for encoded in hashes.values():
                try:
                    fields = encoded.split("$")[2].split(",")
                    params = {k: int(v) for k, v in (f.split("=", 1) for f in fields)}
                    break
                except (IndexError, ValueError):
                    continue
            self._decoy = hash_password(secrets.token_hex(16), **params)
        return self._decoy

    async def verify(self, user: bytes, password: bytes) -> bool:
        """True when `user` exists and `password` is theirs."""
        try:
            hashes = self._hashes()
        except OSError:
            return False
        name = user.decode("utf-8", "surrogateescape")
        encoded = hashes.get(name)
        token = (name, hmac.digest(self._key, password, "sha256"))
        if encoded is not None and token in self._good:
            return True
        async with self._turn:
            check = asyncio.ensure_future(
                asyncio.to_thread(verify_password, password, encoded or self._decoy_hash(hashes))
            )
            try:
                ok = await asyncio.shield(check)
            except asyncio.CancelledError:
                # The client hung up. Its scrypt runs on in its thread: the next waits for
                # it, or a guesser hanging up at once would run one per core.
                await asyncio.wait([check])
                raise
        if ok and encoded is not None:
            self._good.add(token)
            return True
        return False


def user_entry(line: str) -> tuple[str, str] | None:
    """(user, hash) of a users-file line `user:$scrypt$...`; None for any other line."""
    user, _, encoded = line.strip().partition(":")
    if user.strip() and not user.startswith("#") and encoded.strip().startswith("$scrypt$"):
        return user.strip(), encoded.strip()
    return None


def parse_users(text: str) -> dict[str, str]:
    """`user:hash` lines -> {user: hash}; other lines are skipped with a warning."""
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if entry := user_entry(line):
            users[entry[0]] = entry[1]
        else:  # never log the line itself: it may hold a plain-text password
            log.warning(
                "event=users_line_ignored line=%d reason=%r",
                number,
                "not user:$scrypt$... (relay hash-password makes one)",
            )
    return users
