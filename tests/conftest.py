"""Shared fixtures: a relay.yaml writer, the service in-process or as a real subprocess,
a self-signed certificate.

- `write_config(**overrides)` writes relay.yaml (127.0.0.1:0, spool in tmp_path).
- `start_relay(**overrides)` (async) runs `service.serve()` in the test's event loop
  and returns a `Running` with the bound port and the open `Spool` (`running.ctx.spool`).
- `relay_process(config).start()` runs `relay serve --config CONFIG` as a child
  process: it gets $RELAY_PORT_FILE, writes its bound port there once the
  listener accepts; `start()` waits for that file (and a connect) and sets `.port`.
- `relay_cli(...)` runs any other `relay` command to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import service
from relay import settings as settings_mod
from relay.service import IN_PROCESS_TASKS

# `python -c` rather than the `relay` script: works in any venv without PATH set-up.
RELAY = [sys.executable, "-c", "import sys; from relay.cli import main; sys.exit(main())"]

ConfigWriter = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path) -> ConfigWriter:
    """`write_config(**overrides) -> path` of a relay.yaml in tmp_path (loopback, port 0)."""

    def write(name: str = "relay.yaml", **overrides: Any) -> Path:
        config: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "spool": "spool",
            "hostname": "relay.test",
            "upstream": {"host": "127.0.0.1", "port": 9},
            "metrics": None,  # the default 127.0.0.1:9325 would collide between tests
        }
        config.update(overrides)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    return write


@dataclass
class Running:
    """The service running in the test's event loop."""

    settings: settings_mod.Settings
    port: int
    ctx: service.Context
    stop: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def start_relay(
    write_config: ConfigWriter,
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """`await start_relay(**config_overrides)`; stopped (SIGTERM path) at teardown."""
    running: list[Running] = []

    async def start(
        *, tasks: list[service.Task] | None = None, deliver: bool = False, **overrides: Any
    ) -> Running:
        """`deliver=True` runs `service.IN_PROCESS_TASKS`: delivery, metrics, ... on this loop."""
        settings = settings_mod.load(write_config(f"relay{len(running)}.yaml", **overrides))
        stop = asyncio.Event()
        got: asyncio.Future[service.Context] = asyncio.get_running_loop().create_future()
        bound: list[int] = []

        async def capture(ctx: service.Context) -> None:
            got.set_result(ctx)
            await ctx.stop.wait()

        background = [capture, *(tasks or []), *(IN_PROCESS_TASKS if deliver else [])]
        task = asyncio.create_task(
            service.serve(
                settings,
                background=background,
                stop=stop,
                ready=lambda ctx: bound.append(ctx.port),
                drain=2.0,
            )
        )
        ctx = await asyncio.wait_for(got, 10)
        while not bound:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        running.append(Running(settings, bound[0], ctx, stop, task))
        return running[-1]

    yield start
    for run in running:
        run.stop.set()
        await asyncio.wait_for(run.task, 40)


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
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self, *, timeout: float = 15.0) -> RelayProcess:
        port_file = self.config.parent / f"port.{time.monotonic_ns()}"
        env = {**os.environ, "RELAY_PORT_FILE": str(port_file), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            # Its own process group, shared with its delivery process: teardown kills both.
            self.proc = subprocess.Popen(
                [*RELAY, "serve", "--config", str(self.config), *self.args],
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
                with socket.create_connection(("127.0.0.1", self.port), timeout=5):
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


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for CN=relay.test (and 127.0.0.1), made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("relay.test"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles(cert=directory / "cert.pem", key=directory / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files
