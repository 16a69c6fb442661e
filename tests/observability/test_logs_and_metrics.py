"""JSON logs and Prometheus metrics of the running processes, as an operator reads them."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import httpx

from tests.observability.conftest import Stack
from tests.support.campaigns import create_campaign, wait_for_jobs
from tests.support.metrics import parse, promtool_check
from tests.support.users import PASSWORD, bearer, invite

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def sample(text: str, name: str, **labels: str) -> float:
    return parse(text).get((name, frozenset(labels.items())), 0.0)


class TestLogs:
    async def test_every_line_of_every_process_is_a_json_object(
        self, stack: Stack, tenant: str
    ) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            campaign = await create_campaign(client, headers, "logged")
            await wait_for_jobs(client, headers, campaign["id"])

        for process in stack.processes:
            lines = process.log_path.read_text().splitlines()
            assert lines, process.log_path
            for line in lines:
                record = json.loads(line)  # fails on any line that is not JSON
                assert {"timestamp", "level", "service", "message"} <= set(record), line

    async def test_every_start_command_froze_its_start_up_heap(self, stack: Stack) -> None:
        # What start-up made is out of the collector's reach (shared/heap.py): far more objects
        # than a process makes per request, or full collections would walk them again.
        for process in stack.processes:
            [frozen] = process.logged("start-up heap frozen")
            assert frozen["objects"] > 50_000, (process.log_path, frozen)

    async def test_uvicorn_access_lines_are_json_with_request_fields(
        self, stack: Stack, tenant: str
    ) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            await client.get("/campaigns", headers=headers)

        access = [
            line
            for line in stack.campaigns.log_lines()
            if line.get("logger") == "uvicorn.access" and line.get("path") == "/campaigns"
        ]
        assert access
        assert access[-1]["method"] == "GET"
        assert access[-1]["status_code"] == 200
        assert access[-1]["service"] == "campaign_service"

    async def test_worker_lines_carry_the_trace_and_the_events_ids(
        self, stack: Stack, tenant: str
    ) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            campaign = await create_campaign(client, headers, "correlated [fail:1]")
            jobs = await wait_for_jobs(client, headers, campaign["id"])

        lines = [
            line for line in stack.worker.log_lines() if line.get("campaign_id") == campaign["id"]
        ]
        messages = [line["message"] for line in lines]
        assert "campaign failed; retrying" in messages
        assert "campaign executed" in messages
        for line in lines:
            assert line["service"] == "worker"
            assert line["tenant_id"] == tenant
            assert line["event_id"] == jobs[0]["event_id"]
            assert line["trace_id"] == jobs[0]["trace_id"]
            assert HEX32.match(line["trace_id"])
            assert HEX16.match(line["span_id"])

    async def test_request_lines_carry_the_request_trace(self, stack: Stack, tenant: str) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            campaign = await create_campaign(client, headers, "request line")
            [job] = await wait_for_jobs(client, headers, campaign["id"])

        [created] = [
            line
            for line in stack.campaigns.log_lines()
            if line["message"] == "campaign created" and line.get("campaign_id") == campaign["id"]
        ]
        assert created["trace_id"] == job["trace_id"]
        assert HEX16.match(created["span_id"])

    async def test_no_password_or_token_is_ever_logged(self, stack: Stack) -> None:
        tenant = f"secret-{uuid.uuid4().hex[:8]}"
        secret = f"{PASSWORD} {uuid.uuid4().hex}"
        credentials = {"tenant_id": tenant, "email": "ada@example.com", "password": secret}
        async with httpx.AsyncClient(base_url=stack.user.url) as client:
            assert (await client.post("/register", json=credentials)).status_code == 201
            login = await client.post("/login", json=credentials)
            wrong = await client.post("/login", json={**credentials, "password": secret + "x"})
            short = await client.post("/register", json={**credentials, "password": "tiny-pw"})
        token = login.json()["access_token"]
        await asyncio.sleep(0.2)  # let the processes flush their last lines

        assert (login.status_code, wrong.status_code, short.status_code) == (200, 401, 422)
        logs = "".join(process.log_path.read_text() for process in stack.processes)
        assert tenant in logs  # the login was logged (at DEBUG) ...
        assert secret not in logs  # ... without its password,
        assert "tiny-pw" not in logs
        assert token not in logs  # its token,
        assert token.split(".")[2] not in logs  # or even the token's signature.


class TestMetrics:
    async def test_every_endpoint_passes_promtool(self, stack: Stack) -> None:
        for process in stack.processes:
            text = await scrape(process.url)

            assert await promtool_check(text) == "", process.url

    async def test_http_red_metrics_by_route_template(self, stack: Stack, tenant: str) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            before = await scrape(stack.campaigns.url)
            campaign = await create_campaign(client, headers, "measured")
            await client.get(f"/campaigns/{campaign['id']}", headers=headers)
            await client.get(f"/campaigns/{uuid.uuid4()}", headers=headers)
            await client.get("/no/such/path")
            after = await scrape(stack.campaigns.url)

        def delta(**labels: str) -> float:
            name = "http_server_request_duration_seconds_count"
            return sample(after, name, **labels) - sample(before, name, **labels)

        assert delta(method="POST", route="/campaigns", status_code="201") == 1
        assert delta(method="GET", route="/campaigns/{campaign_id}", status_code="200") == 1
        assert delta(method="GET", route="/campaigns/{campaign_id}", status_code="404") == 1
        assert delta(method="GET", route="unmatched", status_code="404") == 1
        assert str(campaign["id"]) not in after  # never a raw path or an id in a label
        assert tenant not in after

    async def test_user_service_counts_registrations_and_logins(self, stack: Stack) -> None:
        tenant = f"m-{uuid.uuid4().hex[:8]}"
        credentials = {"tenant_id": tenant, "email": "ada@example.com", "password": PASSWORD}
        before = await scrape(stack.user.url)
        bob = {**credentials, "email": "bob@example.com"}
        async with httpx.AsyncClient(base_url=stack.user.url) as client:
            await client.post("/register", json=credentials)
            await client.post("/register", json=bob)  # no invitation into an existing tenant
            login = await client.post("/login", json=credentials)
            await client.post("/login", json={**credentials, "password": "wrong password"})
            owner = bearer(login.json()["access_token"])
            first, second = [await invite(client, owner, bob["email"]) for _ in "12"]
            await client.post("/register", json={**bob, "invitation": first["token"]})
            await client.post("/register", json={**bob, "invitation": second["token"]})
        after = await scrape(stack.user.url)

        def delta(name: str, outcome: str) -> float:
            return sample(after, name, outcome=outcome) - sample(before, name, outcome=outcome)

        assert delta("user_registrations_total", "created") == 2
        assert delta("user_registrations_total", "forbidden") == 1
        assert delta("user_registrations_total", "conflict") == 1
        assert delta("user_logins_total", "success") == 1
        assert delta("user_logins_total", "failure") == 1

    async def test_campaign_service_counts_campaigns_and_the_outbox(
        self, stack: Stack, tenant: str
    ) -> None:
        headers = await stack.login(tenant)
        before = await scrape(stack.campaigns.url)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            await stack.node.stop_app()
            try:
                await create_campaign(client, headers, "waits in the outbox")
                await asyncio.sleep(0.5)  # the backlog ages while the broker is away
                during = await scrape(stack.campaigns.url)
            finally:
                await stack.node.start_app()

        assert (
            sample(during, "campaigns_created_total") - sample(before, "campaigns_created_total")
            == 1
        )
        assert sample(during, "outbox_pending_messages") >= 1
        assert sample(during, "outbox_oldest_pending_age_seconds") >= 0.5

    async def test_worker_metrics(self, stack: Stack, tenant: str) -> None:
        headers = await stack.login(tenant)
        before = await scrape(stack.worker.url)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            campaign = await create_campaign(client, headers, "flaky [fail:1]")
            await wait_for_jobs(client, headers, campaign["id"], timeout=40)
        after = await scrape(stack.worker.url)

        def delta(name: str, **labels: str) -> float:
            return sample(after, name, **labels) - sample(before, name, **labels)

        assert delta("worker_messages_total", outcome="retry") >= 1
        assert delta("worker_messages_total", outcome="success") >= 1
        assert delta("worker_message_processing_duration_seconds_count") >= 2
        assert sample(after, "worker_messages_in_flight") == 0
        assert ("worker_dead_lettered_messages_total", frozenset()) in parse(after)
