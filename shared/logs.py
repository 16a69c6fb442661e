"""JSON logs: one object per line, on every process, uvicorn's own loggers included.

Each line carries ``timestamp`` (UTC, ISO 8601), ``level``, ``service``, ``logger``, ``message``,
``trace_id``/``span_id`` (the hex forms Jaeger shows) while a span is active, and whatever the
call passed in ``extra=``. Nothing here logs request bodies, so a password never reaches a line.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any, TextIO

from opentelemetry import trace
from opentelemetry.trace import SpanContext

if TYPE_CHECKING:  # the span export process logs with this module, and needs no settings
    from shared.settings import CommonSettings

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName", "color_message"}
)
# A record's own attributes come first in its __dict__, ``extra=`` after them (makeRecord).
_OWN_ATTRIBUTE_COUNT = len(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_HANDLER_NAME = "campaign-platform-json"
_context: ContextVar[dict[str, Any]] = ContextVar("log_context", default={})  # noqa: B039
# One encoder for every line (json.dumps with options makes a new one each call).
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode


class log_context:  # noqa: N801  (a context manager, used as one: ``with log_context(...)``)
    """Add ``fields`` to every line logged inside the block (this task and those it starts).
    A class rather than a generator: the worker enters one for every delivery."""

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._token = _context.set({**_context.get(), **self._fields})

    def __exit__(self, *exc_info: object) -> None:
        _context.reset(self._token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond, as ``datetime.isoformat`` writes it (from the time
        rounded to the microsecond); the part up to the second is made once a second."""
        second = int(created)
        micros = round((created - second) * 1_000_000)
        if micros == 1_000_000:
            second, micros = second + 1, 0
        if second != self._second:
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._second_text}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(trace_fields(trace.get_current_span().get_span_context()))
        line.update(_context.get())
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            line.update(_access_fields(record.args))
        for key, value in islice(vars(record).items(), _OWN_ATTRIBUTE_COUNT, None):
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line)


def trace_fields(span_context: SpanContext) -> dict[str, str]:
    """``trace_id`` and ``span_id`` as every line carries them, when the span is a real one."""
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
    }


def _access_fields(args: tuple[Any, ...]) -> dict[str, Any]:
    if len(args) != 5:
        return {}
    client, method, path, http_version, status = args
    return {
        "client": client,
        "method": method,
        "path": path,
        "http_version": http_version,
        "status_code": status,
    }


def configure_logging(settings: CommonSettings, stream: TextIO | None = None) -> None:
    """Route every logger (uvicorn's too) through one JSON handler on ``stream`` (stdout; a
    command-line tool, whose output is on stdout, logs to stderr). Idempotent."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(settings.service_name))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace our own handler from an earlier call; leave any other (a test runner's) alone.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(settings.log_level.upper())
    # What a line never shows, not gathered for every record: the thread, the process id and
    # name (the logging HOWTO's "Optimization"). The caller's file and line stay: a test
    # runner's captured logs show them.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for name in _UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # One line per outgoing request (the gateway's, the JWKS fetch) would repeat the access log.
    for client in ("httpx",):
        logging.getLogger(client).setLevel(max(root.level, logging.WARNING))
