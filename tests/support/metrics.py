"""Read a service's /metrics as Prometheus would."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(app: FastAPI) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://metrics"
    ) as client:
        response = await client.get("/metrics")
        response.raise_for_status()
        return parse(response.text)


async def value(app: FastAPI, name: str, **labels: str) -> float:
    return (await scrape(app)).get((name, frozenset(labels.items())), 0.0)


async def outcomes(app: FastAPI) -> dict[str, float]:
    """The worker's ``worker_messages_total`` by outcome."""
    return {
        dict(labels)["outcome"]: count
        for (name, labels), count in (await scrape(app)).items()
        if name == "worker_messages_total"
    }


async def promtool_check(text: str) -> str:
    """What ``promtool check metrics`` says of an exposition ("" when it has nothing to say);
    fails the test when promtool refuses it."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test installs Debian's prometheus package"
    checked = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await checked.communicate(text.encode())
    assert checked.returncode == 0, output.decode()
    return output.decode().strip()
