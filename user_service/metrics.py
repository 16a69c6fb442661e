from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter


class UserMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registrations = Counter(
            "user_registrations",
            "Registration attempts that reached the service, by outcome (created, conflict).",
            ["outcome"],
            registry=registry,
        )
        self.logins = Counter(
            "user_logins",
            "Login attempts, by outcome (success, failure).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("created", "conflict"):
            self.registrations.labels(outcome)
        for outcome in ("success", "failure"):
            self.logins.labels(outcome)


async def get_user_metrics(request: Request) -> UserMetrics:
    metrics: UserMetrics = request.app.state.metrics
    return metrics


UserMetricsDep = Annotated[UserMetrics, Depends(get_user_metrics)]
