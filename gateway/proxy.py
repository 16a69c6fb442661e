"""Forwarding one request: method, path (rewritten), query, headers and body go upstream through
the one pooled client; the answer streams back with its status and headers.

Hop-by-hop headers are dropped both ways. ``X-Request-ID`` is kept or generated, sent upstream
and returned; every ``X-Forwarded-*`` the caller sent is replaced by the gateway's own
(``-For``, ``-Proto``, ``-Host``); header names and values pass as bytes, unchanged; the W3C
trace context upstream is the gateway's client span (the httpx instrumentation), so the
upstream's spans join the caller's trace under the gateway's.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote_from_bytes, unquote

import httpx
from fastapi import Request
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
from shared.web import REQUEST_ID

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
# The gateway's own server sets these on every response (a second Date or Server from the
# upstream would be a duplicate), and the request id is the gateway's.
_NOT_RETURNED = frozenset({"x-request-id", "date", "server"})
# Set by the client for the upstream connection, or by us. The gateway is the edge: whatever a
# caller claims in X-Forwarded-* or Forwarded is dropped, and the gateway says who called.
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "traceparent",
    "tracestate",
    "x-request-id",
    "forwarded",
    "x-real-ip",
}
_FORWARDED_PREFIX = "x-forwarded-"  # every X-Forwarded-* a caller sends is dropped
# Dot-segments and encoded separators would let a path climb out of a route's upstream base
# path once the upstream client normalises it (/api/campaigns/%2e%2e/metrics -> /metrics).
_ESCAPES = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)|%2f|%5c|\\", re.IGNORECASE)


# Printable ASCII passes as is (percent-escapes included); any other byte is percent-encoded, so
# a path or query sent with raw UTF-8 (as curl does) reaches the upstream with the same meaning.
# "#" and "?" are encoded too: inside a path or a query they would end it for the upstream client.
_URL_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) not in "#?")


def url_part(raw: bytes) -> str:
    return quote_from_bytes(raw, safe=_URL_SAFE)


def request_id_of(request: Request) -> str:
    """The request's id: the one the gateway's RequestIdLogMiddleware assigned (so its log
    lines name it too), or a new one."""
    given = request.headers.get("x-request-id", "").encode("latin-1")
    return given.decode() if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _hop_by_hop(headers: list[tuple[bytes, bytes]]) -> set[str]:
    named = set(HOP_BY_HOP)
    for key, value in headers:
        if key.lower() == b"connection":
            named.update(token.strip().lower() for token in value.decode("latin-1").split(","))
    return named


def _passes(name: bytes, drop: set[str]) -> bool:
    key = name.decode("latin-1").lower()
    return key not in drop and not key.startswith(_FORWARDED_PREFIX)


class Proxy:
    def __init__(self, client: httpx.AsyncClient, routes: RouteTable, max_body_bytes: int) -> None:
        self._client = client
        self._routes = routes
        self._max_body = max_body_bytes

    async def handle(self, request: Request) -> Response:
        request_id = request_id_of(request)
        # The path as sent (still percent-encoded): it is matched and forwarded as is.
        raw_path = url_part(request.scope.get("raw_path") or request.url.path.encode())
        path = request.url.path
        try:
            if _ESCAPES.search(raw_path):
                raise BadRequest("The path has dot-segments or encoded separators")
            route = self._routes.match(raw_path)
            # Hidden paths are compared decoded, as the upstream will route them: /%6Detrics
            # is /metrics (encoded separators are refused above, so segments stay segments).
            if route is None or route.hides(unquote(raw_path)):
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

    def _upstream_headers(self, request: Request, request_id: str) -> list[tuple[bytes, bytes]]:
        # Names and values travel as the bytes the caller sent (a value need not be ASCII).
        incoming = request.headers.raw
        drop = _hop_by_hop(incoming) | _NOT_FORWARDED
        headers = [(key, value) for key, value in incoming if _passes(key, drop)]
        client = request.client.host if request.client else ""
        host = next((value for key, value in incoming if key.lower() == b"host"), b"")
        headers += [
            (b"x-request-id", request_id.encode()),
            (b"x-forwarded-for", client.encode()),
            (b"x-forwarded-proto", request.url.scheme.encode()),
            (b"x-forwarded-host", host),
        ]
        # The trace context goes upstream from the client's instrumentation (gateway/app.py).
        return headers

    async def _forward(
        self, request: Request, route: Route, raw_path: str, body: bytes, request_id: str
    ) -> Response:
        # Path and query travel as the caller encoded them (bytes outside printable ASCII
        # percent-encoded).
        try:
            url = httpx.URL(
                route.target(raw_path), query=url_part(request.scope["query_string"]).encode()
            )
        except httpx.InvalidURL as exc:
            raise BadRequest("The request's path or query is not a valid URL") from exc
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

        try:
            return self._respond(upstream, route, request_id)
        except BaseException:
            await upstream.aclose()  # the connection goes back to the pool, not astray
            raise

    def _respond(self, upstream: httpx.Response, route: Route, request_id: str) -> Response:
        raw = upstream.headers.raw
        drop = _hop_by_hop(raw) | _NOT_RETURNED
        # Keep repeated headers (Set-Cookie) and the upstream's exact bytes.
        headers = [
            (key.lower(), _public_location(route, value) if key.lower() == b"location" else value)
            for key, value in raw
            if key.decode("latin-1").lower() not in drop
        ]
        headers.append((b"x-request-id", request_id.encode()))
        response = StreamingResponse(
            _relay(upstream),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
        response.raw_headers = headers
        return response


def _public_location(route: Route, value: bytes) -> bytes:
    return route.public_location(value.decode("latin-1")).encode("latin-1")


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    async for chunk in upstream.aiter_raw():
        yield chunk
