from __future__ import annotations

from pydantic import BaseModel, Field, IPvAnyNetwork, field_validator

from shared.settings import CommonSettings


class RouteConfig(BaseModel):
    """Requests whose path starts with ``prefix`` go to ``upstream``: the prefix is replaced by
    the upstream URL's path (``/api/campaigns/1/jobs`` with upstream
    ``http://campaign_service:8001/campaigns`` -> ``/campaigns/1/jobs``)."""

    name: str = Field(pattern=r"^[a-z0-9_-]{1,40}$")
    prefix: str = Field(pattern=r"^/")
    upstream: str = Field(pattern=r"^https?://")
    # Probed by GET /api/gateway/status, relative to the upstream's origin.
    ready_path: str = "/ready"
    # Upstream paths the edge does not expose (operators reach them on the service itself).
    hidden_paths: list[str] = Field(
        default_factory=lambda: ["/metrics", "/docs", "/redoc", "/openapi.json", "/ready"]
    )


DEFAULT_ROUTES = [
    RouteConfig(name="user_service", prefix="/api/users", upstream="http://127.0.0.1:8000"),
    RouteConfig(
        name="campaign_service",
        prefix="/api/campaigns",
        upstream="http://127.0.0.1:8001/campaigns",
    ),
]


class GatewaySettings(CommonSettings):
    service_name: str = "gateway"

    # The route table, as JSON: [{"name": …, "prefix": …, "upstream": …}, …]. Adding a service
    # is a line here, no code.
    gateway_routes: list[RouteConfig] = Field(default_factory=lambda: list(DEFAULT_ROUTES))
    # Larger request bodies get a 413 before anything is sent upstream.
    gateway_max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # Upstream timeouts: connecting, and waiting for each read of the answer (504 past them).
    gateway_connect_timeout_seconds: float = Field(default=2.0, gt=0)
    gateway_timeout_seconds: float = Field(default=10.0, gt=0)
    # The one pooled HTTP client: connections in all, kept idle, and the wait for a free one
    # (503 past it).
    gateway_max_connections: int = Field(default=200, ge=1)
    gateway_max_keepalive_connections: int = Field(default=50, ge=0)
    gateway_pool_timeout_seconds: float = Field(default=2.0, gt=0)
    # An idle upstream connection is dropped after this, before the upstream's own keep-alive
    # timeout (uvicorn's 5 s) closes it: otherwise a request sent on a connection the upstream
    # is closing at that moment fails (a 502, and a POST cannot be retried).
    gateway_keepalive_expiry_seconds: float = Field(default=4.0, gt=0)
    # Callers (IP addresses or networks, as JSON: ["10.0.0.0/8"]) whose W3C trace context the
    # gateway continues; every other caller's becomes a link of a new trace (gateway/edge.py).
    gateway_trusted_callers: list[IPvAnyNetwork] = Field(default_factory=list)
    # The internal port: metrics, API docs, the route table and the detailed upstream status
    # (gateway/internal.py). Unset, they are not served at all.
    gateway_internal_host: str = "127.0.0.1"
    gateway_internal_port: int | None = Field(default=9080, ge=0, le=65535)
    # GET /api/gateway/status waits this long for each upstream's /ready.
    gateway_status_timeout_seconds: float = Field(default=1.0, gt=0)

    @field_validator("gateway_routes")
    @classmethod
    def _unique(cls, routes: list[RouteConfig]) -> list[RouteConfig]:
        names = [route.name for route in routes]
        prefixes = [route.prefix.rstrip("/") for route in routes]
        if len(set(names)) != len(names) or len(set(prefixes)) != len(prefixes):
            raise ValueError("route names and prefixes must be unique")
        return routes
