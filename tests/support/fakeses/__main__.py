"""`python -m tests.support.fakeses`: the fake SES as a process (the bench runs it)."""

from __future__ import annotations

import argparse
import json
import signal
import threading

from tests.support.fakeses import FakeSes
from tests.support.fakeses import __doc__ as DOC


def main() -> None:
    parser = argparse.ArgumentParser(description=(DOC or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate-limit", type=float, default=None, help="recipients/s")
    parser.add_argument("--daily-quota", type=float, default=None, help="recipients/24h")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()
    fake = FakeSes(
        host=args.host,
        port=args.port,
        rate_limit=args.rate_limit,
        daily_quota=args.daily_quota,
        latency=args.latency,
    ).start()
    print(fake.url, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    fake.stop()
    print(json.dumps(fake.stats()), flush=True)


if __name__ == "__main__":
    main()
