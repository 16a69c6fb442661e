from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base
from shared.tenancy import TENANT_ID_MAX_LENGTH


class OutboxMessage(Base):
    """An event committed with the change that caused it, waiting to be published.

    The relay deletes the row once the broker has confirmed the message; until then it stays,
    whatever happens to the broker or to the process.
    """

    __tablename__ = "outbox"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)  # the event id = AMQP message_id
    tenant_id: Mapped[str] = mapped_column(String(TENANT_ID_MAX_LENGTH))
    exchange: Mapped[str] = mapped_column(String(255))
    routing_key: Mapped[str] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # Headers to publish with, the W3C trace context of the request that wrote the row among them.
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    # When the relay may try again after a failed publish.
    available_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
