"""What aiosmtpd 1.4.6's SMTP.__init__ finds by introspecting a session and its handler
(AUTH mechanisms, hooks, the EHLO hook's signature, commands), found once per pair of
classes instead of on every connection. `relay.receive.session.Session.__init__` re-creates
aiosmtpd's __init__ with it; tests/test_session_fast.py compares the two.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from warnings import warn


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """What aiosmtpd's SMTP.__init__ finds by introspection, by attribute name."""

    auth: dict[str, tuple[str, bool]]  # mechanism -> (method name, aiosmtpd's own method)
    auth_line: str  # the "Available AUTH mechanisms" log line
    hooks: tuple[tuple[str, str], ...]  # ("DATA", "handle_DATA"), ...
    ehlo: str | None  # which handle_EHLO signature: None, "old" or "new"
    commands: tuple[tuple[str, str], ...]  # ("DATA", "smtp_DATA"), ...


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
    hooks = tuple((m.replace("handle_", ""), m) for m in dir(handler) if m.startswith("handle_"))
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
        commands=tuple((m.replace("smtp_", ""), m) for m in dir(session) if m.startswith("smtp_")),
    )
    return _FOUND[key]
