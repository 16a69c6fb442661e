from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter


class UserMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registrations = Counter(
            "user_registrations",
            "Registration attempts that reached the service, by outcome (created, conflict, "
            "forbidden: an existing tenant without a valid invitation).",
            ["outcome"],
            registry=registry,
        )
        self.logins = Counter(
            "user_logins",
            "Login attempts, by outcome (success, failure).",
            ["outcome"],
            registry=registry,
        )
        self.logins_throttled = Counter(
            "user_logins_throttled",
            "Logins and registrations refused by the throttle, by scope (account, address, "
            "in_flight, registration).",
            ["scope"],
            registry=registry,
        )
        self.refreshes = Counter(
            "user_token_refreshes",
            "Refresh-token uses, by outcome (rotated, invalid, reused: the family revoked).",
            ["outcome"],
            registry=registry,
        )
        for scope in ("account", "address", "in_flight", "registration"):
            self.logins_throttled.labels(scope)
        for outcome in ("rotated", "invalid", "reused"):
            self.refreshes.labels(outcome)
        for outcome in ("created", "conflict", "forbidden"):
            self.registrations.labels(outcome)
        for outcome in ("success", "failure"):
            self.logins.labels(outcome)


async def get_user_metrics(request: Request) -> UserMetrics:
    metrics: UserMetrics = request.app.state.metrics
    return metrics


UserMetricsDep = Annotated[UserMetrics, Depends(get_user_metrics)]
