"""The service in the test's event loop, and the relay.yaml it runs with.

Fixtures (a pytest plugin of tests/conftest.py):

- `write_config(**overrides)` writes relay.yaml (127.0.0.1:0, spool in tmp_path) and
  returns its path;
- `start_relay(**overrides)` (async) runs `service.serve()` in the test's event loop
  and returns a `Running` with the bound port and the open `Spool` (`running.ctx.spool`);
  it is stopped (the SIGTERM path) at teardown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import service
from relay import settings as settings_mod
from relay.runtime import Context, Task
from relay.service import IN_PROCESS_TASKS

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
    ctx: Context
    stop: asyncio.Event
    task: asyncio.Task[None]


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_relay(
    write_config: ConfigWriter,
) -> AsyncIterator[Start]:
    """`await start_relay(**config_overrides)`; stopped (SIGTERM path) at teardown."""
    running: list[Running] = []

    async def start(
        *, tasks: list[Task] | None = None, deliver: bool = False, **overrides: Any
    ) -> Running:
        """`deliver=True` runs `service.IN_PROCESS_TASKS`: delivery, metrics, ... on this loop."""
        settings = settings_mod.load(write_config(f"relay{len(running)}.yaml", **overrides))
        stop = asyncio.Event()
        got: asyncio.Future[Context] = asyncio.get_running_loop().create_future()
        bound: list[int] = []

        async def capture(ctx: Context) -> None:
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
