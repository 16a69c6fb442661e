"""The worker's Prometheus metrics (served on /metrics of WORKER_METRICS_PORT).

No tenant or campaign labels: their number grows without bound.
"""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Outcome(StrEnum):
    SUCCESS = "success"  # executed, success row written, acked
    RETRY = "retry"  # failed with attempts left: retry row, sent to a delay queue, acked
    FAILED = "failed"  # failed on its last attempt: failed row, dead-lettered
    DUPLICATE = "duplicate"  # its success row already existed: acked without running again
    POISON = "poison"  # not a valid event (or no such campaign): dead-lettered at once
    REQUEUED = "requeued"  # given back to the queue (worker stopping, unexpected error)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "worker_messages",
            "campaign.created deliveries handled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        # Each outcome's counter, looked up once (``labels()`` takes a lock and builds a key).
        self.outcomes = {outcome: self.messages.labels(outcome.value) for outcome in Outcome}
        self.processing_duration = Histogram(
            "worker_message_processing_duration_seconds",
            "Time from taking a delivery to settling it.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.dead_lettered = Counter(
            "worker_dead_lettered_messages",
            "Messages sent to the campaign.deadletter exchange.",
            registry=registry,
        )
        self.replays = Counter(
            "worker_replayed_messages",
            "Dead letters sent back to the worker's queue by an operator (deadletters replay, "
            "the RabbitMQ UI's move): each starts a new round of attempts.",
            registry=registry,
        )
        self.in_flight = Gauge(
            "worker_messages_in_flight",
            "Deliveries being processed now.",
            registry=registry,
        )
        self.executing = Gauge(
            "worker_executions_in_progress",
            "Campaign executions running now (at most WORKER_CONCURRENCY).",
            registry=registry,
        )
