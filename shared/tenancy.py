"""What a tenant id is, for every service: one pattern, one length, one type."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

TENANT_ID_MAX_LENGTH = 63
# Lower-case letters, digits and inner hyphens, 1 to 63 characters (a DNS label's shape), so a
# tenant id is safe in a URL, a log line or a host name.
TENANT_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"

TenantId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=TENANT_ID_MAX_LENGTH, pattern=TENANT_ID_PATTERN),
]


class TenantOwned:
    """Mixin for tables whose rows belong to one tenant (index it in the table's own args)."""

    tenant_id: Mapped[str] = mapped_column(String(TENANT_ID_MAX_LENGTH))
