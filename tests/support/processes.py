"""Services as separate processes, started the way users start them, for tests that signal or
kill them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support.polling import eventually

ROOT = Path(__file__).resolve().parents[2]
_OWN_PREFIXES = ("JWT_", "DATABASE_", "RABBITMQ_", "WORKER_", "OUTBOX_", "OTEL_")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        self.args = args
        self.port = port
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
        self.env = {**base, "ENVIRONMENT": "test", "PYTHONUNBUFFERED": "1", **env}
        self.process: asyncio.subprocess.Process | None = None

    @classmethod
    def worker(cls, env: dict[str, str], log_path: Path) -> ServiceProcess:
        port = free_port()
        return cls(
            [sys.executable, "-m", "worker"],
            {**env, "WORKER_METRICS_PORT": str(port)},
            log_path,
            port,
        )

    @classmethod
    def web(cls, app: str, env: dict[str, str], log_path: Path) -> ServiceProcess:
        """An HTTP service as its container runs it: ``uvicorn <app>``."""
        port = free_port()
        args = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        return cls(args, env, log_path, port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.args, cwd=ROOT, env=self.env, stdout=log, stderr=log
        )
        log.close()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:

            async def ready() -> bool:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise AssertionError(f"exited early:\n{self.log_path.read_text()[-3000:]}")
                try:
                    return (await client.get("/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(ready, timeout=timeout, interval=0.1, what="process ready")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("message") == message]
