"""FastAPI runs a plain ``def`` endpoint or dependency in a worker thread, a thread hop on every
request. Every endpoint and dependency of every service is ``async``: CPU work that belongs in a
thread (password hashing) goes to its own bounded pool, on purpose."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from campaign_service.app import create_app as create_campaign_service
from gateway.app import create_app as create_gateway
from user_service.app import create_app as create_user_service


def _api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # An included router (FastAPI keeps it whole and resolves its routes per request).
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _api_routes(included.routes)


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    if dependant.call is not None:
        yield dependant.call
    for child in dependant.dependencies:
        yield from _calls(child)


def _runs_on_the_event_loop(call: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    method = getattr(call, "__call__", None)  # noqa: B004 - instances such as HTTPBearer
    return not inspect.isfunction(call) and (
        inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)
    )


@pytest.mark.parametrize(
    "factory",
    [create_user_service, create_campaign_service, create_gateway],
    ids=["user_service", "campaign_service", "gateway"],
)
def test_every_endpoint_and_dependency_is_async(factory: Callable[[], FastAPI]) -> None:
    app = factory()
    routes = list(_api_routes(app.routes))
    assert routes

    sync = sorted(
        {
            f"{route.path}: {getattr(call, '__qualname__', repr(call))}"
            for route in routes
            for call in _calls(route.dependant)
            if not _runs_on_the_event_loop(call)
        }
    )

    assert sync == []
