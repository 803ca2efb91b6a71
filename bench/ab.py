"""A/B for one transaction at a time: two `relay serve` and Postfix side by side.

    python -m bench.ab --a ../old/.venv/bin/relay --b .venv/bin/relay [--rounds 8]

Single full runs swing by ±20% on a small shared machine (bench/README.md, "Log lines
in bursts, and bytes per mail"), so one change against another is measured here in the
same minutes: blocks of sequential transactions go to A, B and Postfix in turn (A and B
swap places every round), and relay's CPU per transaction is read from /proc for each of
its two processes, the steadier measure. Two identical checkouts read B/A 0.94-1.06.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import loads, postfix, relayproc, sink, tools


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("--a", required=True, help="the `relay` script of checkout A")
    parser.add_argument("--b", required=True, help="the `relay` script of checkout B")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=250, help="transactions per block")
    parser.add_argument("--size", type=int, default=4096, help="bytes per mail")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    workdir.chmod(0o711)  # Postfix daemons (user postfix) open paths below it
    try:
        with contextlib.ExitStack() as stack:
            relays = {}
            for name, script in (("A", args.a), ("B", args.b)):
                upstream = stack.enter_context(sink.Sink(workdir, name=f"sink-{name}"))
                relays[name] = stack.enter_context(
                    relayproc.Relay(
                        workdir,
                        name=f"relay-{name}",
                        upstream_port=upstream.port,
                        command=[os.path.abspath(script)],
                    )
                )
            pf_sink = stack.enter_context(sink.Sink(workdir, name="sink-postfix"))
            pf = stack.enter_context(postfix.Postfix(workdir, pf_sink.port))
            ports = {"A": relays["A"].port, "B": relays["B"].port, "Postfix": pf.port}
            for port in ports.values():  # warm up
                loads.sequential(port, count=4 * args.block, size=args.size)
            ms: dict[str, list[float]] = {name: [] for name in ports}
            cpu = {name: [0.0, 0.0] for name in relays}  # relay serve, delivery process
            for n in range(args.rounds):
                for name in ("A", "B", "Postfix") if n % 2 == 0 else ("B", "A", "Postfix"):
                    pids = relays[name].pids()[:2] if name in relays else []
                    before = [tools.process_cpu(pid) for pid in pids]
                    ms[name] += loads.sequential(ports[name], count=args.block, size=args.size)
                    for i, pid in enumerate(pids):
                        cpu[name][i] += tools.process_cpu(pid) - before[i]
            done = args.rounds * args.block
            for name, times in ms.items():
                line = f"{name:8} " + " ".join(
                    f"{k} {v:.3f}" for k, v in loads.summary(times).items()
                )
                if name in cpu:
                    serve, deliver = (s * 1000 / done for s in cpu[name])
                    line += f" | CPU ms per transaction: serve {serve:.3f}, delivery {deliver:.3f}"
                print(line)
            ratio = statistics.median(ms["B"]) / statistics.median(ms["A"])
            print(f"median B/A {ratio:.3f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
