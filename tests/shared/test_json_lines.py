"""One JSON line per record (shared/logs.py), as an operator's log pipeline parses it."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

import pytest

from shared.logs import JsonFormatter, log_context

# Times a millisecond clock gets wrong by rounding carelessly: a whole second, just under the
# next one, exactly on a millisecond and a hair either side of one.
TIMES = [
    1764667200.0,
    1764667200.9999996,
    1764667200.9995,
    1764667201.395,
    1764667201.3959994,
    1764667201.3950004,
    1764667259.999,
]


def _record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "worker.processing", logging.INFO, "", 0, "campaign %s", ("ok",), None
    )
    record.created = created
    record.__dict__.update(extra)
    return record


class TestJsonLines:
    @pytest.mark.parametrize("created", TIMES)
    def test_the_timestamp_is_the_records_time_in_utc_to_the_millisecond(
        self, created: float
    ) -> None:
        line = json.loads(JsonFormatter("worker").format(_record(created)))

        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert line["timestamp"] == expected

    def test_the_second_moves_on_in_one_formatter(self) -> None:
        formatter = JsonFormatter("worker")

        stamps = [json.loads(formatter.format(_record(t)))["timestamp"] for t in TIMES]

        assert stamps == [
            datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds") for t in TIMES
        ]

    def test_fields_context_and_extras_in_one_object(self) -> None:
        record = _record(TIMES[0], redelivered=False, event_id="e-1", when=datetime(2026, 1, 1))

        with log_context(tenant_id="acme", attempt=2):
            line = json.loads(JsonFormatter("worker").format(record))

        assert line == {
            "timestamp": "2025-12-02T09:20:00.000+00:00",
            "level": "INFO",
            "service": "worker",
            "logger": "worker.processing",
            "message": "campaign ok",
            "tenant_id": "acme",
            "attempt": 2,
            "redelivered": False,
            "event_id": "e-1",
            "when": "2026-01-01 00:00:00",  # what JSON cannot hold, as text
        }

    def test_text_stays_as_written(self) -> None:
        line = JsonFormatter("worker").format(_record(TIMES[0], name_of="Café ✓"))

        assert "Café ✓" in line
        assert json.loads(line)["name_of"] == "Café ✓"

    def test_extras_of_a_logger_call_after_another_handler_formatted_the_record(self) -> None:
        # A test runner's handler formats first and leaves ``message`` and ``asctime`` on the
        # record: they are not the call's extras.
        first, ours = io.StringIO(), io.StringIO()
        plain = logging.StreamHandler(first)
        plain.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        json_lines = logging.StreamHandler(ours)
        json_lines.setFormatter(JsonFormatter("worker"))
        logger = logging.getLogger("tests.json_lines.extras")
        logger.propagate = False
        logger.handlers[:] = [plain, json_lines]
        try:
            logger.warning("campaign %s", "late", extra={"campaign_id": "c-1", "attempt": 3})
        finally:
            logger.handlers.clear()

        line = json.loads(ours.getvalue())
        assert "campaign late" in first.getvalue()
        assert {k: v for k, v in line.items() if k != "timestamp"} == {
            "level": "WARNING",
            "service": "worker",
            "logger": "tests.json_lines.extras",
            "message": "campaign late",
            "campaign_id": "c-1",
            "attempt": 3,
        }
