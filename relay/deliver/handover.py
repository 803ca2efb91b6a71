"""What `relay serve` hands its delivery process on stdin: the settings and rules it runs on.

    relay serve: pack(settings, rules) --stdin--> delivery process: unpack(stdin)

Not the files as they are now: an edit not yet reloaded, or refused, must not change what a
restarted delivery process does (relay.deliver.supervisor). The objects are pickles of this
code's classes, though: a delivery process started from other code on disk (an upgrade not
yet restarted) reads relay.yaml and the rules itself instead, as relay serve will at its
restart.

Later, on the socketpair that carries metrics scrapes, RELOAD asks the delivery process to
reload relay.yaml and the rules, as SIGHUP does relay serve.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import BinaryIO

from relay import rules as rules_mod
from relay import settings as settings_mod
from relay.rules import RuleSet
from relay.settings import Settings


def code_stamp() -> str:
    """A digest of the code that defines what settings and rules are made of."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("settings/*.py"), *root.glob("rules/*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


RELOAD = b"reload"  # a scrape request is a sequence number: never this

CODE = code_stamp()  # of the code this process imported, read when it started


def pack(settings: Settings, rules: RuleSet) -> bytes:
    return pickle.dumps((CODE, str(settings.source), pickle.dumps((settings, rules))))


def unpack(stream: BinaryIO) -> tuple[Settings, RuleSet, bool]:
    """(settings, rules, whether the files were read because the code differs). ConfigError
    when they were and are unusable."""
    code, source, objects = pickle.load(stream)
    if code == CODE:
        settings, rules = pickle.loads(objects)
        return settings, rules, False
    settings = settings_mod.load(Path(source))
    return settings, rules_mod.load(settings.rules, ses_region=settings.ses.region), True
