"""Keyset pagination over (created_at, id), newest first: stable while rows are added."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi.exceptions import RequestValidationError


@dataclass(frozen=True, slots=True)
class Cursor:
    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, value: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            created_at, id_ = raw.split("|")
            moment = datetime.fromisoformat(created_at)
            if moment.tzinfo is None:
                raise ValueError("a cursor's time carries its offset")
            # In UTC, as the database compares it: a crafted time at the edge of the calendar
            # (9999-12-31T23:00-05:00) fails here, not in the query.
            return cls(created_at=moment.astimezone(UTC), id=uuid.UUID(id_))
        except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
            raise RequestValidationError(
                [{"loc": ("query", "cursor"), "msg": "Invalid cursor", "type": "value_error"}]
            ) from exc
