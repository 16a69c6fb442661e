"""The garbage collector in a long-running service.

CPython's full (generation 2) collection walks every container object the process holds, and the
event loop waits while it does. Most of those objects are made once at start (modules, the app
and its routes, schemas, pools, the tracer) and live as long as the process, so a full collection
spends nearly all of its time on objects it can never free: under load, in campaign_service and
the worker, such pauses reached 88 to 96 ms, the largest part of the end-to-end latency tail.

:func:`freeze_once_started` moves what exists once the app has started into the collector's
permanent generation (``gc.freeze()``): later collections scan only what the service allocated
since, and are short. It also makes young collections rarer (``GC_GEN0_THRESHOLD``): a request
or a delivery allocates hundreds of container objects, nearly all freed by reference counting
when it ends, so Python's default of one collection per 700 net allocations ran one every
request or two, each scanning the objects of the requests under way. Applied by the start
commands (``<service>.main``, ``python -m worker``), not by ``create_app``, so tests that start
many apps in one process are not affected; the thresholds are given back when the app stops.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from shared.settings import CommonSettings

logger = logging.getLogger(__name__)


def freeze_once_started(app: FastAPI) -> FastAPI:
    """Wrap ``app``'s lifespan: once its start-up has run, collect the garbage start-up left,
    freeze the rest, and set the young generation's threshold from the settings start-up put on
    ``app.state.settings`` (left as it is without them)."""
    started = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with started(app) as state:
            gc.collect()  # so that start-up's own garbage is not frozen with the rest
            gc.freeze()
            thresholds = gc.get_threshold()
            settings = getattr(app.state, "settings", None)
            if isinstance(settings, CommonSettings):
                gc.set_threshold(settings.gc_gen0_threshold, *thresholds[1:])
            logger.info(
                "start-up heap frozen",
                extra={"objects": gc.get_freeze_count(), "gc_thresholds": gc.get_threshold()},
            )
            try:
                yield state
            finally:
                gc.set_threshold(*thresholds)

    app.router.lifespan_context = lifespan
    return app
