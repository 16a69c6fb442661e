"""The start commands freeze what start-up made, so full collections skip it."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI

from shared.heap import freeze_once_started


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process keeps collecting as usual


class Made:
    """Something start-up makes and keeps for the life of the process."""


async def test_what_start_up_made_is_frozen_and_start_up_still_runs(unfrozen: None) -> None:
    ran: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.kept = [Made() for _ in range(1000)]
        ran.append("start")
        yield
        ran.append("stop")

    app = freeze_once_started(FastAPI(lifespan=lifespan))
    assert gc.get_freeze_count() == 0

    async with app.router.lifespan_context(app):
        frozen = gc.get_freeze_count()
        # Start-up's objects are out of the collector's generations: a full collection no longer
        # walks them.
        tracked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert not any(id(made) in tracked for made in app.state.kept)
        assert ran == ["start"]
    assert ran == ["start", "stop"]
    assert frozen >= 1000
