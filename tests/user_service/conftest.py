from __future__ import annotations

from typing import Any

import pytest

from tests.support.apps import running
from tests.support.users import USER_SERVICE_URL, make_user_settings
from user_service.app import create_app


@pytest.fixture
def start_user_service(database_url: str) -> Any:
    """Start another user_service with settings of the test's choosing."""

    def start(**overrides: Any) -> Any:
        settings = make_user_settings(overrides.pop("database_url", database_url), **overrides)
        return running(create_app(settings), USER_SERVICE_URL)

    return start
