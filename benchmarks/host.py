"""What a round trip between two processes costs on this machine, measured at the start of
every run: every campaign crosses processes several times (client and service, service and
PostgreSQL, service and RabbitMQ, RabbitMQ and worker, worker and PostgreSQL), so this is the
unit the other figures are made of, and it differs between machines far more than their CPU
models suggest. Results from two machines compare only alongside these rows.

- two processes passing one byte back and forth over a socket pair, blocking calls, no Python
  event loop: the kernel's and the hypervisor's share;
- ``SELECT 1`` on one asyncpg connection, back to back and then one every 2 ms (as requests
  arrive at a moderate rate, each waking processes that had gone idle): what a statement costs
  the client (this process's thread) and the server (its backend process), beyond its SQL.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import asyncpg

from benchmarks.harness import Bench, CpuMeter

_ECHO = (
    "import socket, sys\n"
    "s = socket.socket(fileno=int(sys.argv[1]))\n"
    "while (data := s.recv(64)):\n"
    "    s.sendall(data)\n"
)


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _row(way: str, count: int, wall: float, client: float, server: float) -> dict[str, Any]:
    return {
        "round trip": way,
        "count": count,
        "wall µs": round(1e6 * wall / count, 1),
        "client CPU µs": round(1e6 * client / count, 1),
        "server CPU µs": round(1e6 * server / count, 1),
    }


def socket_pair(count: int = 20_000) -> dict[str, Any]:
    mine, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    try:
        mine.sendall(b"x")  # the child is up and has answered once
        mine.recv(64)
        meter = CpuMeter({"server": lambda: [child.pid]})
        meter.start()
        cpu, started = _thread_cpu(), time.perf_counter()
        for _ in range(count):
            mine.sendall(b"x")
            mine.recv(64)
        wall, client = time.perf_counter() - started, _thread_cpu() - cpu
        spent, _ = meter.stop()
    finally:
        mine.close()
        child.wait(10)
    return _row("socket pair, blocking (two processes)", count, wall, client, spent["server"])


async def select_one(bench: Bench, count: int, pause: float) -> dict[str, Any]:
    connection = await asyncpg.connect(bench.dsn)
    try:
        backend: int = await connection.fetchval("SELECT pg_backend_pid()")
        meter = CpuMeter({"server": lambda: [backend]})
        meter.start()
        cpu, started, busy = _thread_cpu(), time.perf_counter(), 0.0
        for _ in range(count):
            if pause:
                await asyncio.sleep(pause)
            sent = time.perf_counter()
            await connection.fetchval("SELECT 1")
            busy += time.perf_counter() - sent
        client = _thread_cpu() - cpu
        if pause:  # the sleeps' own cost, measured alone, is not the statement's
            client -= await _sleeping_cpu(count, pause)
        else:
            busy = time.perf_counter() - started
        spent, _ = meter.stop()
    finally:
        await connection.close()
    how = f"one every {pause * 1000:g} ms" if pause else "back to back"
    return _row(f"asyncpg SELECT 1, {how}", count, busy, client, spent["server"])


async def _sleeping_cpu(count: int, pause: float) -> float:
    cpu = _thread_cpu()
    for _ in range(count):
        await asyncio.sleep(pause)
    return _thread_cpu() - cpu


async def run(bench: Bench) -> dict[str, Any]:
    rows = [
        # Blocking calls, so on a thread of their own (whose CPU is the client's).
        await asyncio.to_thread(socket_pair),
        await select_one(bench, 5_000, pause=0),
        await select_one(bench, 1_000, pause=0.002),
    ]
    return {"table": rows}
