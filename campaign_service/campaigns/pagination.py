"""Keyset pagination over (created_at, id), newest first: stable while rows are added."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import datetime

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
            cursor = cls(created_at=datetime.fromisoformat(created_at), id=uuid.UUID(id_))
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise RequestValidationError(
                [{"loc": ("query", "cursor"), "msg": "Invalid cursor", "type": "value_error"}]
            ) from exc
        if cursor.created_at.tzinfo is None:
            raise RequestValidationError(
                [{"loc": ("query", "cursor"), "msg": "Invalid cursor", "type": "value_error"}]
            )
        return cursor
