"""The tables, in one place because one database serves every process.

The services and the worker share this schema (the worker writes the job logs that
campaign_service reads), so the mapped classes live in ``shared`` next to the migration history
that creates them. Domain code imports them from here; queries stay in each domain's repository.
"""

from shared.models.accounts import Invitation, LoginThrottle, RefreshToken, Role, Tenant
from shared.models.campaigns import Campaign, CampaignJobLog, JobStatus
from shared.models.outbox import OutboxMessage
from shared.models.users import User

__all__ = [
    "Campaign",
    "CampaignJobLog",
    "Invitation",
    "JobStatus",
    "LoginThrottle",
    "OutboxMessage",
    "RefreshToken",
    "Role",
    "Tenant",
    "User",
]
