"""The edge as users run it: nginx from nginx/edge.conf (rendered by scripts/lib.sh) in front of
a gateway process, and raw-socket helpers for clients that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.processes import ROOT, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def server_options(concurrency: int = 1000) -> list[str]:
    """The uvicorn options every HTTP process runs with (scripts/run-local, docker/start)."""
    return [
        "--no-server-header",
        "--http",
        "h11",
        "--h11-max-incomplete-event-size",
        "16384",
        "--limit-concurrency",
        str(concurrency),
    ]


def render_edge_conf(
    listen: str, upstream: str, run_dir: Path, temp_dir: Path, **limits: str
) -> Path:
    """nginx/edge.conf filled by the same shell function scripts/run-local uses."""
    env = {**os.environ, **{f"EDGE_{name.upper()}": value for name, value in limits.items()}}
    script = 'source scripts/lib.sh && render_edge_conf "$@"'
    subprocess.run(
        ["bash", "-c", script, "render", listen, upstream, str(run_dir), str(temp_dir)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    return run_dir / "edge.conf"


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Nginx:
    def __init__(self, upstream_port: int, run_dir: Path, **limits: str) -> None:
        self.port = free_port()
        self.run_dir = run_dir
        self.log_path = run_dir / "edge.log"
        # Request bodies: in /tmp, where nginx's workers (nobody, under a root master) reach.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="campaign-edge-"))
        self.temp_dir.chmod(0o755)
        self.config = render_edge_conf(
            f"127.0.0.1:{self.port}",
            f"127.0.0.1:{upstream_port}",
            run_dir,
            self.temp_dir,
            **limits,
        )
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            NGINX, "-c", str(self.config), "-e", "stderr", stdout=log, stderr=log
        )
        log.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"nginx exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise AssertionError("nginx did not listen")
            await asyncio.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid, *children(self.process.pid)]

    async def stop(self) -> None:
        try:
            await self._stop()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    async def _stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        workers = children(self.process.pid)
        self.process.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def access_log(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.lines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("service") == "edge":
                    entries.append(entry)
        return entries


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed);
    fails if it is still open after ``timeout``."""
    received = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                return received
            if not chunk:
                return received
            received += chunk


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, bytes]:
    """One response with a Content-Length: its status and body; the connection stays open."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length:")
        )
        return int(lines[0].split()[1]), await reader.readexactly(length)


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1."):
        return None
    return int(response.split(b" ", 2)[1])
