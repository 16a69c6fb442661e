"""The simulated execution of a campaign, with a deterministic way to make it fail.

A campaign whose name contains ``[fail:N]`` fails its first N attempts and then succeeds;
``[fail:always]`` fails every attempt (so it ends in the dead-letter queue). Anything else
succeeds at once. With ``WORKER_SIMULATED_WORK_SECONDS`` each attempt also takes that long.
"""

from __future__ import annotations

import asyncio
import re

from shared.events import CampaignCreated

_DIRECTIVE = re.compile(r"\[fail:(always|\d{1,3})\]")


class SimulatedFailure(Exception):
    """The campaign's execution failed; the worker retries it."""


def planned_failures(name: str) -> int | None:
    """How many attempts of a campaign with this name fail (None: all of them)."""
    match = _DIRECTIVE.search(name)
    if match is None:
        return 0
    return None if match.group(1) == "always" else int(match.group(1))


async def execute(event: CampaignCreated, *, attempt: int, work_seconds: float) -> None:
    if work_seconds:
        await asyncio.sleep(work_seconds)
    failures = planned_failures(event.name)
    if failures is None or attempt <= failures:
        plan = "always" if failures is None else f"{failures} times"
        raise SimulatedFailure(f"simulated failure on attempt {attempt} (fails {plan})")
