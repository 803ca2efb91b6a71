"""A busy queue is delivered in batches: claims take several rows, outcomes that come in
together share a commit, and no more than `deliverers` mails are ever in flight.

The spool is the real one, opened as the delivery process opens it; the original host
is a fake that answers after a few milliseconds, so sends overlap as they do on a
socket.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from relay.deliver.loop import Deliverer
from relay.deliver.ses.circuit import Circuit
from relay.deliver.ses.route import SesRoute
from relay.deliver.upstream import UpstreamResult
from relay.mail import Mail
from relay.rules import Route, RuleSet
from relay.settings import HostPort, Settings, Upstream
from relay.spool import Spool
from tests.support.spools import TRACE

MAILS = 200
DELIVERERS = 16


class SlowHost:
    """An UpstreamSender that accepts every mail after 1-4 ms; counts sends in flight."""

    def __init__(self) -> None:
        self.rng = random.Random(1)
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent: list[str] = []
        self.all_sent = asyncio.Event()

    async def send(self, mail: Mail) -> UpstreamResult:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.rng.uniform(0.001, 0.004))
        finally:
            self.in_flight -= 1
        self.sent.append(mail.id)
        if len(self.sent) == MAILS:
            self.all_sent.set()
        return UpstreamResult(accepted=mail.recipients, reply="250 2.0.0 Ok")

    async def close(self) -> None:
        pass


class CountingSpool:
    """The real delivery-side Spool, with the limit of every claim written down."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.limits: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.spool, name)

    async def claim(self, limit: int, *, parked: int = 0) -> list[Mail]:
        self.limits.append(limit)
        return await self.spool.claim(limit, parked=parked)


async def test_a_busy_queue_is_claimed_and_recorded_in_batches(tmp_path: Path) -> None:
    receive = await Spool.open(tmp_path / "spool")
    delivery = await Spool.open(tmp_path / "spool", full_sync=False)
    try:
        for n in range(MAILS):
            await receive.add(
                sender="noreply@moodle.test",
                recipients=[f"user{n}@example.org"],
                raw=f"Subject: {n}\r\n\r\nbody\r\n".encode(),
                peer="127.0.0.1",
                trace=TRACE,
                message_id=f"<{n}@moodle.test>",
            )
        host, counting = SlowHost(), CountingSpool(delivery)
        settings = Settings(
            source=Path("relay.yaml"),
            listen=HostPort(host="127.0.0.1", port=2525),
            spool=tmp_path / "spool",
            rules=Path("rules.yaml"),
            upstream=Upstream(host="smtp.example.org"),
            hostname="relay.test",
            deliverers=DELIVERERS,
        )
        deliverer = Deliverer(
            settings=settings,
            spool=counting,  # type: ignore[arg-type]
            rules=RuleSet(source="rules.yaml", default=Route.UPSTREAM, rules=()),
            upstream=host,
            ses_route=SesRoute(ses=None, pace=None, circuit=Circuit(300.0)),
            wakeup=delivery.wakeup,
        )
        stop = asyncio.Event()
        commits_before = delivery.commits
        running = asyncio.create_task(deliverer.run(stop))
        async with asyncio.timeout(30):
            await host.all_sent.wait()
        stop.set()
        await running
        await deliverer.drain(5.0)
        commits = delivery.commits - commits_before
        counts = await delivery.counts()
    finally:
        await delivery.close()
        await receive.close()
    assert (MAILS, MAILS) == (len(set(host.sent)), counts["sent"])
    assert host.most_in_flight <= DELIVERERS
    assert min(counting.limits) >= DELIVERERS // 4, counting.limits  # a quarter of the slots
    # A claim and an outcome of their own per mail would be 2 * MAILS transactions.
    assert commits < MAILS, f"{commits} commits for {MAILS} mails"
