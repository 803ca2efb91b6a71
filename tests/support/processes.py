"""`relay` as a child process: `relay serve` to start, signal and kill, and any other
command run to completion.

- `relay_process(config).start()` (fixture) runs `relay serve --config CONFIG`: it gets
  $RELAY_PORT_FILE and writes its bound port there once the listener accepts; `start()`
  waits for that file (and a connect) and sets `.port`. Every process still running is
  killed at teardown, delivery processes included.
- `relay_cli(...)` runs any other `relay` command to completion.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# `python -c` rather than the `relay` script: works in any venv without PATH set-up.
RELAY = [sys.executable, "-c", "import sys; from relay.cli import main; sys.exit(main())"]


def relay_cli(*args: str, timeout: float = 30, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `relay ARGS...` to completion; stdout/stderr captured as text."""
    return subprocess.run(
        [*RELAY, *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


@dataclass
class RelayProcess:
    """`relay serve --config CONFIG` as a child process."""

    config: Path
    log_path: Path
    args: list[str] = field(default_factory=list)  # extra `relay serve` options
    prefix: list[str] = field(default_factory=list)  # a command that runs it (a sandbox)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    host: str = "127.0.0.1"  # where start() checks that it listens

    def start(self, *, timeout: float = 15.0) -> RelayProcess:
        port_file = self.config.parent / f"port.{time.monotonic_ns()}"
        env = {**os.environ, "RELAY_PORT_FILE": str(port_file), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            # Its own process group, shared with its delivery process: teardown kills both.
            self.proc = subprocess.Popen(
                [*self.prefix, *RELAY, "serve", "--config", str(self.config), *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay serve exited {self.proc.returncode}:\n{self.log()}")
            if port_file.exists():
                self.port = int(port_file.read_text())
                with socket.create_connection((self.host, self.port), timeout=5):
                    return self
            time.sleep(0.02)
        raise AssertionError(f"relay serve did not start within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 20.0) -> int:
        """Send `sig` and wait; returns the exit code (negative: killed by a signal)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


Process = Callable[[Path], RelayProcess]


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Callable[[Path], RelayProcess]]:
    """`relay_process(config).start()`; every process still running is killed at teardown,
    delivery processes included (one left by a SIGKILLed `relay serve` too)."""
    started: list[RelayProcess] = []

    def make(config: Path) -> RelayProcess:
        process = RelayProcess(config=config, log_path=tmp_path / f"relay.{len(started)}.log")
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.proc.pid, signal.SIGKILL)
            process.proc.wait(10)
