"""Spans exported by a process of their own (shared/span_export.py): what reaches an OTLP
receiver is what the SDK would have sent, nothing queued is lost at a flush or a shutdown, a
burst of the worker's batches fits the queue, and a dead export process is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from http import HTTPStatus

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, StaticSampler
from opentelemetry.trace import SpanKind

from shared import span_export, span_records, spans
from shared.span_export import ExportProcessSpanProcessor
from tests.support.otlp import OtlpReceiver
from tests.support.polling import eventually
from tests.support.span_samples import every_kind_of_span
from worker.metrics import Outcome


@pytest.fixture
def sample() -> Iterator[list[ReadableSpan]]:
    with every_kind_of_span() as made:
        yield made


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    async with receiver.running():
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{receiver.endpoint}/v1/traces")
        yield receiver


@pytest.fixture
async def processor(receiver: OtlpReceiver) -> AsyncIterator[ExportProcessSpanProcessor]:
    processor = ExportProcessSpanProcessor("test")
    yield processor
    await asyncio.to_thread(processor.shutdown)


def _worker_spans(provider: TracerProvider, deliveries: int) -> None:
    """Two spans a delivery, as the worker makes them."""
    tracer = spans.tracer("worker.processing", provider)
    for n in range(deliveries):
        process = tracer.start_span(
            "campaigns.campaign.created process",
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "rabbitmq", "campaign.id": f"c-{n}"},
        )
        insert = tracer.start_span(
            "INSERT campaign_job_logs",
            context=trace.set_span_in_context(process),
            kind=SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "campaign.recorded": "written"},
        )
        insert.end()
        process.end()


def _provider(processor: ExportProcessSpanProcessor) -> TracerProvider:
    provider = TracerProvider(resource=Resource({"service.name": "worker"}))
    provider.add_span_processor(processor)
    return provider


def _received_names(receiver: OtlpReceiver) -> list[str]:
    return [span.name for span in receiver.spans]


class TestExportProcess:
    async def test_what_arrives_is_what_the_sdk_would_have_sent(
        self,
        processor: ExportProcessSpanProcessor,
        receiver: OtlpReceiver,
        sample: list[ReadableSpan],
    ) -> None:
        for span in sample:
            processor.on_end(span)

        flushed = await asyncio.to_thread(processor.force_flush)

        assert flushed
        assert receiver.requests == [sdk_encode(sample)]

    async def test_a_burst_of_the_workers_batches_loses_no_span(
        self, processor: ExportProcessSpanProcessor, receiver: OtlpReceiver
    ) -> None:
        # Five batches of 500 deliveries, two spans each, ended faster than any export (the
        # SDK's own queue of 2,048 would drop more than half of them).
        _worker_spans(_provider(processor), 5 * 500)

        assert await asyncio.to_thread(processor.force_flush)

        assert len(receiver.spans) == 5000
        processes = [span for span in receiver.spans if span.kind == "CONSUMER"]
        assert len({span.attributes["campaign.id"] for span in processes}) == 2500

    async def test_shutdown_exports_what_was_queued_and_ends_the_process(
        self, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing sent before shutdown
        processor = ExportProcessSpanProcessor("test")
        pid = processor.export_process_id
        assert pid is not None
        _worker_spans(_provider(processor), 10)

        await asyncio.to_thread(processor.shutdown)

        assert len(receiver.spans) == 20
        assert processor.export_process_id is None
        with pytest.raises(ProcessLookupError):  # exited, and reaped
            os.kill(pid, 0)

    async def test_a_dead_export_process_is_replaced(
        self,
        processor: ExportProcessSpanProcessor,
        receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        monkeypatch.setattr(span_export, "_RESTART_SECONDS", 0.0)
        provider = _provider(processor)
        _worker_spans(provider, 1)
        assert await asyncio.to_thread(processor.force_flush)
        first = processor.export_process_id
        assert first is not None

        os.kill(first, signal.SIGKILL)

        async def running() -> int | None:
            return processor.export_process_id

        await eventually(running, until=lambda pid: pid is None, what="the process gone")
        _worker_spans(provider, 3)
        flushed = await asyncio.to_thread(processor.force_flush)

        assert flushed
        assert len(receiver.spans) == 2 + 6  # the new process sent every span ended after
        assert processor.export_process_id not in (None, first)
        assert "span export process exited; starting another" in caplog.messages

    async def test_terminal_signals_do_not_stop_the_export_process(
        self, processor: ExportProcessSpanProcessor, receiver: OtlpReceiver
    ) -> None:
        provider = _provider(processor)
        _worker_spans(provider, 1)
        assert await asyncio.to_thread(processor.force_flush)  # running, its handlers set
        pid = processor.export_process_id
        assert pid is not None

        # What Ctrl-C or a service manager sends the whole group: the service decides when
        # its spans stop, by closing the process's input.
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        _worker_spans(provider, 1)

        assert await asyncio.to_thread(processor.force_flush)
        assert len(receiver.spans) == 4
        assert processor.export_process_id == pid

    async def test_a_full_queue_drops_spans_and_says_how_many(
        self,
        receiver: OtlpReceiver,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
        processor = ExportProcessSpanProcessor("test")
        try:
            provider = _provider(processor)
            # The sender held up (as by a collector that does not answer): the queue fills.
            with processor._send_lock:
                _worker_spans(provider, 50)
            caplog.set_level(logging.WARNING, logger="shared.span_export")

            assert await asyncio.to_thread(processor.force_flush)
            # 10 places, one of them taken by the resource and scope the spans name.
            assert len(receiver.spans) == 9

            async def dropped() -> list[object]:
                return [
                    getattr(record, "spans", None)
                    for record in caplog.records
                    if record.message.startswith("spans dropped")
                ]

            assert await eventually(dropped, what="the warning") == [91]
        finally:
            await asyncio.to_thread(processor.shutdown)

    def test_a_bad_setting_falls_back_to_the_default(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "lots")

        assert span_export._environment_int("OTEL_BSP_MAX_QUEUE_SIZE", 16_384) == 16_384
        assert "OTEL_BSP_MAX_QUEUE_SIZE is not a whole number; using 16384" in caplog.messages

    async def test_values_of_subclassed_types_arrive_as_their_plain_values(
        self, processor: ExportProcessSpanProcessor, receiver: OtlpReceiver
    ) -> None:
        # marshal writes only exact types; the platform's outcomes are StrEnum members.
        tracer = spans.tracer("worker.processing", _provider(processor))
        odd = tracer.start_span(
            "odd values",
            attributes={
                "campaign.outcome": Outcome.SUCCESS,  # a StrEnum member
                "http.response.status_code": HTTPStatus.CREATED,  # an IntEnum member
                "not.a.value": object(),  # type: ignore[dict-item]  # what a bug might set
                "kept": "plain",
            },
        )
        odd.end()
        _worker_spans(_provider(processor), 1)  # the batch after it still arrives

        assert await asyncio.to_thread(processor.force_flush)

        [received] = [span for span in receiver.spans if span.name == "odd values"]
        assert received.attributes == {
            "campaign.outcome": "success",
            "http.response.status_code": 201,
            "kept": "plain",
        }
        assert len(receiver.spans) == 3

    async def test_a_span_recorded_but_not_sampled_is_not_exported(
        self, processor: ExportProcessSpanProcessor, receiver: OtlpReceiver
    ) -> None:
        recording_only = TracerProvider(sampler=StaticSampler(Decision.RECORD_ONLY))
        recording_only.add_span_processor(processor)
        recording_only.get_tracer("t").start_span("recorded only").end()
        _worker_spans(_provider(processor), 1)

        assert await asyncio.to_thread(processor.force_flush)

        assert "recorded only" not in _received_names(receiver)
        assert len(receiver.spans) == 2

    async def test_a_forked_copy_exports_through_an_export_process_of_its_own(
        self, processor: ExportProcessSpanProcessor, receiver: OtlpReceiver
    ) -> None:
        # What a pre-forking server does to a service that configured tracing before the fork.
        provider = _provider(processor)
        _worker_spans(provider, 1)
        assert await asyncio.to_thread(processor.force_flush)
        parents = processor.export_process_id
        pid = os.fork()
        if pid == 0:  # the copy: its spans, flushed and shut down; nothing else of the test
            code = 1
            try:
                _worker_spans(provider, 2)
                own = processor.export_process_id  # none yet: its parent's is not its own
                flushed = processor.force_flush(10_000)
                started = processor.export_process_id
                processor.shutdown()
                code = 0 if own is None and flushed and started not in (None, parents) else 2
            finally:
                os._exit(code)

        async def exit_code() -> int | None:
            done, status = await asyncio.to_thread(os.waitpid, pid, os.WNOHANG)
            return os.waitstatus_to_exitcode(status) if done else None

        try:
            exited = await eventually(
                exit_code, until=lambda code: code is not None, timeout=30, what="the copy done"
            )
        except BaseException:  # still running (stuck): not left behind
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(os.waitpid, pid, 0)
            raise
        assert exited == 0
        assert len(receiver.spans) == 2 + 4
        # The parent's processor and export process are untouched by the copy's.
        _worker_spans(provider, 1)
        assert await asyncio.to_thread(processor.force_flush)
        assert len(receiver.spans) == 2 + 4 + 2
        assert processor.export_process_id == parents

    async def test_shutdown_stops_an_export_process_that_does_not_read(
        self, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(span_export, "_STOP_SECONDS", 2.0)
        processor = ExportProcessSpanProcessor("test")
        pid = processor.export_process_id
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # alive, reading nothing
        try:
            # More than the pipe holds, so the sender waits on the child.
            _worker_spans(_provider(processor), 2000)
            assert not await asyncio.to_thread(processor.force_flush, 500)

            await asyncio.to_thread(processor.shutdown)  # returns (the test's timeout guards)

            assert processor.export_process_id is None
            with pytest.raises(ProcessLookupError):  # stopped, and reaped
                os.kill(pid, 0)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class TestRebuild:
    def test_a_span_whose_origin_never_came_is_left_out_not_its_batch(
        self, sample: list[ReadableSpan], caplog: pytest.LogCaptureFixture
    ) -> None:
        first, second = sample[0], sample[1]
        origins: span_records.Origins = {}
        announced = (span_records.ORIGIN, 0, *span_records.describe(first.resource, None))
        records = [
            announced,
            span_records.record(first, first.context, 0),
            span_records.record(second, second.context, 7),  # an origin this process never heard of
        ]

        rebuilt = span_records.rebuild(records, origins)

        assert [span.name for span in rebuilt] == [first.name]
        assert "spans of an unknown resource and scope left out" in caplog.messages
