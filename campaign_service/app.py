"""campaign_service: campaigns, their job logs, and the outbox that turns each new campaign into
a ``campaign.created`` event. Every route the service has is mounted here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
from fastapi import FastAPI
from joserfc.jwk import KeySet
from prometheus_client import CollectorRegistry

from campaign_service.campaigns.router import router as campaigns_router
from campaign_service.metrics import CampaignMetrics
from campaign_service.outbox.relay import OutboxRelay
from campaign_service.settings import CampaignServiceSettings
from shared.db import create_engine, create_sessionmaker, ping
from shared.logs import configure_logging
from shared.messaging import BrokerStartup, create_broker, declare_core
from shared.telemetry import NO_NATIVE_TELEMETRY, broker_telemetry, configure_tracing
from shared.tokens import (
    JWKSKeys,
    KeyProvider,
    StaticKeys,
    TokenVerifier,
    public_keys_from_pem,
)
from shared.web import ReadinessCheck, health_router, install_common


def create_app(
    settings: CampaignServiceSettings | None = None,
    *,
    jwks_client: httpx.AsyncClient | None = None,
) -> FastAPI:
    """``jwks_client`` lets a caller (a test) choose how the JWKS is reached."""
    settings = settings or CampaignServiceSettings()
    configure_logging(settings)
    registry = CollectorRegistry()
    metrics = CampaignMetrics(registry)
    tracing = configure_tracing(settings.service_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as cleanup:
            # Callbacks run in reverse order, each even when an earlier one failed.
            http = jwks_client or httpx.AsyncClient(timeout=5.0)
            if jwks_client is None:
                cleanup.push_async_callback(http.aclose)
            token_keys = _token_keys(settings, http)  # a key that cannot be used stops the start
            engine = create_engine(settings, application_name=settings.service_name)
            cleanup.push_async_callback(engine.dispose)
            broker, *publishers = [
                create_broker(
                    settings.rabbitmq_url,
                    app_id=settings.service_name,
                    reconnect_seconds=settings.rabbitmq_reconnect_seconds,
                    middlewares=[broker_telemetry(tracing)],
                )
                for _ in range(settings.outbox_publish_connections)
            ]
            for each in (broker, *publishers):
                cleanup.push_async_callback(each.stop)
            relay = OutboxRelay(
                engine=engine,
                broker=broker,
                publishers=publishers,
                settings=settings,
                metrics=metrics,
            )
            cleanup.push_async_callback(relay.stop)

            async def set_up_broker() -> None:
                await declare_core(broker)
                for publisher in publishers:
                    await publisher.connect()
                relay.start()

            # The service answers (and takes campaigns into the outbox) before the broker does.
            startup = BrokerStartup(broker, set_up_broker, what=settings.service_name)
            startup.start()
            cleanup.push_async_callback(startup.stop)

            app.state.settings = settings
            app.state.metrics = metrics
            app.state.engine = engine
            app.state.broker = broker
            app.state.broker_startup = startup
            app.state.relay = relay
            # Sessions of requests hand the relay the outbox rows they commit.
            app.state.sessionmaker = create_sessionmaker(
                engine, sync_session_class=relay.session_class()
            )
            app.state.token_verifier = TokenVerifier(
                keys=token_keys,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                leeway_seconds=settings.jwt_leeway_seconds,
            )
            yield

    app = FastAPI(
        title="campaign_service",
        summary="Campaigns of a tenant; each new campaign is executed by the worker.",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,
    )

    async def refresh_outbox() -> None:
        await metrics.refresh_outbox(app.state.sessionmaker)

    async def refresh_queues() -> None:
        if app.state.broker_startup.done:  # before that the connection is the startup's to make
            async with asyncio.timeout(settings.readiness_timeout_seconds):
                await metrics.refresh_queues(app.state.broker)

    install_common(
        app, settings=settings, registry=registry, refreshers=[refresh_outbox, refresh_queues]
    )

    def readiness() -> dict[str, ReadinessCheck]:
        return {
            "database": partial(ping, app.state.engine),
            "broker": app.state.broker_startup.ready,
        }

    app.include_router(campaigns_router)
    app.include_router(health_router(readiness, timeout=settings.readiness_timeout_seconds))
    return app


def _token_keys(settings: CampaignServiceSettings, client: httpx.AsyncClient) -> KeyProvider:
    if settings.jwt_public_keys:
        keys = public_keys_from_pem(settings.jwt_public_keys, setting="JWT_PUBLIC_KEYS")
        return StaticKeys(KeySet(keys))
    return JWKSKeys(settings.jwt_jwks_url, client, ttl_seconds=settings.jwt_jwks_cache_seconds)
