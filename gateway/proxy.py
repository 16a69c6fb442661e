"""Forwarding one request: method, path (rewritten), query, headers and body go upstream through
the one pooled client; the answer streams back with its status and headers.

Hop-by-hop headers are dropped both ways. ``X-Request-ID`` is kept or generated, sent upstream
and returned; ``X-Forwarded-*`` are added; the W3C trace context upstream is the gateway's own
span, so the upstream's spans join the caller's trace under the gateway's.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from opentelemetry import propagate
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from gateway.errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    NoRoute,
    PayloadTooLarge,
    ServiceUnavailable,
    error_response,
)
from gateway.routes import Route, RouteTable

# RFC 9110 7.6.1, plus Proxy-Connection; the headers named in Connection go too.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the client for the upstream connection, or by us. The gateway is the edge: whatever a
# caller claims in X-Forwarded-* or Forwarded is dropped, and the gateway says who called.
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "traceparent",
    "tracestate",
    "x-request-id",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Dot-segments and encoded separators would let a path climb out of a route's upstream base
# path once the upstream client normalises it (/api/campaigns/%2e%2e/metrics -> /metrics).
_ESCAPES = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)|%2f|%5c|\\", re.IGNORECASE)


def request_id_of(request: Request) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _hop_by_hop(headers: httpx.Headers | list[tuple[str, str]]) -> set[str]:
    named = set(HOP_BY_HOP)
    items = headers.multi_items() if isinstance(headers, httpx.Headers) else headers
    for key, value in items:
        if key.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    return named


class Proxy:
    def __init__(self, client: httpx.AsyncClient, routes: RouteTable, max_body_bytes: int) -> None:
        self._client = client
        self._routes = routes
        self._max_body = max_body_bytes

    async def handle(self, request: Request) -> Response:
        request_id = request_id_of(request)
        # The path as sent (still percent-encoded): it is matched and forwarded as is.
        raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        path = request.url.path
        try:
            if _ESCAPES.search(raw_path):
                raise BadRequest("The path has dot-segments or encoded separators")
            route = self._routes.match(raw_path)
            if route is None or route.hides(raw_path):
                raise NoRoute(f"No route for {path}")
            # The route's prefix is the metrics label: bounded, unlike raw paths.
            request.scope["metrics_route"] = route.prefix
            body = await self._read_body(request)
            return await self._forward(request, route, raw_path, body, request_id)
        except GatewayError as exc:
            return error_response(exc, path, request_id)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise PayloadTooLarge(f"Request body is larger than {self._max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge(f"Request body is larger than {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _upstream_headers(self, request: Request, request_id: str) -> list[tuple[str, str]]:
        incoming = request.headers.raw
        decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in incoming]
        drop = _hop_by_hop(decoded) | _NOT_FORWARDED
        headers = [(key, value) for key, value in decoded if key.lower() not in drop]
        client = request.client.host if request.client else ""
        headers += [
            ("x-request-id", request_id),
            ("x-forwarded-for", client),
            ("x-forwarded-proto", request.url.scheme),
            ("x-forwarded-host", request.headers.get("host", "")),
        ]
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the gateway's server span, as the upstream's parent
        headers += list(carrier.items())
        return headers

    async def _forward(
        self, request: Request, route: Route, raw_path: str, body: bytes, request_id: str
    ) -> Response:
        # Path and query travel byte for byte, as the caller encoded them.
        url = httpx.URL(route.target(raw_path), query=request.scope["query_string"])
        upstream_request = self._client.build_request(
            request.method,
            url,
            headers=self._upstream_headers(request, request_id),
            content=body,
        )
        try:
            upstream = await self._client.send(upstream_request, stream=True)
        except httpx.PoolTimeout as exc:
            raise ServiceUnavailable(f"No connection to {route.name} free in time") from exc
        except httpx.TimeoutException as exc:
            raise GatewayTimeout(f"{route.name} did not answer in time") from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise BadGateway(f"{route.name} is unreachable or broke the connection") from exc

        drop = _hop_by_hop(upstream.headers)
        headers = [
            (key, route.public_location(value) if key.lower() == "location" else value)
            for key, value in upstream.headers.multi_items()
            if key.lower() not in drop
        ]
        headers.append(("x-request-id", request_id))
        response = StreamingResponse(
            _relay(upstream),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
        # Keep repeated headers (Set-Cookie) and the upstream's exact values.
        response.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers
        ]
        return response


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    async for chunk in upstream.aiter_raw():
        yield chunk
