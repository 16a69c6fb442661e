"""The files users deploy with: docker-compose.yml, the Dockerfile, the locks, the Makefile and
the Prometheus configs, checked against the compose schema and against the code's settings."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml

from campaign_service.settings import CampaignServiceSettings
from gateway.settings import GatewaySettings
from shared.settings import CommonSettings, DatabaseSettings
from tests.deployment.test_package import PACKAGES
from tests.support.processes import ROOT
from user_service.settings import UserServiceSettings
from worker.settings import WorkerSettings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
APPS: dict[str, type[CommonSettings]] = {
    "user_service": UserServiceSettings,
    "campaign_service": CampaignServiceSettings,
    "worker": WorkerSettings,
    "gateway": GatewaySettings,
    "migrate": DatabaseSettings,
}
PORTS = {"user_service": 8000, "campaign_service": 8001, "gateway": 8082, "worker": 9000}
# The public port: the edge (nginx, in front of the gateway).
EDGE_PORT = 8080
# Where Prometheus scrapes each part: the gateway's metrics are on its internal port.
METRICS_PORTS = {**PORTS, "gateway": 9080}
START_COMMANDS = {  # DESIGN.md: what the containers run
    "user_service": ["uvicorn", "user_service.main:app"],
    "campaign_service": ["uvicorn", "campaign_service.main:app"],
    "gateway": ["uvicorn", "gateway.main:app"],
    "worker": ["python", "-m", "worker"],
    "migrate": ["python", "-m", "shared.migrate"],
}


def venv_tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def env_names(service: dict[str, Any]) -> set[str]:
    return set(service.get("environment", {}))


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


class TestCompose:
    def test_valid_against_the_compose_specification(self) -> None:
        checked = subprocess.run(
            [
                venv_tool("check-jsonschema"),
                "--builtin-schema",
                "vendor.compose-spec",
                str(ROOT / "docker-compose.yml"),
            ],
            capture_output=True,
            text=True,
        )

        assert checked.returncode == 0, checked.stdout + checked.stderr

    def test_the_whole_platform_is_there(self) -> None:
        assert set(SERVICES) == {
            "postgres",
            "rabbitmq",
            "jaeger",
            "prometheus",
            "migrate",
            "edge",
            *PORTS,
        }
        assert SERVICES["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")

    def test_health_restart_and_no_fixed_names(self) -> None:
        for name, service in SERVICES.items():
            assert "container_name" not in service, name
            if name == "migrate":
                assert service["restart"] == "on-failure"
                continue
            assert service["restart"] == "unless-stopped", name
            assert service["healthcheck"]["test"], name
            assert not service["healthcheck"].get("disable"), name
        assert "ports" not in SERVICES["worker"]  # scalable: --scale worker=3
        # Healthy only once PostgreSQL listens on TCP, as the services reach it (during its
        # first-start initialisation it answers on the socket alone, then restarts).
        assert "pg_isready -h 127.0.0.1" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])

    def test_started_in_dependency_order(self) -> None:
        conditions = {"service_started", "service_healthy", "service_completed_successfully"}
        for name, service in SERVICES.items():
            for dependency, rule in service.get("depends_on", {}).items():
                assert dependency in SERVICES, (name, dependency)
                assert rule["condition"] in conditions, (name, dependency)
        for app in ("user_service", "campaign_service", "worker"):
            depends = SERVICES[app]["depends_on"]
            assert depends["migrate"]["condition"] == "service_completed_successfully"
            assert depends["postgres"]["condition"] == "service_healthy"
        for app in ("campaign_service", "worker"):
            assert SERVICES[app]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        gateway = SERVICES["gateway"]["depends_on"]
        assert gateway["user_service"]["condition"] == "service_healthy"
        assert gateway["campaign_service"]["condition"] == "service_healthy"
        assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    @pytest.mark.parametrize("name", sorted(APPS))
    def test_commands_are_the_designed_start_commands(self, name: str) -> None:
        command = SERVICES[name]["command"]
        expected = START_COMMANDS[name]

        assert command[: len(expected)] == expected
        if name in ("user_service", "campaign_service", "gateway"):
            assert int(option(command, "--port")) == PORTS[name]
            assert option(command, "--host") == "0.0.0.0"  # noqa: S104 (inside its container)
            assert SERVICES[name]["build"]["args"]["PORT"] == str(PORTS[name])

    @pytest.mark.parametrize("name", sorted(APPS))
    def test_environment_names_are_settings_of_that_service(self, name: str) -> None:
        fields = {field.upper() for field in APPS[name].model_fields}
        unknown = {
            variable
            for variable in env_names(SERVICES[name])
            if variable not in fields and not variable.startswith("OTEL_")
        }

        assert unknown == set()
        if issubclass(APPS[name], DatabaseSettings):
            assert "DATABASE_URL" in env_names(SERVICES[name])
        if "rabbitmq_url" in APPS[name].model_fields:
            assert "RABBITMQ_URL" in env_names(SERVICES[name])

    def test_worker_serves_metrics_on_its_port(self) -> None:
        environment = SERVICES["worker"]["environment"]

        assert environment["WORKER_METRICS_PORT"] == str(PORTS["worker"])
        assert environment["WORKER_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
        assert SERVICES["worker"]["build"]["args"]["PORT"] == str(PORTS["worker"])

    def test_gateway_serves_its_internals_on_an_unpublished_port(self) -> None:
        gateway = SERVICES["gateway"]

        assert gateway["environment"]["GATEWAY_INTERNAL_PORT"] == str(METRICS_PORTS["gateway"])
        assert gateway["environment"]["GATEWAY_INTERNAL_HOST"] == "0.0.0.0"  # noqa: S104
        assert "ports" not in gateway

    def test_the_edge_alone_is_published_and_proxies_to_the_gateway(self) -> None:
        edge, gateway = SERVICES["edge"], SERVICES["gateway"]
        command = gateway["command"]

        assert edge["ports"] == [f"${{GATEWAY_PORT:-{EDGE_PORT}}}:{EDGE_PORT}"]
        assert edge["image"].startswith("nginx:")
        assert edge["environment"]["EDGE_UPSTREAM"] == f"gateway:{PORTS['gateway']}"
        assert edge["environment"]["EDGE_LISTEN"] == str(EDGE_PORT)
        assert "./nginx/edge.conf:/etc/nginx/edge.conf.template:ro" in edge["volumes"]
        assert edge["depends_on"]["gateway"]["condition"] == "service_healthy"
        # Every name the template uses is given, and substituted (named one by one).
        template = (ROOT / "nginx" / "edge.conf").read_text()
        names = set(re.findall(r"\$\{(EDGE_[A-Z_]+)\}", template))
        assert names == set(edge["environment"])
        assert all(f"$${{{name}}}" in " ".join(edge["command"]) for name in names)
        # The gateway believes X-Forwarded-For from the edge's network alone, which nginx sets.
        subnet = COMPOSE["networks"]["edge"]["ipam"]["config"][0]["subnet"]
        assert option(command, "--forwarded-allow-ips") == subnet
        assert "--proxy-headers" in command
        assert set(edge["networks"]) == {"edge"}
        assert set(gateway["networks"]) == {"default", "edge"}

    @pytest.mark.parametrize("name", ["user_service", "campaign_service", "gateway"])
    def test_http_services_bound_headers_and_concurrency(self, name: str) -> None:
        command = SERVICES[name]["command"]

        assert option(command, "--http") == "h11"  # httptools buffers headers without a bound
        assert (
            option(command, "--h11-max-incomplete-event-size") == "${HTTP_MAX_HEADER_BYTES:-16384}"
        )
        assert option(command, "--limit-concurrency") == "${HTTP_MAX_CONCURRENCY:-1000}"

    def test_gateway_routes_reach_the_services(self) -> None:
        routes = json.loads(SERVICES["gateway"]["environment"]["GATEWAY_ROUTES"])
        settings = GatewaySettings(_env_file=None, gateway_routes=routes)

        upstreams = {route.name: route.upstream for route in settings.gateway_routes}
        assert upstreams == {
            "user_service": f"http://user_service:{PORTS['user_service']}",
            "campaign_service": f"http://campaign_service:{PORTS['campaign_service']}/campaigns",
        }

    def test_campaign_service_finds_the_jwks_of_user_service(self) -> None:
        url = SERVICES["campaign_service"]["environment"]["JWT_JWKS_URL"]

        assert url == f"http://user_service:{PORTS['user_service']}/.well-known/jwks.json"

    def test_no_secret_in_an_image_or_the_compose_file(self) -> None:
        user_service = SERVICES["user_service"]["environment"]

        assert user_service["JWT_PRIVATE_KEY"] == "${JWT_PRIVATE_KEY:-}"
        assert "PRIVATE KEY" not in (ROOT / "docker-compose.yml").read_text()
        assert "PRIVATE KEY-----\n" not in (ROOT / "Dockerfile").read_text()

    def test_every_variable_is_documented_in_env_example(self) -> None:
        text = (ROOT / "docker-compose.yml").read_text()
        # $${NAME} is a literal ${NAME} for the container (the edge's envsubst), not compose's.
        used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
        documented = {
            match.group(1)
            for match in re.finditer(
                r"^#?\s*([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M
            )
        }

        assert used - documented == set()

    def test_rabbitmq_loads_the_config_and_the_topology(self) -> None:
        rabbitmq = SERVICES["rabbitmq"]
        mounts = {volume.split(":")[0] for volume in rabbitmq["volumes"]}

        assert {"./rabbitmq/rabbitmq.conf", "./rabbitmq/definitions.json"} <= mounts
        assert "import_definitions" in " ".join(rabbitmq["command"])
        assert "worker.campaign.created" in " ".join(rabbitmq["healthcheck"]["test"])
        assert rabbitmq["ports"] == ["${RABBITMQ_UI_PORT:-15672}:15672"]


class TestImage:
    DOCKERFILE = (ROOT / "Dockerfile").read_text()

    def test_multi_stage_from_the_lock_as_a_non_root_user_with_a_healthcheck(self) -> None:
        assert len(re.findall(r"^FROM ", self.DOCKERFILE, re.M)) == 2
        assert "--require-hashes" in self.DOCKERFILE
        assert "requirements-runtime.lock" in self.DOCKERFILE
        assert re.search(r"^USER app$", self.DOCKERFILE, re.M)
        assert re.search(r"^HEALTHCHECK ", self.DOCKERFILE, re.M)

    def stage(self, name: str) -> str:
        start = re.search(rf"^FROM .* AS {name}$", self.DOCKERFILE, re.M)
        assert start, name
        end = self.DOCKERFILE.find("\nFROM ", start.end())
        return self.DOCKERFILE[start.start() : None if end < 0 else end]

    def test_installs_the_project_as_a_package_after_its_locked_dependencies(self) -> None:
        build = self.stage("build")
        lock = build.index("--require-hashes --no-deps -r /tmp/requirements-runtime.lock")
        source = build.index("COPY . /tmp/src")
        install = build.index("pip install --no-deps /tmp/src")

        assert lock < source < install  # a code change rebuilds the last layer only

    def test_the_runtime_stage_holds_the_environment_not_the_source(self) -> None:
        copies = re.findall(r"^COPY (.*)$", self.stage("runtime"), re.M)

        assert copies == ["--from=build /opt/venv /opt/venv", "docker/start /usr/local/bin/start"]
        for package in PACKAGES:
            assert not re.search(rf"^COPY .*\b{package}\b", self.DOCKERFILE, re.M), package

    def test_start_script_knows_every_service(self) -> None:
        script = ROOT / "docker" / "start"
        syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)

        assert syntax.returncode == 0, syntax.stderr
        for service in APPS:
            assert service in script.read_text()

    def test_start_script_runs_the_declared_console_scripts(self) -> None:
        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        commands = {
            service: shlex.split(command)
            for service, command in re.findall(
                r"^\s*(worker|migrate)\) exec (.+?) ;;$",
                (ROOT / "docker" / "start").read_text(),
                re.M,
            )
        }

        assert commands == {"worker": ["campaign-worker"], "migrate": ["campaign-migrate"]}
        # The same functions as the designed `python -m worker` and `python -m shared.migrate`.
        assert declared["campaign-worker"] == "worker.__main__:main"
        assert declared["campaign-migrate"] == "shared.migrate:main"

    def test_gateway_drops_idle_connections_before_the_services_close_them(self) -> None:
        # The services run uvicorn with its default keep-alive timeout, in the image and locally.
        for script in ("docker/start", "scripts/run-local", "docker-compose.yml"):
            assert "--timeout-keep-alive" not in (ROOT / script).read_text(), script
        services_keep_alive = uvicorn.Config(app=None).timeout_keep_alive  # type: ignore[arg-type]
        expiry = GatewaySettings.model_fields["gateway_keepalive_expiry_seconds"].default

        assert expiry < services_keep_alive

    def test_runtime_lock_is_the_main_lock_without_the_dev_tools(self) -> None:
        def pins(name: str) -> dict[str, str]:
            text = (ROOT / name).read_text()
            return dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==([^ \\;]+)", text, re.M))

        runtime, everything = pins("requirements-runtime.lock"), pins("requirements.lock")

        assert runtime
        assert all(everything.get(package) == version for package, version in runtime.items())
        assert "pytest" not in runtime
        for name in ("requirements.lock", "requirements-runtime.lock"):
            text = (ROOT / name).read_text()
            assert "--hash=sha256:" in text
            # No download address and no index or links option (spelled so that the pattern
            # itself names neither).
            assert not re.search(r"https?://|--(?:extra-)?index-ur[l]|--find-link[s]", text)


class TestMakefile:
    def make(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "--no-print-directory", "-n", *args], cwd=ROOT, capture_output=True, text=True
        )

    def test_multi_platform_build_tagged_registry_service_version(self) -> None:
        built = self.make("docker-build", "SERVICE=worker", "VERSION=1.2.3", "REGISTRY=reg/acme")
        pushed = self.make("docker-push", "SERVICE=gateway", "VERSION=1.2.3", "REGISTRY=reg/acme")

        assert built.returncode == 0, built.stderr
        assert "--platform linux/amd64,linux/arm64" in built.stdout
        assert "--tag reg/acme/worker:1.2.3" in built.stdout
        assert "--build-arg SERVICE=worker" in built.stdout
        assert "--tag reg/acme/gateway:1.2.3 --push" in pushed.stdout

    def test_unknown_service_is_refused(self) -> None:
        refused = subprocess.run(
            ["make", "--no-print-directory", "docker-build", "SERVICE=nope"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )

        assert refused.returncode != 0
        assert "SERVICE must be one of" in refused.stderr

    @pytest.mark.parametrize(
        ("target", "command"),
        [
            ("up", "docker compose up --build"),
            ("down", "docker compose down"),
            ("test", "./scripts/test"),
            ("run-local", "./scripts/run-local"),
        ],
    )
    def test_readme_commands(self, target: str, command: str) -> None:
        assert command in self.make(target).stdout


class TestPrometheus:
    @pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.local.yml"])
    def test_config_is_valid_and_scrapes_every_service(self, name: str) -> None:
        path = ROOT / "prometheus" / name
        checked = subprocess.run(
            ["promtool", "check", "config", str(path)], capture_output=True, text=True
        )
        config = yaml.safe_load(path.read_text())

        assert checked.returncode == 0, checked.stdout + checked.stderr
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert set(jobs) == set(METRICS_PORTS)
        for job_name, job in jobs.items():
            ports = [sd["port"] for sd in job.get("dns_sd_configs", [])] + [
                int(target.rsplit(":", 1)[1])
                for static in job.get("static_configs", [])
                for target in static["targets"]
            ]
            assert ports == [METRICS_PORTS[job_name]]
