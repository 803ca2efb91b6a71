"""`python -m bench [--quick] [--json FILE]`: relay and Postfix side by side on loopback.

Sections (each prints progress on stderr; the table goes to stdout):
  moodle      PHPMailer (Moodle's client), one connection per mail: ms per mail
  accept/e2e  smtp-source, 20 KB x 20 connections: accepted/s; seconds until the sink has all
  sequential  one connection at a time: ms per transaction, median and p99
  ses         fake SES: pacing against its rate limit, three relays sharing one quota
  backlog     N mails queued with the original host down: peak RSS, drain time
              (--profile DIR: py-spy on the delivery process while it drains)

Exit status: 0 when every section that could run ran (skips are fine), 1 when a
section failed or a required tool (Postfix, php-cli, PHPMailer) is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import profile, relayproc, sections, sesbench, tools
from bench.report import Report

REQUIRED_TOOLS = ("postfix", "postconf", "smtp-sink", "smtp-source", "php")


def _check_tools() -> list[str]:
    missing = []
    for name in REQUIRED_TOOLS:
        try:
            tools.tool(name)
        except tools.ToolMissing as exc:
            missing.append(str(exc))
    return missing


def _run(report: Report, name: str, fn: Callable[[], None]) -> None:
    report.progress(f"== {name}")
    try:
        fn()
    except Exception as exc:  # one failing section must not hide the others' numbers
        report.sections[name] = f"error: {type(exc).__name__}: {exc}"
        report.progress(f"{name} failed: {exc}")
        traceback.print_exc(file=sys.stderr)
    else:
        report.sections.setdefault(name, "ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small numbers, for CI (1-2 min)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument(
        "--only",
        action="append",
        choices=("moodle", "accept", "sequential", "ses", "backlog"),
        help="run only these sections (repeatable)",
    )
    parser.add_argument(
        "--backlog-mails", type=int, help="mails queued in the backlog section (default 100,000)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy on relay's delivery process during the backlog drain: DIR/drain.raw and "
        "DIR/drain.txt (needs `pip install py-spy`; the drain figure of such a run is not "
        "comparable)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every child process and the temp dir are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    params = sections.QUICK if args.quick else sections.FULL
    if args.backlog_mails:
        params = dataclasses.replace(params, backlog_mails=args.backlog_mails)
    if args.profile and profile.pyspy() is None:
        print("bench: --profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    only = set(args.only or ("moodle", "accept", "sequential", "ses", "backlog"))

    report = Report()
    report.meta = {
        "mode": "quick" if args.quick else "full",
        "params": dataclasses.asdict(params),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    missing = _check_tools()
    if missing:
        for problem in missing:
            print(f"bench: {problem}", file=sys.stderr)
        return 1

    relay_missing = relayproc.available()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    try:
        workdir.chmod(0o711)  # Postfix daemons (user postfix) open paths below it
        if args.keep:
            report.progress(f"keeping {workdir}")
        no_delivery = relay_missing
        if relay_missing is None:
            report.progress("probe: does relay serve deliver to its upstream?")
            try:
                no_delivery = relayproc.delivers(workdir)
            except Exception as exc:
                no_delivery = f"the probe failed: {type(exc).__name__}: {exc}"
            if no_delivery:
                report.sections["relay delivery"] = f"missing: {no_delivery}"
        smtp_sections = only & {"moodle", "accept", "sequential"}
        if smtp_sections:
            try:
                with sections.servers(
                    workdir, report, with_relay=relay_missing is None, no_delivery=no_delivery
                ) as srv:
                    if "moodle" in only:
                        _run(report, "moodle", lambda: sections.moodle_path(srv, params, report))
                    if "accept" in only:
                        _run(report, "accept", lambda: sections.accept_and_e2e(srv, params, report))
                    if "sequential" in only:
                        _run(report, "sequential", lambda: sections.sequential(srv, params, report))
            except Exception as exc:
                report.sections["servers"] = f"error: {type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
            if relay_missing:
                report.sections["relay"] = f"skipped: {relay_missing} (postfix columns only)"
        if "ses" in only:
            why = sesbench.unavailable() or no_delivery
            if why:
                report.sections["ses"] = f"skipped: {why}"
            else:
                _run(report, "ses", lambda: sesbench.run(workdir, params, report))
        if "backlog" in only:
            _run(
                report,
                "backlog",
                lambda: sections.backlog(
                    workdir,
                    params,
                    report,
                    with_relay=relay_missing is None,
                    no_delivery=no_delivery,
                    profile_dir=args.profile,
                ),
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    report.meta["loadavg_at_end"] = os.getloadavg()
    report.meta["seconds"] = round(time.monotonic() - report.started, 1)
    print(report.table())
    load = report.meta["loadavg_at_end"][0]
    print(
        f"\n{report.meta['mode']} run, {report.meta['seconds']} s, {os.cpu_count()} CPUs, "
        f"load average at the end {load:.2f}"
        + (" (machine busy: numbers are noisy)" if load > 0.5 * (os.cpu_count() or 1) else "")
    )
    if args.json:
        report.write_json(args.json)
    failed = any(state.startswith("error") for state in report.sections.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
