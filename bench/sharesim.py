"""The bench's shared-quota scenarios in the simulator, over many seeds: how often a bench run
can be expected to meet issue 14's goals, without running one.

    .venv/bin/python -m bench.sharesim --seeds 80

Each scenario is `bench/sesbench.py`'s (`shared_scenarios` of a full run) run by
`tests/test_pace.py`'s `Sim` (a sliding 1-second window counted at arrival, as the fake SES):
sixteen senders per relay (the default `deliverers`), 24 ms latency, each start jittered by
0-0.3 s. Figures are measured as the bench measures them, over the span in which every relay
sent. The bench itself is noisier (three relay process pairs, the fake and three smtp-source
on two cores): read these as an upper bound on its pass rate.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass

from bench.sections import FULL
from bench.sesbench import Shared, shared_scenarios
from tests.test_pace import Figures, Sim

SCENARIOS = {sc.name: sc for sc in shared_scenarios(FULL)}
ROUND_TRIP = 0.004  # seconds the bench adds to the fake's answer delay (HTTP on loopback), about


@dataclass(frozen=True, slots=True)
class Outcome:
    figures: Figures  # used, smallest relay and throttled, as tests/test_pace.py's goals
    lost: int

    def met(self) -> bool:
        return self.figures.meets_the_goals() and not self.lost


def scenario(sc: Shared, seed: int, bucket: float | None = None) -> Outcome:
    """One run of the bench scenario `sc`, each relay's start jittered by 0-0.3 s."""
    rng = random.Random(seed * 7919)
    sim = Sim(
        ceilings=(sc.rate_limit,) * len(sc.mails),
        limit=sc.rate_limit,
        mails=sc.mails,
        starts=tuple(at + rng.uniform(0.0, 0.3) for at in sc.starts),
        background=sc.background,
        deliverers=16,
        latency=sc.latency + ROUND_TRIP,
        jitter=0.008,
        seed=seed,
        bucket=bucket,
    ).run(200.0)
    relays = range(len(sc.mails))
    firsts = [min(at for at, r in sim.accepted if r == relay) - sim.start for relay in relays]
    since, until = max(firsts), min(sim.finished(relay) for relay in relays)
    return Outcome(figures=sim.figures(since, until, relays), lost=sim.lost())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sharesim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument(
        "--bucket",
        type=float,
        metavar="SECONDS",
        help="SES as a token bucket holding SECONDS' worth, instead of the fake's sliding window",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of {', '.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    joint = 1.0
    for name in args.names or SCENARIOS:
        sc = SCENARIOS[name]
        runs = [scenario(sc, seed, bucket=args.bucket) for seed in range(1, args.seeds + 1)]
        met = sum(run.met() for run in runs)
        joint *= met / len(runs)
        figures = [run.figures for run in runs]
        used = [f.use for f in figures]
        throttled = [100 * f.throttled for f in figures]
        least = [f.least for f in figures]
        print(
            f"{name:9s}  met {met:3d} of {len(runs)}"
            f"  used {min(used):.3f}-{max(used):.3f}"
            f"  throttled {min(throttled):.2f}-{max(throttled):.2f}%"
            f"  smallest relay {min(least):.2f}-{max(least):.2f}"
        )
    print(f"all of them in one run (the product): {joint:.2f}")


if __name__ == "__main__":
    main()
