from __future__ import annotations

from typing import Any

from joserfc.jwk import OKPKey
from pydantic import SecretStr

from shared.settings import Environment
from user_service.settings import UserServiceSettings

USER_SERVICE_URL = "http://user-service"
JWKS_URL = f"{USER_SERVICE_URL}/.well-known/jwks.json"
PASSWORD = "correct horse battery staple"


def new_private_key_pem() -> str:
    return OKPKey.generate_key("Ed25519").as_pem(private=True).decode()


def make_user_settings(database_url: str, **overrides: Any) -> UserServiceSettings:
    values: dict[str, Any] = {
        "environment": Environment.TEST,
        "database_url": database_url,
        "jwt_private_key": SecretStr(new_private_key_pem()),
        **overrides,
    }
    return UserServiceSettings(_env_file=None, **values)
