"""Spans exported by a process of their own, beside the service's.

Exporting a span costs its encoding (OTLP protobuf) and its share of an HTTP request, Python work
that holds the GIL wherever it runs: in the SDK's batch processor, a thread of the service, every
span's encoding is time the event loop waits. On the worker (two spans a delivery) that thread
took a third of what tracing cost; measured in the benchmark suite's drain run, the worker
drained about a fifth more events a second with the export moved out of its process.

So a service's spans leave it as plain values: :class:`ExportProcessSpanProcessor` turns each
span, when it ends, into a tuple of its fields (``shared.span_records``) and queues it; a thread
of its own sends the queued spans in batches (``marshal``, one C call a batch) down a pipe to a
child process, ``python -m shared.span_export``, which rebuilds them as the SDK's
``ReadableSpan`` and exports them with :class:`shared.otlp.DirectOTLPSpanExporter`. The child
inherits the environment, so ``OTEL_EXPORTER_OTLP_*`` configure its exporter as they would the
service's.

As the SDK's batch processor, and by its variables: at most ``OTEL_BSP_MAX_QUEUE_SIZE`` spans
wait (16,384 here; more are dropped, and a warning every ten seconds says how many), a batch is
sent when ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` spans wait or ``OTEL_BSP_SCHEDULE_DELAY``
milliseconds have passed, and ``force_flush``/``shutdown`` return once the child has exported
what was queued before them (the provider's shutdown runs at exit; it gives up, and stops the
child, after 30 s in all). Spans recorded but not sampled are not exported.

The child exits when its input closes, after exporting what it has: it ignores SIGINT and
SIGTERM, which a terminal or a service manager may send to the whole process group, so the
service's own shutdown decides when the last spans go. A child that dies (killed, out of
memory), or reads nothing for a minute, is stopped and started again for the next batch, at
most once every five seconds; the spans meant for it are dropped and counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from shared.span_records import (
    FLUSH,
    ORIGIN,
    SPANS,
    Origins,
    Record,
    describe,
    encode,
    messages,
    rebuild,
    record,
)

logger = logging.getLogger(__name__)

_QUEUE_SIZE = 16_384  # a few of the worker's batches (two spans a delivery), while a batch goes
_RESTART_SECONDS = 5.0
_DROPPED_LOG_SECONDS = 10.0
_STOP_SECONDS = 30.0  # the SDK's export timeout: what the child may take to send its last spans
_PIPE_BYTES = 1 << 20  # Linux's largest pipe for an unprivileged process, by default
_STUCK_SECONDS = 60.0  # a child that reads nothing for this long is stopped (and replaced)
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the child imports ``shared`` from


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        number = int(value)
    except ValueError:
        if value:
            logger.warning("%s is not a whole number; using %d", name, default)
        return default
    return number if number > 0 else default


class ExportProcessSpanProcessor(SpanProcessor):
    """Queues each ended, sampled span, as plain values, for the export process (started with
    the processor, and again after it dies)."""

    def __init__(self, service_name: str) -> None:
        self._service_name = service_name
        self._max_queue = _environment_int("OTEL_BSP_MAX_QUEUE_SIZE", _QUEUE_SIZE)
        self._batch = min(_environment_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self._max_queue)
        self._delay = _environment_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self._queue: deque[Record] = deque()
        # Resource and scope pairs, sent once each and named by number after (hashing a
        # resource dumps it to JSON: spans are matched to theirs by identity).
        self._origins: dict[tuple[int, int], tuple[int, Resource, InstrumentationScope | None]]
        self._origins = {}
        self._origin_ids = itertools.count()
        self._wake = threading.Event()
        # One sender at a time, and a batch taken from the queue and sent as one: batches leave
        # in the order their spans ended, and a flush's token after every span before it.
        self._send_lock = threading.RLock()
        self._flush_lock = threading.Lock()  # one reader of the acknowledgements
        self._closed = False
        self._dropped = 0
        self._dropped_logged_at = 0.0
        self._child: subprocess.Popen[bytes] | None = None
        self._child_started_at = -_RESTART_SECONDS
        self._flushes = 0
        with self._send_lock:
            self._running_child()  # started now, so that its imports overlap the service's
        self._start()
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(reference))

    @property
    def export_process_id(self) -> int | None:
        """The export process's id, while one runs (for an operator's ``ps``, and tests)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="SpanExportSender", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        # A forked copy of the service: the queue, the pipes and the thread were its parent's.
        # Its copies of the pipes' ends are closed (unbuffered, so closing writes nothing and
        # waits on no lock a thread of the parent held), so the export process still sees the
        # end of its input when the parent closes it.
        child, self._child = self._child, None
        if child is not None:
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
        self._queue = deque()
        self._origins = {}
        self._child_started_at = -_RESTART_SECONDS
        self._send_lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        if not self._closed:
            self._start()

    # -- the service's side: called by the provider, on the service's own threads --------------

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed:
            return
        context = span.get_span_context()
        if context is None or not context.trace_flags.sampled:  # as the SDK's batch processor
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._dropped += 1
            return
        queue.append(record(span, context, self._origin(span)))
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def _origin(self, span: ReadableSpan) -> int:
        resource, scope = span.resource, span.instrumentation_scope
        key = (id(resource), id(scope))
        known = self._origins.get(key)
        if known is None:
            # Queued before it is known, so no span that names it (on another thread) can
            # reach the queue first; the objects stay referenced, so their ids are not reused.
            origin = next(self._origin_ids)
            self._queue.append((ORIGIN, origin, *describe(resource, scope)))
            known = self._origins[key] = (origin, resource, scope)
        return known[0]

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send every queued span, then wait until the child has exported them."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._flush_lock:
            self._flushes += 1
            token = self._flushes
            if not self._send_queued(deadline):
                return False
            if not self._send_lock.acquire(timeout=_remaining(deadline)):
                return False
            try:
                sent = self._send(FLUSH, token, deadline)
                child = self._child
                if not sent or child is None:
                    return False
                assert child.stdout is not None
                # Its own descriptor: the sender thread may close the child's meanwhile.
                acknowledgements = os.dup(child.stdout.fileno())
            finally:
                self._send_lock.release()
            try:
                return _await_token(acknowledgements, token, deadline)
            finally:
                os.close(acknowledgements)

    def shutdown(self) -> None:
        """Send what is queued, close the child's input and wait for it to finish exporting:
        all within 30 s (the SDK's export timeout), after which the child is stopped."""
        if self._closed:
            return
        deadline = time.monotonic() + _STOP_SECONDS
        self._closed = True
        self._wake.set()
        self._thread.join(_remaining(deadline))
        self._send_queued(deadline)
        if self._send_lock.acquire(timeout=_remaining(deadline)):
            child, self._child = self._child, None
            self._send_lock.release()
        else:  # the sender is still writing to a process that does not read
            child, self._child = self._child, None
            if child is not None:
                logger.warning("span export process does not read its input; stopping it")
                child.kill()
        if child is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if child.stdin is not None:
                child.stdin.close()
        try:
            child.wait(_remaining(deadline))
        except subprocess.TimeoutExpired:
            logger.warning("span export process did not finish in time; stopping it")
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()

    # -- the sender thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._delay)
            self._wake.clear()
            try:
                self._send_queued()
                self._report_dropped()
            except Exception:  # a bug: the thread must live on, or every later span is lost
                logger.exception("could not send spans to the export process")

    def _send_queued(self, deadline: float | None = None) -> bool:
        """Send the queue's spans, a batch at a time; whether all reached a live child (by the
        deadline, if one is given)."""
        sent = True
        queue = self._queue
        while queue:
            if not self._send_lock.acquire(timeout=_remaining(deadline)):
                return False
            try:
                records: list[Record] = []
                for _ in range(min(self._batch, len(queue))):
                    records.append(queue.popleft())
                if records and not self._send(SPANS, records, deadline):
                    self._dropped += sum(1 for item in records if item[0] == SPANS)
                    sent = False
            finally:
                self._send_lock.release()
        return sent

    def _send(self, kind: int, body: Any, deadline: float | None) -> bool:
        """Whether the message reached a live child (called with the send lock held)."""
        message = encode(kind, body)
        if message is None:
            logger.error("a batch of spans could not be encoded; dropped")
            self._origins.clear()  # the origins in it, if any, are announced again
            return False
        child = self._running_child()
        if child is None:
            return False
        return self._write(child, message, deadline)

    def _write(self, child: subprocess.Popen[bytes], data: bytes, deadline: float | None) -> bool:
        """Write to the child, waiting for it to read up to the deadline (without one, up to
        a minute: a child that reads nothing for that long is stopped, and replaced)."""
        assert child.stdin is not None
        try:
            _write_all(child.stdin.fileno(), data, deadline or time.monotonic() + _STUCK_SECONDS)
        except TimeoutError:
            logger.warning("span export process does not read its input; stopping it")
            self._forget(child)
            return False
        except (OSError, ValueError):  # the child is gone (a broken pipe, a closed file)
            self._forget(child)
            return False
        return True

    def _running_child(self) -> subprocess.Popen[bytes] | None:
        child = self._child
        if child is not None and child.poll() is None:
            return child
        if child is not None:
            logger.warning(
                "span export process exited; starting another",
                extra={"exit_code": child.returncode},
            )
            self._forget(child)
        if time.monotonic() - self._child_started_at < _RESTART_SECONDS:
            return None
        self._child_started_at = time.monotonic()
        try:
            child = self._child = _spawn(self._service_name)
        except OSError as exc:
            logger.error("could not start the span export process", extra={"error": repr(exc)})
            return None
        # What was sent so far went to the one that died: a new one hears every origin again.
        origins = [
            (ORIGIN, origin, *describe(resource, scope))
            for origin, resource, scope in self._origins.values()
        ]
        message = encode(SPANS, origins) if origins else None
        if message is not None and not self._write(child, message, None):
            return None
        return child

    def _forget(self, child: subprocess.Popen[bytes]) -> None:
        if self._child is child:
            self._child = None
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        with contextlib.suppress(OSError):
            child.kill()
        child.wait()

    def _report_dropped(self) -> None:
        if not self._dropped:
            return
        now = time.monotonic()
        if now - self._dropped_logged_at < _DROPPED_LOG_SECONDS:
            return
        dropped, self._dropped = self._dropped, 0
        self._dropped_logged_at = now
        logger.warning(
            "spans dropped: the export queue was full or its process gone",
            extra={"spans": dropped},
        )


def _after_fork(reference: weakref.ref[ExportProcessSpanProcessor]) -> None:
    processor = reference()
    if processor is not None:
        processor._after_fork()


def _remaining(deadline: float | None) -> float:
    """Seconds to the deadline, for a lock's or a process's timeout (-1: no deadline)."""
    return -1 if deadline is None else max(0.0, deadline - time.monotonic())


def _spawn(service_name: str) -> subprocess.Popen[bytes]:
    environment = dict(os.environ)
    path = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = _ROOT + (os.pathsep + path if path else "")
    child = subprocess.Popen(  # noqa: S603  (this interpreter, this module: nothing from input)
        [sys.executable, "-m", "shared.span_export", service_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,  # whole frames written by _write_all, nothing held in a buffer
        env=environment,
        start_new_session=True,  # no terminal signal reaches it: its input closing ends it
    )
    assert child.stdin is not None
    os.set_blocking(child.stdin.fileno(), False)  # so that a write can wait with a deadline
    # A pipe that holds several batches: a write that has to wait for the child to read takes
    # the GIL again for every few pages the child frees, time the event loop waits for.
    with contextlib.suppress(OSError):
        fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    return child


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """Write every byte to a non-blocking descriptor; TimeoutError at the deadline."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError from None
            select.select([], [fd], [], remaining)
            continue
        view = view[written:]


def _await_token(fd: int, token: int, deadline: float) -> bool:
    """Read the child's acknowledgements until ``token``'s, or the deadline."""
    expected = b"%d" % token
    line = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return False
            chunk = os.read(fd, 64)
            if not chunk:  # the child is gone
                return False
            line += chunk
            *complete, line = line.split(b"\n")
            if expected in complete:
                return True
    except OSError:
        return False


def main() -> None:
    """The export process: spans from stdin, exported; each flush token acknowledged on
    stdout once everything before it has been exported."""
    from shared.logs import JsonFormatter
    from shared.otlp import DirectOTLPSpanExporter

    service = sys.argv[1] if len(sys.argv) > 1 else "unknown"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(f"{service} span export"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    exporter = DirectOTLPSpanExporter()
    origins: Origins = {}
    try:
        for kind, body in messages(sys.stdin.buffer):
            if kind == FLUSH:
                sys.stdout.buffer.write(b"%d\n" % body)
                sys.stdout.buffer.flush()
                continue
            try:
                spans = rebuild(body, origins)
                if spans:
                    exporter.export(spans)
            except Exception:  # a batch this process cannot read: the next may be fine
                logger.exception("could not export a batch of spans")
    finally:
        exporter.shutdown()


if __name__ == "__main__":
    main()
