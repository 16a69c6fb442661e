"""What a message in ``campaign.deadletter`` says about itself, and which ones an operator picks.

Everything here is read from a message that may be anything: a valid event the worker gave up
on, a body that never was one, headers of any type. Nothing is trusted; every field shown is
bounded.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from shared.events import CampaignCreated
from shared.messaging import ATTEMPT_HEADER, ERROR_MESSAGE_HEADER, ERROR_TYPE_HEADER

_FIELD_LIMIT = 200
_MESSAGE_LIMIT = 1000


def _text(value: Any, limit: int = _FIELD_LIMIT) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    return str(value)[:limit]


def _count(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of the dead-letter queue, as the ``deadletters`` tool shows it."""

    message_id: str | None
    event: CampaignCreated | None  # None: the body is not a valid event (poison)
    tenant_id: str | None
    campaign_id: str | None
    attempts: int | None
    error_type: str | None
    error_message: str | None
    died_at: datetime | None
    reason: str | None  # the broker's: expired (the worker's), delivery_limit, rejected …

    @classmethod
    def read(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers = message.headers
        event: CampaignCreated | None
        try:
            event = CampaignCreated.model_validate_json(message.body)
        except ValidationError:
            event = None
        tenant_id, campaign_id = _claimed_ids(message.body) if event is None else (None, None)
        deaths = headers.get("x-death")
        last_death: dict[str, Any] = (
            deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        )
        died_at = last_death.get("time")
        reason = _text(last_death.get("reason") or headers.get("x-first-death-reason"))
        return cls(
            message_id=_text(message.message_id),
            event=event,
            tenant_id=event.tenant_id if event else tenant_id,
            campaign_id=str(event.campaign_id) if event else campaign_id,
            attempts=_count(headers.get(ATTEMPT_HEADER)),
            # A message the broker dead-lettered by itself (past the delivery limit) carries
            # no error of the worker's: its reason stands for one.
            error_type=_text(headers.get(ERROR_TYPE_HEADER)) or reason,
            error_message=_text(headers.get(ERROR_MESSAGE_HEADER), _MESSAGE_LIMIT),
            died_at=died_at if isinstance(died_at, datetime) else message.timestamp,
            reason=reason,
        )

    @property
    def event_id(self) -> str | None:
        return str(self.event.event_id) if self.event else None

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "message_id": self.message_id,
            "valid_event": self.event is not None,
            "tenant_id": self.tenant_id,
            "campaign_id": self.campaign_id,
            "attempts": self.attempts,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "died_at": self.died_at.isoformat() if self.died_at else None,
            "reason": self.reason,
        }


def _claimed_ids(body: bytes) -> tuple[str | None, str | None]:
    """The tenant and campaign a body that is not a valid event says it is about, if any."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    return _text(document.get("tenant_id")), _text(document.get("campaign_id"))


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on: all filters given must match."""

    tenant_id: str | None = None
    error_type: str | None = None
    event_ids: frozenset[uuid.UUID] = field(default_factory=frozenset)

    @property
    def narrowed(self) -> bool:
        return bool(self.tenant_id or self.error_type or self.event_ids)

    def matches(self, letter: DeadLetter) -> bool:
        if self.tenant_id is not None and letter.tenant_id != self.tenant_id:
            return False
        if self.error_type is not None and letter.error_type != self.error_type:
            return False
        return not self.event_ids or (
            letter.event is not None and letter.event.event_id in self.event_ids
        )
