"""user_service: tenants and their accounts (registration, invitations, members and roles),
login with throttling, sessions (refresh tokens, logout) and the JWKS. Every route the service
has is mounted here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from shared.db import create_engine, create_sessionmaker, ping
from shared.logs import configure_logging
from shared.telemetry import NO_NATIVE_TELEMETRY
from shared.tokens import StaticKeys, TokenVerifier
from shared.web import ReadinessCheck, health_router, install_common
from user_service import housekeeping
from user_service.members.router import router as members_router
from user_service.metrics import UserMetrics
from user_service.sessions.router import router as sessions_router
from user_service.settings import UserServiceSettings
from user_service.tokens.issuer import TokenIssuer
from user_service.tokens.keys import load_signing_keys
from user_service.tokens.router import router as tokens_router
from user_service.users.passwords import PasswordHasher
from user_service.users.router import router as users_router
from user_service.users.throttle import LoginThrottle, ThrottlePolicy


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
        metrics = UserMetrics(registry)
        app.state.settings = settings
        app.state.metrics = metrics
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
        # The service verifies its own tokens (invitations and members are Bearer endpoints).
        app.state.token_verifier = TokenVerifier(
            keys=StaticKeys(keys.verification_keys()),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        throttle = LoginThrottle(engine, _throttle_policy(settings), metrics)
        app.state.login_throttle = throttle
        work = housekeeping.chores(
            throttle=throttle,
            sessionmaker=app.state.sessionmaker,
            forget_login_counts_after=timedelta(seconds=settings.login_throttle_forget_seconds),
            keep_expired_tokens=timedelta(seconds=settings.refresh_token_retention_seconds),
        )
        housekeeper = asyncio.create_task(
            housekeeping.run_every(settings.housekeeping_interval_seconds, work),
            name="housekeeping",
        )
        try:
            yield
        finally:
            housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeper
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
    app.include_router(sessions_router)
    app.include_router(members_router)
    app.include_router(tokens_router)
    app.include_router(health_router(readiness, timeout=settings.readiness_timeout_seconds))
    return app


def _throttle_policy(settings: UserServiceSettings) -> ThrottlePolicy:
    return ThrottlePolicy(
        max_failures=settings.login_max_failures,
        window=timedelta(seconds=settings.login_failure_window_seconds),
        base_seconds=settings.login_throttle_base_seconds,
        max_seconds=settings.login_throttle_max_seconds,
        address_max_failures=settings.login_address_max_failures,
        max_in_flight_per_address=settings.login_max_in_flight_per_address,
    )
