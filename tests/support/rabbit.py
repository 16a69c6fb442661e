"""RabbitMQ for tests: the management HTTP API (the view the UI shows), a vhost per use, and a
private broker node a test may stop and start."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx
from aio_pika.exceptions import ChannelNotFoundEntity
from faststream.rabbit import RabbitBroker

from shared.messaging import create_broker, declare_core

MANAGEMENT_URL = os.environ.get("TEST_RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")
AMQP_BASE = os.environ.get("TEST_RABBITMQ_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
CREDENTIALS = ("guest", "guest")


class RabbitAdmin:
    def __init__(self, base_url: str = MANAGEMENT_URL) -> None:
        self.http = httpx.AsyncClient(base_url=f"{base_url}/api", auth=CREDENTIALS, timeout=10)

    async def close(self) -> None:
        await self.http.aclose()

    async def create_vhost(self, name: str) -> None:
        (await self.http.put(f"/vhosts/{quote(name, safe='')}")).raise_for_status()
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        response = await self.http.put(
            f"/permissions/{quote(name, safe='')}/guest", json=permissions
        )
        response.raise_for_status()

    async def delete_vhost(self, name: str) -> None:
        response = await self.http.delete(f"/vhosts/{quote(name, safe='')}")
        if response.status_code != 404:
            response.raise_for_status()

    async def _get(self, path: str) -> Any:
        response = await self.http.get(path)
        response.raise_for_status()
        return response.json()

    async def queues(self, vhost: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._get(f"/queues/{quote(vhost, safe='')}")
        return result

    async def queue(self, vhost: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._get(
            f"/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"
        )
        return result

    async def exchanges(self, vhost: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._get(f"/exchanges/{quote(vhost, safe='')}")
        return result

    async def bindings(self, vhost: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._get(f"/bindings/{quote(vhost, safe='')}")
        return result

    async def consumers(self, vhost: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._get(f"/consumers/{quote(vhost, safe='')}")
        return result

    async def peek(self, vhost: str, queue: str, count: int = 100) -> list[dict[str, Any]]:
        """Read messages without consuming them (they are requeued), as the UI's "Get"."""
        response = await self.http.post(
            f"/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}/get",
            json={"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"},
        )
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result


def vhost_url(vhost: str, base: str = AMQP_BASE) -> str:
    return f"{base}/{quote(vhost, safe='')}"


def new_vhost_name(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class PrivateRabbitNode:
    """A second RabbitMQ node of this test run's own, which tests may stop and start.

    It listens on ``port`` (AMQP only: no plugins) with its data in a temporary folder, and is
    removed at the end.
    """

    def __init__(
        self,
        *,
        port: int,
        dist_port: int,
        extra_config: str = "",
        name: str | None = None,
        advanced_config: str | None = None,
    ) -> None:
        self.port = port
        self.name = name or f"rabbit-test-{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"
        self._dir = Path(tempfile.mkdtemp(prefix="rabbit-node-"))
        for sub in ("mnesia", "log"):
            (self._dir / sub).mkdir()
        (self._dir / "enabled_plugins").write_text("[].\n")
        (self._dir / "rabbitmq.conf").write_text(
            f"{extra_config}\nlisteners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"
        )
        if advanced_config is not None:
            (self._dir / "advanced.config").write_text(advanced_config)
        shutil.chown(self._dir, "rabbitmq", "rabbitmq")
        for path in self._dir.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self._env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(self._dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self._dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self._dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self._dir / "rabbitmq"),
        }
        if advanced_config is not None:
            self._env["RABBITMQ_ADVANCED_CONFIG_FILE"] = str(self._dir / "advanced.config")

    @property
    def log_dir(self) -> Path:
        return self._dir / "log"

    async def _run(self, *args: str, timeout: float = 120) -> None:
        await self.output(*args, timeout=timeout)

    async def output(self, *args: str, timeout: float = 120) -> str:
        """Run a command (``rabbitmqctl -n NAME …``) in this node's environment; its stdout."""
        process = await asyncio.create_subprocess_exec(
            *args,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError(f"{' '.join(args)} did not finish in {timeout}s") from None
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {stderr.decode()[-2000:]}")
        return stdout.decode()

    async def start(self) -> None:
        await self._run("rabbitmq-server", "-detached")
        await self._await_startup()

    async def _await_startup(self, timeout: float = 120) -> None:
        # The node registers with epmd a moment after -detached returns: ping until it answers.
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self._run("rabbitmq-diagnostics", "-q", "-n", self.name, "ping")
                break
            except RuntimeError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        await self._run("rabbitmqctl", "-n", self.name, "await_startup", "--timeout", "120")

    async def stop(self) -> None:
        await self._run("rabbitmqctl", "-n", self.name, "stop")

    async def stop_app(self) -> None:
        """Stop the broker but keep the node (faster to bring back than a full restart)."""
        await self._run("rabbitmqctl", "-n", self.name, "stop_app")

    async def start_app(self) -> None:
        await self._run("rabbitmqctl", "-n", self.name, "start_app")
        await self._await_startup()

    async def remove(self) -> None:
        try:
            await self.stop()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


async def publish_raw(amqp_url: str, body: bytes, **properties: Any) -> None:
    """Publish as someone with the RabbitMQ UI or a script would: straight to the exchange."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("campaigns")
        await exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties),
            routing_key="campaign.created",
        )


@dataclass(frozen=True)
class QueueCounts:
    ready: int  # messages waiting for a consumer (not those delivered and unacknowledged)
    consumers: int


async def queue_counts(amqp_url: str, queue_name: str) -> QueueCounts | None:
    """The queue's counts now, as the broker answers a passive declare on a connection of its
    own (the management API's statistics lag by seconds); None while the queue does not
    exist."""
    async with await aio_pika.connect(amqp_url) as connection:
        try:
            queue = await (await connection.channel()).declare_queue(queue_name, passive=True)
        except ChannelNotFoundEntity:
            return None
    result = queue.declaration_result
    return QueueCounts(ready=result.message_count or 0, consumers=result.consumer_count or 0)


async def consumer_count(amqp_url: str, queue_name: str) -> int | None:
    counts = await queue_counts(amqp_url, queue_name)
    return None if counts is None else counts.consumers


async def take_all(amqp_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Consume every message waiting in a queue (when nothing else consumes it)."""
    messages = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
    return messages


@asynccontextmanager
async def connected_broker(amqp_url: str, **options: Any) -> AsyncIterator[RabbitBroker]:
    """A broker of the platform's (``create_broker(**options)``), connected, with the core
    topology declared; stopped on the way out."""
    broker = create_broker(amqp_url, app_id="test", **options)
    await broker.connect()
    await declare_core(broker)
    try:
        yield broker
    finally:
        await broker.stop()
