"""Wait for a condition with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    until: Callable[[T], bool] = bool,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``probe`` until ``until(result)`` holds; return that result, or fail at the deadline
    with the last result seen."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if until(result):
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last value: {result!r}")
        await asyncio.sleep(interval)
