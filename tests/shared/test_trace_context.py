"""Reading a message's trace context (shared.telemetry.context_from): the worker's direct read of
a plain ``traceparent`` gives what ``propagate.extract`` gives, for every header it meets, and
any other propagator configured is used as it is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import CarrierT, Getter, TextMapPropagator, default_getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.telemetry import context_from

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"

CARRIERS: dict[str, dict[str, Any]] = {
    "sampled": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"},
    "not sampled": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"},
    "other flags": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-03"},
    "with other headers": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "x-attempt": 2},
    "upper-case hex": {"traceparent": f"00-{TRACE_ID.upper()}-{SPAN_ID}-01"},
    "zero trace id": {"traceparent": f"00-{'0' * 32}-{SPAN_ID}-01"},
    "zero span id": {"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"},
    "version ff": {"traceparent": f"ff-{TRACE_ID}-{SPAN_ID}-01"},
    "a later version": {"traceparent": f"01-{TRACE_ID}-{SPAN_ID}-01-more"},
    "version 00 with more": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01-more"},
    "padded": {"traceparent": f" 00-{TRACE_ID}-{SPAN_ID}-01\t"},
    "short": {"traceparent": f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01"},
    "empty": {"traceparent": ""},
    "none": {},
    "with trace state": {
        "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01",
        "tracestate": "vendor=value,other=1",
    },
    "with baggage": {
        "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01",
        "baggage": "tenant=acme",
    },
}


def _seen(context: Context) -> tuple[trace.SpanContext, dict[str, object]]:
    return trace.get_current_span(context).get_span_context(), dict(baggage.get_all(context))


class TestContextFrom:
    @pytest.mark.parametrize("carrier", CARRIERS.values(), ids=CARRIERS.keys())
    def test_gives_what_the_propagators_give(self, carrier: dict[str, Any]) -> None:
        assert _seen(context_from(carrier)) == _seen(propagate.extract(carrier))

    def test_the_parent_is_remote_and_carries_the_ids(self) -> None:
        parent = trace.get_current_span(context_from(CARRIERS["sampled"])).get_span_context()

        assert (parent.trace_id, parent.span_id) == (int(TRACE_ID, 16), int(SPAN_ID, 16))
        assert parent.is_remote
        assert parent.trace_flags.sampled

    @pytest.fixture
    def other_propagator(self) -> Iterator[None]:
        """A deployment that propagates only its own header."""
        before = propagate.get_global_textmap()

        class OnlyOurs(TraceContextTextMapPropagator):
            def extract(
                self,
                carrier: CarrierT,
                context: Context | None = None,
                getter: Getter[CarrierT] = default_getter,
            ) -> Context:
                ours = getter.get(carrier, "x-ours")
                return super().extract({"traceparent": ours[0] if ours else ""}, context)

        ours: TextMapPropagator = CompositePropagator([OnlyOurs()])
        propagate.set_global_textmap(ours)
        try:
            yield
        finally:
            propagate.set_global_textmap(before)

    @pytest.mark.usefixtures("other_propagator")
    def test_another_propagator_is_used_as_configured(self) -> None:
        ours = {"x-ours": f"00-{TRACE_ID}-{'1' * 16}-01"}
        ignored = CARRIERS["sampled"]

        read = trace.get_current_span(context_from({**ignored, **ours})).get_span_context()

        assert read.span_id == int("1" * 16, 16)
        assert not trace.get_current_span(context_from(ignored)).get_span_context().is_valid
