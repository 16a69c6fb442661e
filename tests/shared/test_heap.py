"""The start commands freeze what start-up made, so full collections skip it."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from shared.heap import freeze_once_started
from shared.settings import CommonSettings


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


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


async def test_young_collections_follow_the_setting_while_the_app_runs(
    unfrozen: None, thresholds: tuple[int, int, int]
) -> None:
    settings = CommonSettings(gc_gen0_threshold=12_345)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        yield

    app = freeze_once_started(FastAPI(lifespan=lifespan))
    async with app.router.lifespan_context(app):
        assert gc.get_threshold() == (12_345, *thresholds[1:])
    # Given back when the app stops: the rest of the process collects as it did.
    assert gc.get_threshold() == thresholds


async def test_an_app_without_settings_keeps_the_thresholds(
    unfrozen: None, thresholds: tuple[int, int, int]
) -> None:
    app = freeze_once_started(FastAPI())
    async with app.router.lifespan_context(app):
        assert gc.get_threshold() == thresholds


def test_a_threshold_that_would_collect_all_the_time_is_refused() -> None:
    with pytest.raises(ValidationError, match="gc_gen0_threshold"):
        CommonSettings(gc_gen0_threshold=10)
