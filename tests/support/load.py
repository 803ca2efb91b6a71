"""Load for the reliability scenarios: clients that keep sending, and the count at the end.

- `Senders`: client threads that keep sending distinct mails over SMTP and record
  which were 250'd (a refused or broken transaction is simply not counted: Moodle
  never retries, and the next mail is a different one).
- `Tally`: what reached SES and the original host, by Message-ID; `summary()` prints
  the line every scenario ends with and returns the numbers for the asserts.
- `seeded(name)`: a Random whose seed is printed, to rerun a scenario the same way.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.receive.handler import extract_message_id
from tests.support.capture import CaptureServer
from tests.support.fakeses import FakeSes
from tests.support.mails import MailFactory, Outgoing
from tests.support.smtp import Reply, try_send

SEED_ENV = "RELAY_TEST_SEED"


def seeded(name: str) -> random.Random:
    """A Random seeded from $RELAY_TEST_SEED or the clock; the seed is printed to rerun."""
    seed = int(os.environ.get(SEED_ENV) or time.time_ns() % 1_000_000_007)
    print(f"{name}: seed {seed} (rerun with {SEED_ENV}={seed})")
    return random.Random(seed)


@dataclass
class Senders:
    """`threads` clients sending `factory()` mails to `port` until `stop()`, `pause` apart."""

    port: int
    factory: MailFactory
    threads: int = 3
    pause: float = 0.05
    attempted: int = 0
    acked: dict[str, tuple[str, Outgoing]] = field(default_factory=dict)  # msgid -> (qid, mail)
    refused: list[str] = field(default_factory=list)  # Message-IDs without a 250
    replies: list[list[Reply]] = field(default_factory=list)  # per thread, in order
    slowest: float = 0.0  # seconds, slowest 250'd transaction

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.replies = [[] for _ in range(self.threads)]
        self._workers = [
            threading.Thread(target=self._run, args=(i,), name=f"sender-{i}", daemon=True)
            for i in range(self.threads)
        ]

    def start(self) -> Senders:
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)
        assert not any(w.is_alive() for w in self._workers), "a sender thread hung"

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            mail = self.factory()
            started = time.monotonic()
            reply = try_send(self.port, mail)
            took = time.monotonic() - started
            queue_id = reply.queue_id
            with self._lock:
                self.replies[index].append(reply)
                self.attempted += 1
                if queue_id is None:
                    self.refused.append(mail.message_id)
                else:
                    self.acked[mail.message_id] = (queue_id, mail)
                    self.slowest = max(self.slowest, took)
            self._stop.wait(self.pause if queue_id else 0.05)

    def seen(self) -> list[list[Reply]]:
        """A copy of each client's replies so far, in order."""
        with self._lock:
            return [list(replies) for replies in self.replies]

    def queue_ids(self) -> dict[str, str]:
        """queue id -> expected route, of every 250'd mail."""
        with self._lock:
            return {qid: mail.route for qid, mail in self.acked.values()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Tally:
    """Deliveries by route: Message-ID -> how many copies arrived there."""

    ses: Counter[str]
    upstream: Counter[str]

    @classmethod
    def of(cls, fake: FakeSes, capture: CaptureServer) -> Tally:
        return cls(
            ses=Counter(extract_message_id(s.raw) for s in list(fake.sent)),
            upstream=Counter(m.message_id for m in capture.messages),
        )

    def copies(self) -> Counter[str]:
        return self.ses + self.upstream


def summary(
    name: str,
    senders: Senders,
    tally: Tally,
    *,
    failed: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the scenario's summary line; return its numbers.

    `lost`: 250'd mails neither delivered anywhere nor dead-lettered (`failed`:
    Message-IDs in state failed); `duplicates`: copies beyond the first.
    """
    copies = tally.copies()
    acked = set(senders.acked)
    dead = set(failed)
    numbers: dict[str, Any] = {
        "mails sent": senders.attempted,
        "250s": len(acked),
        "delivered ses": sum(1 for m in acked if tally.ses[m]),
        "delivered upstream": sum(1 for m in acked if tally.upstream[m]),
        "dead letters": len(dead & acked),
        "duplicates": sum(n - 1 for m, n in copies.items() if m in acked and n > 1),
        "lost": len(acked - set(copies) - dead),
        "unacked but delivered": len(set(copies) - acked),
        **(extra or {}),
    }
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    return numbers
