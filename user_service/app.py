"""user_service: registration, login and the JWKS. Every route the service has is mounted here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from shared.db import create_engine, create_sessionmaker, ping
from shared.logs import configure_logging
from shared.telemetry import NO_NATIVE_TELEMETRY
from shared.web import ReadinessCheck, health_router, install_common
from user_service.metrics import UserMetrics
from user_service.settings import UserServiceSettings
from user_service.tokens.issuer import TokenIssuer
from user_service.tokens.keys import load_signing_keys
from user_service.tokens.router import router as tokens_router
from user_service.users.passwords import PasswordHasher
from user_service.users.router import router as users_router


def create_app(settings: UserServiceSettings | None = None) -> FastAPI:
    settings = settings or UserServiceSettings()
    configure_logging(settings)
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = load_signing_keys(settings)
        engine = create_engine(settings, application_name=settings.service_name)
        passwords = PasswordHasher(
            threads=settings.password_hash_threads,
            queue_limit=settings.password_hash_queue_limit,
            memory_kib=settings.password_argon2_memory_kib,
            time_cost=settings.password_argon2_time_cost,
            parallelism=settings.password_argon2_parallelism,
        )
        app.state.settings = settings
        app.state.metrics = UserMetrics(registry)
        app.state.engine = engine
        app.state.sessionmaker = create_sessionmaker(engine)
        app.state.passwords = passwords
        app.state.signing_keys = keys
        app.state.token_issuer = TokenIssuer(
            keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl_seconds=settings.jwt_access_token_ttl_seconds,
        )
        try:
            yield
        finally:
            passwords.close()
            await engine.dispose()

    app = FastAPI(
        title="user_service",
        summary="Tenant-scoped registration and login; issues the platform's access tokens.",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,
    )
    install_common(app, settings=settings, registry=registry)

    def readiness() -> dict[str, ReadinessCheck]:
        return {"database": partial(ping, app.state.engine)}

    app.include_router(users_router)
    app.include_router(tokens_router)
    app.include_router(health_router(readiness, timeout=settings.readiness_timeout_seconds))
    return app
