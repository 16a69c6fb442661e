"""The gateway in front of real upstreams (the platform's services and an echo server over TCP),
and in front of dead, slow, broken and saturated ones."""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute

from campaign_service.app import create_app as create_campaign_app
from gateway.app import create_app as create_gateway_app
from gateway.settings import GatewaySettings, RouteConfig
from shared.settings import Environment
from tests.pipeline.conftest import make_campaign_settings
from tests.support.metrics import parse
from tests.support.processes import free_port
from tests.support.servers import broken_upstream, dead_upstream, serve
from tests.support.users import PASSWORD, make_user_settings
from user_service.app import create_app as create_user_app


class Echo:
    """An upstream that answers with what it received; it can also stream and stall."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.stalled = asyncio.Event()
        self.app = Starlette(
            routes=[
                StarletteRoute("/stream", self.stream),
                StarletteRoute("/stall", self.stall),
                StarletteRoute("/base/redirect", self.redirect),
                StarletteRoute("/utf8-header", self.utf8_header),
                StarletteRoute(
                    "/{path:path}", self.echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]
                ),
            ]
        )

    async def echo(self, request: Request) -> Response:
        body = await request.body()
        seen = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": [(k, v) for k, v in request.headers.items()],
            "body": body.decode(),
        }
        self.requests.append(seen)
        response = JSONResponse(seen, status_code=int(request.headers.get("x-status", "200")))
        response.headers.append("set-cookie", "a=1")
        response.headers.append("set-cookie", "b=2")
        response.headers["x-upstream"] = "echo"
        response.headers["connection"] = "keep-alive, x-private"
        response.headers["x-private"] = "hop-by-hop, named in Connection"
        return response

    async def stream(self, request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first;"
            await self.release.wait()  # released by the test once it has the first chunk
            yield b"second"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def redirect(self, request: Request) -> Response:
        target = request.query_params["to"]
        return Response(status_code=307, headers={"location": target})

    async def utf8_header(self, request: Request) -> Response:
        response = Response(b"ok")
        response.raw_headers.append((b"x-title", "Café €".encode()))
        return response

    async def stall(self, request: Request) -> Response:
        self.stalled.set()
        await self.release.wait()
        return Response(b"late")


class _ServerSpans(SpanProcessor):
    """Server spans of one path, recorded while a test asks (the gateway traces through the
    process's tracer provider, which cannot lose a processor once given one)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        attributes = span.attributes or {}
        target = attributes.get("url.path") or attributes.get("http.target")
        if self.path is not None and span.kind is SpanKind.SERVER and target == self.path:
            self.spans.append(span)


_server_spans = _ServerSpans()
_processors_added: list[_ServerSpans] = []


@contextmanager
def server_spans(path: str) -> Iterator[list[ReadableSpan]]:
    if not _processors_added:
        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider)  # the one shared.telemetry configures
        provider.add_span_processor(_server_spans)
        _processors_added.append(_server_spans)
    _server_spans.path, _server_spans.spans = path, []
    try:
        yield _server_spans.spans
    finally:
        _server_spans.path = None


def headers_of(seen: dict[str, Any]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for key, value in seen["headers"]:
        grouped.setdefault(key.lower(), []).append(value)
    return grouped


@asynccontextmanager
async def gateway(
    routes: list[RouteConfig], **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    # No internal port unless the test asks for one (each would take 9080).
    overrides.setdefault("gateway_internal_port", None)
    settings = GatewaySettings(
        _env_file=None, environment=Environment.TEST, gateway_routes=routes, **overrides
    )
    app = create_gateway_app(settings)
    # Over real TCP (an in-process ASGI transport would buffer streamed responses), as the
    # container runs it: trusting no caller's proxy headers.
    async with (
        serve(app, proxy_headers=False) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield client, app


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Echo, str]]:
    upstream = Echo()
    async with serve(upstream.app, lifespan="off") as url:
        yield upstream, url


def echo_routes(url: str) -> list[RouteConfig]:
    """The echo upstream under /api/echo, at its root."""
    return [RouteConfig(name="echo", prefix="/api/echo", upstream=url)]


def assert_gateway_error(response: httpx.Response, status: int, error: str, path: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message", "path", "timestamp", "status_code"}
    assert body["error"] == error
    assert body["status_code"] == status
    assert body["path"] == path
    assert body["message"]
    datetime.fromisoformat(body["timestamp"])
    assert response.headers["x-request-id"]


class TestRealUpstreams:
    async def test_the_walk_through_goes_through_the_gateway(
        self, database_url: str, amqp_url: str, tenant: str
    ) -> None:
        user_app = create_user_app(make_user_settings(database_url))
        async with serve(user_app) as user_url:
            campaign_app = create_campaign_app(
                make_campaign_settings(
                    database_url, amqp_url, jwt_jwks_url=f"{user_url}/.well-known/jwks.json"
                )
            )
            async with (
                serve(campaign_app) as campaign_url,
                gateway(
                    [
                        RouteConfig(name="user_service", prefix="/api/users", upstream=user_url),
                        RouteConfig(
                            name="campaign_service",
                            prefix="/api/campaigns",
                            upstream=f"{campaign_url}/campaigns",
                        ),
                    ]
                ) as (client, _),
            ):
                credentials = {
                    "tenant_id": tenant,
                    "email": "ada@example.com",
                    "password": PASSWORD,
                }
                registered = await client.post("/api/users/register", json=credentials)
                login = await client.post("/api/users/login", json=credentials)
                auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
                created = await client.post("/api/campaigns", json={"name": "via"}, headers=auth)
                listed = await client.get("/api/campaigns?limit=5", headers=auth)
                one = await client.get(f"/api/campaigns/{created.json()['id']}", headers=auth)
                jobs = await client.get(f"/api/campaigns/{created.json()['id']}/jobs", headers=auth)
                anonymous = await client.get("/api/campaigns")
                jwks = await client.get("/api/users/.well-known/jwks.json")
                status = await client.get("/api/gateway/status")

        assert registered.status_code == 201
        assert created.status_code == 201
        assert [item["id"] for item in listed.json()["items"]] == [created.json()["id"]]
        assert one.json() == created.json()
        assert jobs.status_code == 200
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert jwks.json()["keys"]
        assert status.status_code == 200
        assert status.json() == {"status": "up"}


class TestForwarding:
    async def test_method_path_query_headers_and_body(self, echo: tuple[Echo, str]) -> None:
        upstream, url = echo
        async with gateway(
            [RouteConfig(name="echo", prefix="/api/echo", upstream=f"{url}/v1")]
        ) as (
            client,
            _,
        ):
            response = await client.put(
                "/api/echo/things/42?a=1&a=2&b=x%20y",
                content=b'{"k": "v"}',
                headers={
                    "Authorization": "Bearer abc",
                    "Content-Type": "application/json",
                    "X-Custom": "kept",
                    "Connection": "keep-alive, x-secret-hop",
                    "X-Secret-Hop": "dropped",
                    "TE": "trailers",
                    "Proxy-Authorization": "Basic xyz",
                },
            )

        assert response.status_code == 200
        seen = response.json()
        assert seen["method"] == "PUT"
        assert seen["path"] == "/v1/things/42"
        assert seen["query"] == "a=1&a=2&b=x%20y"
        assert seen["body"] == '{"k": "v"}'
        sent = headers_of(seen)
        assert sent["authorization"] == ["Bearer abc"]
        assert sent["content-type"] == ["application/json"]
        assert sent["x-custom"] == ["kept"]
        for hop in ("x-secret-hop", "te", "proxy-authorization"):
            assert hop not in sent
        assert sent["x-forwarded-for"] == ["127.0.0.1"]
        assert sent["x-forwarded-host"] == [client.base_url.netloc.decode()]
        assert len(upstream.requests) == 1

    async def test_response_status_and_headers_come_back(self, echo: tuple[Echo, str]) -> None:
        _, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            response = await client.post("/api/echo/x", headers={"x-status": "418"})

        assert response.status_code == 418
        assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]
        assert response.headers["x-upstream"] == "echo"
        assert "x-private" not in response.headers
        assert response.headers["content-type"] == "application/json"
        assert len(response.headers.get_list("date")) == 1  # the gateway's, not two
        assert len(response.headers.get_list("server")) <= 1

    async def test_an_upstreams_cookies_go_to_its_caller_only(self, echo: tuple[Echo, str]) -> None:
        """The echo sets cookies on every answer: the gateway hands them to the caller and
        keeps none, so a later request, another caller's, carries only its own Cookie."""
        _, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            first = await client.get("/api/echo/one")
            client.cookies.clear()  # the caller forgets them; the gateway must not remember
            without = await client.get("/api/echo/two")
            own = await client.get("/api/echo/three", headers={"Cookie": "mine=3"})

        assert first.headers.get_list("set-cookie") == ["a=1", "b=2"]
        assert "cookie" not in headers_of(first.json())
        assert "cookie" not in headers_of(without.json())
        assert headers_of(own.json())["cookie"] == ["mine=3"]

    async def test_request_id_is_always_the_gateways_own(
        self, echo: tuple[Echo, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        upstream, url = echo
        async with gateway([RouteConfig(name="echo", prefix="/", upstream=url)]) as (client, _):
            generated = await client.get("/a")
            given = await client.get("/b", headers={"X-Request-ID": "req-123"})
            hostile = await client.get("/c", headers={"X-Request-ID": "bad id\twith space"})
            missing = await client.get("/nowhere/%2e%2e/x")  # answered by the gateway itself

        # The gateway's own log lines name the id the upstream and the caller got; a caller's
        # sane id is logged beside it, as client_request_id, and never passed on.
        access = {
            line["path"]: line
            for line in map(json.loads, capsys.readouterr().out.splitlines())
            if line.get("logger") == "uvicorn.access"
        }
        for response, path in ((generated, "/a"), (given, "/b"), (hostile, "/c")):
            assert access[path]["request_id"] == response.headers["x-request-id"]
            assert len(response.headers["x-request-id"]) == 32
        assert access["/nowhere/../x"]["request_id"] == missing.headers["x-request-id"]
        assert access["/b"]["client_request_id"] == "req-123"
        assert "client_request_id" not in access["/a"]
        assert "client_request_id" not in access["/c"]  # not a sane token: not logged at all
        sent = [headers_of(seen)["x-request-id"] for seen in upstream.requests]
        assert sent == [[r.headers["x-request-id"]] for r in (generated, given, hostile)]
        assert given.headers["x-request-id"] != "req-123"

    async def test_a_callers_trace_context_is_a_link_of_a_new_trace(
        self, echo: tuple[Echo, str]
    ) -> None:
        upstream, url = echo
        incoming_trace = uuid.uuid4().hex
        incoming = f"00-{incoming_trace}-{'a' * 16}-01"
        path = f"/traced-{uuid.uuid4().hex}"
        with server_spans(path) as recorded:
            async with gateway([RouteConfig(name="echo", prefix="/", upstream=url)]) as (client, _):
                await client.get(path, headers={"traceparent": incoming, "baggage": "user=x"})

        [traceparent] = headers_of(upstream.requests[0])["traceparent"]
        _version, trace_id, _parent_id, _flags = traceparent.split("-")
        assert trace_id != incoming_trace  # a trace of the gateway's own ...
        assert "baggage" not in headers_of(upstream.requests[0])
        [span] = recorded
        assert format(span.context.trace_id, "032x") == trace_id
        assert span.parent is None
        [link] = span.links  # ... that links to the caller's
        assert format(link.context.trace_id, "032x") == incoming_trace
        assert format(link.context.span_id, "016x") == "a" * 16

    async def test_a_trusted_callers_trace_continues_through_the_gateway(
        self, echo: tuple[Echo, str]
    ) -> None:
        upstream, url = echo
        incoming_trace = uuid.uuid4().hex
        incoming = f"00-{incoming_trace}-{'a' * 16}-01"
        routes = [RouteConfig(name="echo", prefix="/", upstream=url)]
        async with gateway(routes, gateway_trusted_callers=["127.0.0.0/8"]) as (client, _):
            await client.get("/traced", headers={"traceparent": incoming})

        [traceparent] = headers_of(upstream.requests[0])["traceparent"]
        _version, trace_id, parent_id, _flags = traceparent.split("-")
        assert trace_id == incoming_trace  # the caller's trace continues ...
        assert parent_id != "a" * 16  # ... under the gateway's own spans

    async def test_responses_are_streamed_not_buffered(self, echo: tuple[Echo, str]) -> None:
        upstream, url = echo
        async with (
            gateway([RouteConfig(name="echo", prefix="/", upstream=url)]) as (client, _),
            client.stream("GET", "/stream") as response,
        ):
            chunks = response.aiter_raw()
            first = await asyncio.wait_for(anext(chunks), timeout=5)
            upstream.release.set()  # the upstream sends the rest only now
            rest = b"".join([chunk async for chunk in chunks])

        assert first == b"first;"
        assert rest == b"second"


class ImportWatch(importlib.abc.MetaPathFinder):
    """Notes every import made on this thread (the event loop's) that reaches the finders (one
    not already in ``sys.modules``); other threads of the test process are not its business."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._thread = threading.get_ident()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if threading.get_ident() == self._thread:
            self.names.append(fullname)
        return None


class TestEventLoop:
    async def test_a_proxied_request_imports_nothing(self, echo: tuple[Echo, str]) -> None:
        """An import at request time searches the file system on the event loop: httpcore,
        under httpx, asks for sniffio several times a request, and while it was not installed
        each ask was a failed import, a path search of about 55 µs (the test's own client is
        httpx, in this same process)."""
        _, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            for _ in range(3):  # whatever loads lazily on first use has loaded
                assert (await client.post("/api/echo/warm", content=b"{}")).status_code == 200
            watch = ImportWatch()
            sys.meta_path.insert(0, watch)
            try:
                for _ in range(3):
                    response = await client.post("/api/echo/campaigns", content=b"{}")
                    assert response.status_code == 200
            finally:
                sys.meta_path.remove(watch)

        assert watch.names == []

    async def test_a_proxied_request_logs_no_line_of_the_http_client(
        self, echo: tuple[Echo, str], caplog: pytest.LogCaptureFixture
    ) -> None:
        """The access line says it already: the client's own INFO line per request would
        double the log and its cost."""
        _, url = echo
        with caplog.at_level(logging.INFO):
            async with gateway(echo_routes(url)) as (client, _):
                assert (await client.get("/api/echo/campaigns")).status_code == 200

        assert [r.getMessage() for r in caplog.records if r.name.startswith("httpx")] == []


class TestEdge:
    @pytest.mark.parametrize(
        "path",
        ["/api/echo/%2e%2e/secret", "/api/echo/%2E%2e", "/api/echo/a%2Fb", "/api/echo/.%2e/x"],
    )
    async def test_a_path_cannot_climb_out_of_its_route(
        self, echo: tuple[Echo, str], path: str
    ) -> None:
        upstream, url = echo
        async with gateway(
            [RouteConfig(name="echo", prefix="/api/echo", upstream=f"{url}/base")]
        ) as (client, _):
            response = await client.get(path)

        assert response.status_code == 400
        assert response.json()["error"] == "bad_request"
        assert upstream.requests == []

    async def test_upstream_redirects_point_through_the_gateway(
        self, echo: tuple[Echo, str]
    ) -> None:
        _, url = echo
        async with gateway(
            [RouteConfig(name="echo", prefix="/api/echo", upstream=f"{url}/base")]
        ) as (client, _):
            absolute = await client.get("/api/echo/redirect", params={"to": f"{url}/base/x/1"})
            relative = await client.get("/api/echo/redirect", params={"to": "/base/y"})
            elsewhere = await client.get(
                "/api/echo/redirect", params={"to": "https://example.org/z"}
            )

        assert absolute.status_code == 307
        assert absolute.headers["location"] == "/api/echo/x/1"
        assert relative.headers["location"] == "/api/echo/y"
        assert elsewhere.headers["location"] == "https://example.org/z"

    @pytest.mark.parametrize(
        ("location", "public"),
        [
            ("{url}/x?page=2", "/api/echo/x?page=2"),
            ("/y", "/api/echo/y"),
            ("{url}", "/api/echo/"),
            ("{url}?page=2", "/api/echo/?page=2"),
            ("next", "next"),
            ("//cdn.example.org/z", "//cdn.example.org/z"),
        ],
    )
    async def test_redirects_from_an_upstream_without_a_base_path(
        self, echo: tuple[Echo, str], location: str, public: str
    ) -> None:
        _, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            response = await client.get(
                "/api/echo/base/redirect", params={"to": location.format(url=url)}
            )

        assert response.status_code == 307
        assert response.headers["location"] == public

    @pytest.mark.parametrize(
        "path",
        [
            "/api/echo/metrics",
            "/api/echo/docs",
            "/api/echo/openapi.json",
            # The upstream decodes the path before routing it: so must the check.
            "/api/echo/%6Detrics",
            "/api/echo/%64ocs/",
            "/api/echo/openapi%2Ejson",
        ],
    )
    async def test_service_internals_are_not_exposed(
        self, echo: tuple[Echo, str], path: str
    ) -> None:
        upstream, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            response = await client.get(path)

        assert_gateway_error(response, 404, "not_found", unquote(path))
        assert upstream.requests == []

    async def test_encoded_characters_reach_the_upstream_as_sent(
        self, echo: tuple[Echo, str]
    ) -> None:
        upstream, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            await client.get("/api/echo/caf%C3%A9%20bar")

        assert upstream.requests[0]["path"] == "/café bar"

    async def test_non_ascii_request_headers_reach_the_upstream_as_sent(
        self, echo: tuple[Echo, str]
    ) -> None:
        upstream, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            response = await client.get("/api/echo/x", headers={b"x-name": "Zoë".encode()})

        assert response.status_code == 200
        # Header values are bytes, passed on as sent (Starlette shows them as Latin-1).
        assert headers_of(upstream.requests[0])["x-name"] == ["Zoë".encode().decode("latin-1")]

    async def test_non_ascii_response_headers_come_back_as_sent(
        self, echo: tuple[Echo, str]
    ) -> None:
        _, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            response = await client.get("/api/echo/utf8-header")

        assert response.status_code == 200
        assert dict(response.headers.raw)[b"x-title"] == "Café €".encode()

    async def test_callers_cannot_claim_another_address(self, echo: tuple[Echo, str]) -> None:
        upstream, url = echo
        async with gateway([RouteConfig(name="echo", prefix="/", upstream=url)]) as (client, _):
            await client.get(
                "/x",
                headers={
                    "X-Forwarded-For": "6.6.6.6",
                    "X-Forwarded-Proto": "https",
                    "Forwarded": "for=6.6.6.6",
                    "X-Real-IP": "6.6.6.6",
                    "X-Forwarded-Prefix": "/admin",
                    "X-Forwarded-Port": "443",
                    "X-Forwarded-Server": "trusted",
                },
            )

        sent = headers_of(upstream.requests[0])
        assert sent["x-forwarded-for"] == ["127.0.0.1"]
        assert sent["x-forwarded-proto"] == ["http"]
        assert sorted(name for name in sent if name.startswith("x-forwarded-")) == [
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
        ]
        assert "forwarded" not in sent
        assert "x-real-ip" not in sent


class TestErrors:
    async def test_no_route(self, echo: tuple[Echo, str]) -> None:
        _, url = echo
        async with gateway(echo_routes(url)) as (client, _):
            response = await client.get("/api/unknown/x")
            lookalike = await client.get("/api/echoes")  # a prefix matches whole segments

        assert_gateway_error(response, 404, "not_found", "/api/unknown/x")
        assert_gateway_error(lookalike, 404, "not_found", "/api/echoes")

    async def test_payload_too_large_reaches_nobody(self, echo: tuple[Echo, str]) -> None:
        upstream, url = echo

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 400

        async with gateway(
            [RouteConfig(name="echo", prefix="/", upstream=url)], gateway_max_body_bytes=1000
        ) as (client, _):
            declared = await client.post("/upload", content=b"x" * 1001)
            streamed = await client.post("/upload", content=chunked())
            fits = await client.post("/upload", content=b"x" * 1000)

        assert_gateway_error(declared, 413, "payload_too_large", "/upload")
        assert_gateway_error(streamed, 413, "payload_too_large", "/upload")
        assert fits.status_code == 200
        assert len(upstream.requests) == 1

    async def test_dead_upstream_is_a_bad_gateway(self) -> None:
        async with gateway(
            [RouteConfig(name="dead", prefix="/api/dead", upstream=dead_upstream())]
        ) as (client, _):
            response = await client.get("/api/dead/x")

        assert_gateway_error(response, 502, "bad_gateway", "/api/dead/x")
        assert "dead" in response.json()["message"]

    async def test_broken_upstream_is_a_bad_gateway(self) -> None:
        async with (
            broken_upstream() as url,
            gateway([RouteConfig(name="broken", prefix="/", upstream=url)]) as (client, _),
        ):
            response = await client.get("/x")

        assert_gateway_error(response, 502, "bad_gateway", "/x")

    async def test_slow_upstream_is_a_gateway_timeout(self, echo: tuple[Echo, str]) -> None:
        upstream, url = echo
        async with gateway(
            [RouteConfig(name="slow", prefix="/", upstream=url)], gateway_timeout_seconds=0.3
        ) as (client, _):
            response = await client.get("/stall")
        upstream.release.set()

        assert_gateway_error(response, 504, "gateway_timeout", "/stall")

    async def test_saturated_pool_is_service_unavailable(self, echo: tuple[Echo, str]) -> None:
        upstream, url = echo
        async with gateway(
            [RouteConfig(name="busy", prefix="/", upstream=url)],
            gateway_max_connections=1,
            gateway_pool_timeout_seconds=0.2,
        ) as (client, _):
            holding = asyncio.create_task(client.get("/stall"))  # takes the only connection
            await asyncio.wait_for(upstream.stalled.wait(), timeout=5)
            response = await client.get("/x")
            upstream.release.set()
            held = await holding

        assert_gateway_error(response, 503, "service_unavailable", "/x")
        assert held.status_code == 200


class TestGatewayEndpoints:
    async def test_public_port_health_and_status_internal_port_the_rest(
        self, echo: tuple[Echo, str]
    ) -> None:
        _, url = echo
        routes = [
            RouteConfig(name="echo", prefix="/api/echo", upstream=url, ready_path="/ready"),
            RouteConfig(name="dead", prefix="/api/dead", upstream=dead_upstream()),
        ]
        port = free_port()
        internal = f"http://127.0.0.1:{port}"
        async with (
            gateway(routes, gateway_status_timeout_seconds=0.5, gateway_internal_port=port) as (
                client,
                _,
            ),
            httpx.AsyncClient(base_url=internal, timeout=10) as operator,
        ):
            health = await client.get("/health")
            status = await client.get("/api/gateway/status")
            await client.get("/api/echo/x")
            hidden = {
                path: (await client.get(path)).status_code
                for path in (
                    "/metrics",
                    "/docs",
                    "/openapi.json",
                    "/ready",
                    "/api/gateway/services",
                    "/api/echo/ready",
                )
            }
            services = await operator.get("/api/gateway/services")
            detailed = await operator.get("/api/gateway/status")
            metrics = parse((await operator.get("/metrics")).text)
            docs = await operator.get("/openapi.json")

        assert health.json() == {"status": "ok"}
        # The public learns whether the platform is up, nothing of its insides.
        assert status.status_code == 503
        assert status.json() == {"status": "degraded"}
        assert hidden == dict.fromkeys(hidden, 404)
        assert services.json() == {
            "services": [
                {"name": "echo", "prefix": "/api/echo", "upstream": url},
                {"name": "dead", "prefix": "/api/dead", "upstream": routes[1].upstream},
            ]
        }
        assert detailed.status_code == 503
        body = detailed.json()
        assert body["status"] == "degraded"
        assert body["services"]["echo"]["status"] == "up"
        assert body["services"]["dead"]["status"] == "down"
        key = (
            "http_server_request_duration_seconds_count",
            frozenset({"method": "GET", "route": "/api/echo", "status_code": "200"}.items()),
        )
        assert metrics[key] == 1
        assert docs.status_code == 200

    def test_routes_come_from_configuration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        routes = [
            {"name": "billing", "prefix": "/api/billing", "upstream": "http://billing:9100/v2"},
        ]
        monkeypatch.setenv("GATEWAY_ROUTES", json.dumps(routes))

        settings = GatewaySettings(_env_file=None)

        assert [route.model_dump() for route in settings.gateway_routes] == [
            {
                **routes[0],
                "ready_path": "/ready",
                "hidden_paths": ["/metrics", "/docs", "/redoc", "/openapi.json", "/ready"],
            }
        ]

    @pytest.mark.parametrize(
        "routes",
        [
            [{"name": "a", "prefix": "/x", "upstream": "http://a"}] * 2,
            [{"name": "a", "prefix": "no-slash", "upstream": "http://a"}],
            [{"name": "a", "prefix": "/x", "upstream": "ftp://a"}],
        ],
    )
    def test_bad_route_tables_are_refused(
        self, monkeypatch: pytest.MonkeyPatch, routes: list[dict[str, str]]
    ) -> None:
        monkeypatch.setenv("GATEWAY_ROUTES", json.dumps(routes))

        with pytest.raises(ValueError, match="gateway_routes"):
            GatewaySettings(_env_file=None)
