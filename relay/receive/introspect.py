"""What aiosmtpd 1.4.6's SMTP.__init__ finds by introspecting a session and its handler
(AUTH mechanisms, hooks, the EHLO hook's signature, commands), found once per pair of
classes instead of on every connection. `relay.receive.session.Session.__init__` re-creates
aiosmtpd's __init__ with it; tests/test_session_fast.py compares the two. The tables of
methods it builds from that (`Methods`, `AuthMethods`) bind each method when asked.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from warnings import warn

from aiosmtpd.smtp import _AuthMechAttr


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """What aiosmtpd's SMTP.__init__ finds by introspection, by attribute name."""

    auth: dict[str, tuple[str, bool]]  # mechanism -> (method name, aiosmtpd's own method)
    auth_line: str  # the "Available AUTH mechanisms" log line
    hooks: dict[str, str]  # "DATA" -> "handle_DATA", ...
    ehlo: str | None  # which handle_EHLO signature: None, "old" or "new"
    commands: dict[str, str]  # "DATA" -> "smtp_DATA", ...


_FOUND: dict[tuple[type, type], Found] = {}


def discover(session: object, handler: object) -> Found:
    """aiosmtpd 1.4.6's introspection of the session and the handler, once per pair of
    classes (relay's hooks and AUTH mechanisms are methods, the same for every instance)."""
    key = (type(session), type(handler))
    if key in _FOUND:
        return _FOUND[key]
    auth: dict[str, tuple[str, bool]] = {}
    for obj in (session, handler):  # the handler's mechanisms replace aiosmtpd's
        for name, method in inspect.getmembers(obj):
            if name.startswith("auth_"):
                default = name.replace("auth_", "").replace("__", "-")
                auth[getattr(method, "__auth_mechanism_name__", default)] = (name, obj is session)
    hooks = {m.replace("handle_", ""): m for m in dir(handler) if m.startswith("handle_")}
    ehlo = None
    if hasattr(handler, "handle_EHLO"):
        ehlo = {4: "old", 5: "new"}.get(len(inspect.signature(handler.handle_EHLO).parameters))
        if ehlo is None:
            raise RuntimeError("Unsupported EHLO Hook")
        if ehlo == "old":
            warn(
                "Use the 5-argument handle_EHLO() hook instead of the 4-argument one",
                DeprecationWarning,
                stacklevel=2,
            )
    mechanisms = (m + "(builtin)" if builtin else m for m, (_, builtin) in sorted(auth.items()))
    _FOUND[key] = Found(
        auth=auth,
        auth_line="Available AUTH mechanisms: " + " ".join(mechanisms),
        hooks=hooks,
        ehlo=ehlo,
        commands={m.replace("smtp_", ""): m for m in dir(session) if m.startswith("smtp_")},
    )
    return _FOUND[key]


class Methods(Mapping[str, Any]):
    """aiosmtpd's name -> bound method dicts (`_smtp_methods`, `_handle_hooks`), each
    method bound when it is asked for: building them for every command and hook of every
    connection was 4% of the event loop's samples at 20 sessions (bench/README.md, "The
    spool's free bytes, once per 0.1 s"), and a mail asks for six."""

    __slots__ = ("_names", "_owner")

    def __init__(self, owner: object, names: Mapping[str, str]) -> None:
        self._owner, self._names = owner, names  # names: Found's, shared by every session

    def __getitem__(self, key: str) -> Any:
        return getattr(self._owner, self._names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class AuthMethods(Mapping[str, _AuthMechAttr]):
    """aiosmtpd's `_auth_methods`, bound as `Methods` binds: aiosmtpd's own mechanisms to
    the session, the handler's to the handler."""

    __slots__ = ("_handler", "_names", "_session")

    def __init__(
        self, session: object, handler: object, names: dict[str, tuple[str, bool]]
    ) -> None:
        self._session, self._handler, self._names = session, handler, names

    def __getitem__(self, key: str) -> _AuthMechAttr:
        name, builtin = self._names[key]
        return _AuthMechAttr(getattr(self._session if builtin else self._handler, name), builtin)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
