from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from campaign_service.settings import CampaignServiceSettings
from gateway.settings import GatewaySettings
from shared.settings import DEV_DATABASE_URL, BrokerSettings, CommonSettings, Environment
from tests.support.users import new_private_key_pem
from user_service.settings import UserServiceSettings
from worker.settings import WorkerSettings

DATABASE = {"database_url": "postgresql+asyncpg://app:s3cret@db:5432/campaigns"}
BROKER = {"rabbitmq_url": "amqp://app:s3cret@rabbitmq:5672/"}


def settings(cls: type[CommonSettings], **values: Any) -> CommonSettings:
    return cls(_env_file=None, environment=Environment.PRODUCTION, **values)


@pytest.mark.usefixtures("clean_env")
class TestProductionRefusesDevelopmentDefaults:
    def test_development_defaults_are_fine_outside_production(self) -> None:
        for cls in (UserServiceSettings, CampaignServiceSettings, WorkerSettings, GatewaySettings):
            assert not cls(_env_file=None).is_production

    @pytest.mark.parametrize(
        ("cls", "values", "complaint"),
        [
            (UserServiceSettings, {"database_url": DEV_DATABASE_URL}, "DATABASE_URL"),
            (
                UserServiceSettings,
                {"database_url": "postgresql+asyncpg://app@db:5432/campaigns"},
                "DATABASE_URL",
            ),
            (UserServiceSettings, {**DATABASE, "jwt_private_key": None}, "JWT_PRIVATE_KEY"),
            (CampaignServiceSettings, {**DATABASE}, "RABBITMQ_URL"),
            (
                CampaignServiceSettings,
                {**DATABASE, "rabbitmq_url": "amqp://guest:other@rabbitmq:5672/"},
                "RABBITMQ_URL",
            ),
            (WorkerSettings, {**BROKER}, "DATABASE_URL"),
            (WorkerSettings, {**DATABASE}, "RABBITMQ_URL"),
            # Compose's fallback and .env.example's placeholder, left unchanged.
            (
                WorkerSettings,
                {**BROKER, "database_url": "postgresql+asyncpg://campaigns:change-me@db/campaigns"},
                "DATABASE_URL",
            ),
            (
                WorkerSettings,
                {
                    **DATABASE,
                    "rabbitmq_url": "amqp://campaigns:campaigns-dev-password@rabbitmq:5672/",
                },
                "RABBITMQ_URL",
            ),
            (
                WorkerSettings,
                {**DATABASE, "rabbitmq_url": "amqp://app@rabbitmq:5672/"},
                "RABBITMQ_URL",
            ),
            # Percent-encoded, as the drivers decode them.
            (
                WorkerSettings,
                {
                    **BROKER,
                    "database_url": "postgresql+asyncpg://campaigns:campaigns%2Ddev%2Dpassword@db/c",
                },
                "DATABASE_URL",
            ),
            (
                WorkerSettings,
                {**DATABASE, "rabbitmq_url": "amqp://%67uest:%67uest@rabbitmq:5672/"},
                "RABBITMQ_URL",
            ),
            (
                WorkerSettings,
                {**DATABASE, "rabbitmq_url": "amqp://%67uest:strong-and-new@rabbitmq:5672/"},
                "RABBITMQ_URL",
            ),
        ],
    )
    def test_each_default_is_refused(
        self, cls: type[CommonSettings], values: dict[str, Any], complaint: str
    ) -> None:
        if cls is UserServiceSettings:
            values = {"jwt_private_key": new_private_key_pem(), **values}

        with pytest.raises(ValidationError, match=complaint):
            settings(cls, **values)

    def test_complete_production_settings_are_accepted(self) -> None:
        accepted = [
            settings(UserServiceSettings, **DATABASE, jwt_private_key=new_private_key_pem()),
            settings(CampaignServiceSettings, **DATABASE, **BROKER),
            settings(WorkerSettings, **DATABASE, **BROKER),
            settings(GatewaySettings),  # the gateway needs neither database nor broker
        ]

        assert all(each.is_production for each in accepted)

    def test_read_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ENVIRONMENT", "production")
        monkeypatch.setenv("RABBITMQ_URL", "amqp://guest:guest@rabbitmq:5672/")

        with pytest.raises(ValidationError, match="RABBITMQ_URL"):
            BrokerSettings(_env_file=None)


def test_a_session_maximum_shorter_than_a_refresh_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="REFRESH_SESSION_MAX_SECONDS"):
        UserServiceSettings(
            _env_file=None, refresh_token_ttl_seconds=3600, refresh_session_max_seconds=600
        )
