"""The trust boundary at the edge: a request from outside the platform starts a trace of its own.

A caller's W3C ``traceparent`` (and ``tracestate``, ``baggage``) would otherwise make the
gateway's server span, and everything after it, part of whatever trace the caller names: anyone
could write into another campaign's trace. So, before the server span is started, the gateway
removes them from every request whose peer is not among ``GATEWAY_TRUSTED_CALLERS``, and the
server span links to the caller's context instead (a link, not a parent: Jaeger shows where the
request came from without letting it in). A trusted caller (a proxy or a service of the
platform's own in front of the gateway) is continued as before. Inside the platform, from the
gateway on, context flows as always.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from opentelemetry import propagate, trace
from starlette.types import ASGIApp, Receive, Scope, Send

# Where the boundary leaves the caller's trace context for the server span's link.
CALLER_CONTEXT = "gateway.caller_trace_context"
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TraceBoundary:
    """ASGI middleware, outside the server span's: drop an untrusted caller's trace context."""

    def __init__(self, app: ASGIApp, *, trusted: Sequence[Network]) -> None:
        self.app = app
        self._trusted = tuple(trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._is_trusted(scope.get("client")):
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            caller = {
                key.decode("latin-1"): value.decode("latin-1")
                for key, value in headers
                if key in (b"traceparent", b"tracestate")
            }
            if caller:
                scope[CALLER_CONTEXT] = caller
            scope["headers"] = [(key, value) for key, value in headers if key not in _TRACE_HEADERS]
        await self.app(scope, receive, send)

    def _is_trusted(self, client: tuple[str, int] | None) -> bool:
        if not self._trusted or client is None:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:  # a Unix socket's peer, say
            return False
        return any(address in network for network in self._trusted)


def link_caller(span: trace.Span, scope: dict[str, Any]) -> None:
    """A server-request hook: link the server span to the trace context the boundary took from
    an untrusted caller (ignored unless it is a well-formed W3C context)."""
    caller = scope.get(CALLER_CONTEXT)
    if not caller or not span.is_recording():
        return
    context = trace.get_current_span(propagate.extract(caller)).get_span_context()
    if context.is_valid:
        span.add_link(context, {"link.reason": "caller outside the trust boundary"})
