"""Waiting for a condition with a deadline: every wait in the tests ends, with a message
naming what did not happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def wait_until(
    predicate: Callable[[], Any], what: str, *, timeout: float = 15.0, step: float = 0.05
) -> Any:
    """`predicate()` once truthy (polled every `step` s); AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


async def await_until(
    predicate: Callable[[], Any], what: str, *, within: float = 15.0, step: float = 0.05
) -> Any:
    """`wait_until` for a test whose event loop runs the relay: sleeps without blocking it
    (`within` seconds)."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(step)
