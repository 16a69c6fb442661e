"""docker-compose.cluster.yml, the three-node RabbitMQ cluster behind HAProxy, as compose merges
it onto docker-compose.yml; rabbitmq/cluster.conf and haproxy/rabbitmq.cfg. (No Docker engine
here: the drills in tests/cluster run the same two files on this machine.)"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.deployment.test_artifacts import venv_tool
from tests.support.cluster import COMPOSE_NODE_NAMES, HAPROXY
from tests.support.processes import ROOT, free_port

BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
CLUSTER = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
BALANCER = "rabbitmq-lb"
HAPROXY_CONFIG = ROOT / "haproxy" / "rabbitmq.cfg"


def merged_service(name: str) -> dict[str, Any]:
    """A service as `docker compose -f docker-compose.yml -f docker-compose.cluster.yml` sees
    it, for the keys these files use: mappings merged, volumes merged by their target, the rest
    replaced by the override."""
    service: dict[str, Any] = copy.deepcopy(BASE["services"].get(name, {}))
    for key, value in CLUSTER["services"].get(name, {}).items():
        if isinstance(value, dict) and isinstance(service.get(key), dict):
            service[key] = {**service[key], **value}
        elif key == "volumes":
            targets = {volume.split(":")[1]: volume for volume in service.get(key, [])}
            targets.update({volume.split(":")[1]: volume for volume in value})
            service[key] = list(targets.values())
        else:
            service[key] = value
    return service


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> what is mounted there."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}


def version(image: str) -> tuple[int, ...]:
    tag = image.split(":", 1)[1]
    return tuple(int(part) for part in re.findall(r"\d+", tag.split("-")[0]))


class TestClusterCompose:
    def test_valid_against_the_compose_specification(self) -> None:
        checked = subprocess.run(
            [
                venv_tool("check-jsonschema"),
                "--builtin-schema",
                "vendor.compose-spec",
                str(ROOT / "docker-compose.cluster.yml"),
            ],
            capture_output=True,
            text=True,
        )

        assert checked.returncode == 0, checked.stdout + checked.stderr

    def test_the_single_node_stays_the_default(self) -> None:
        services = BASE["services"]

        assert not {"rabbitmq-2", "rabbitmq-3", BALANCER} & set(services)
        for name in ("campaign_service", "worker"):
            assert "@rabbitmq:5672/" in services[name]["environment"]["RABBITMQ_URL"]
        assert CLUSTER["name"] == BASE["name"]  # one project: the override adds to it

    def test_three_nodes_of_one_image_named_by_their_hostnames(self) -> None:
        image = BASE["services"]["rabbitmq"]["image"]
        listed = re.findall(
            r"^cluster_formation\.classic_config\.nodes\.\d+ = (\S+)$",
            (ROOT / "rabbitmq" / "cluster.conf").read_text(),
            re.M,
        )

        for node in NODES:
            service = merged_service(node)
            assert service["image"] == image, node
            # The node's name is rabbit@<hostname>, and the hostname is the service's DNS name.
            assert service["hostname"] == node
        assert listed == [f"rabbit@{node}" for node in NODES] == list(COMPOSE_NODE_NAMES)
        # quorum_queue.initial_cluster_size (rabbitmq/cluster.conf) is a key from RabbitMQ 4.1.
        assert version(image) >= (4, 1)

    def test_each_node_has_its_own_data_and_the_platforms_config_and_topology(self) -> None:
        data = []
        for node in NODES:
            mounted = mounts(merged_service(node))
            assert mounted["/etc/rabbitmq/conf.d/20-campaign-platform.conf"] == (
                "./rabbitmq/rabbitmq.conf"
            )
            assert mounted["/etc/rabbitmq/conf.d/30-cluster.conf"] == "./rabbitmq/cluster.conf"
            assert mounted["/etc/rabbitmq/campaign-platform-definitions.json"] == (
                "./rabbitmq/definitions.json"
            )
            data.append(mounted["/var/lib/rabbitmq"])
        assert len(set(data)) == 3
        assert set(data) <= set(BASE["volumes"]) | set(CLUSTER["volumes"])

    def test_nodes_share_a_cookie_and_import_the_topology_once_all_three_run(self) -> None:
        cookies = set()
        for node in NODES:
            service = merged_service(node)
            cookies.add(service["environment"]["RABBITMQ_CLUSTER_COOKIE"])
            script = service["command"][-1]
            assert service["command"][:2] == ["sh", "-c"]
            # $$ is compose's escape for a literal $ (the container's shell variable).
            syntax = subprocess.run(
                ["sh", "-n", "-c", script.replace("$$", "$")], capture_output=True, text=True
            )
            assert syntax.returncode == 0, syntax.stderr
            cookie = script.index("/var/lib/rabbitmq/.erlang.cookie")
            assert script.index("umask 077") < cookie < script.index("exec docker-entrypoint.sh")
            assert script.index("await_online_nodes 3") < script.index("import_definitions")
            assert "worker.campaign.created" in " ".join(service["healthcheck"]["test"])
            assert service["restart"] == "unless-stopped"
        assert cookies == {"${RABBITMQ_ERLANG_COOKIE:-campaign-platform-dev-cookie}"}

    def test_the_services_reach_the_cluster_through_haproxy(self) -> None:
        users = [
            name
            for name, service in BASE["services"].items()
            if "RABBITMQ_URL" in service.get("environment", {})
        ]

        assert users  # campaign_service, worker
        for name in users:
            single = BASE["services"][name]["environment"]["RABBITMQ_URL"]
            service = merged_service(name)
            url = service["environment"]["RABBITMQ_URL"]
            assert urlsplit(url).hostname == BALANCER, name
            assert url == single.replace("@rabbitmq:5672/", f"@{BALANCER}:5672/")
            assert service["depends_on"][BALANCER]["condition"] == "service_healthy"
        balancer = CLUSTER["services"][BALANCER]
        assert balancer["image"].startswith("haproxy:")
        assert mounts(balancer)["/usr/local/etc/haproxy/haproxy.cfg"] == "./haproxy/rabbitmq.cfg"
        conditions = {node: rule["condition"] for node, rule in balancer["depends_on"].items()}
        assert conditions == dict.fromkeys(NODES, "service_healthy")
        assert balancer["healthcheck"]["test"]
        assert balancer["restart"] == "unless-stopped"
        assert balancer["ports"] == ["${RABBITMQ_LB_UI_PORT:-15673}:15672"]

    def test_every_variable_is_documented_in_env_example(self) -> None:
        text = (ROOT / "docker-compose.cluster.yml").read_text()
        used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
        documented = set(
            re.findall(r"^#?\s*([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
        )

        assert used - documented == set()


class TestHaproxyConfig:
    TEXT = HAPROXY_CONFIG.read_text()

    def test_balances_amqp_and_the_ui_over_the_three_nodes_by_default(self) -> None:
        servers = re.findall(r'^\s+server \S+ "\$\{LB_NODE\d_(AMQP|UI)-([^}]+)\}"', self.TEXT, re.M)
        binds = re.findall(r'^\s+bind "\$\{LB_(AMQP|UI)_BIND-([^}]+)\}"', self.TEXT, re.M)

        assert binds == [("AMQP", ":5672"), ("UI", ":15672")]
        assert servers == [("AMQP", f"{node}:5672") for node in NODES] + [
            ("UI", f"{node}:15672") for node in NODES
        ]
        assert re.search(r"on-marked-down shutdown-sessions", self.TEXT)
        assert re.search(r"^\s+option redispatch$", self.TEXT, re.M)

    def test_haproxy_accepts_it(self) -> None:
        # The compose hostnames resolve only on the compose network: addresses of this machine.
        names = [f"LB_NODE{n}_{kind}" for n in (1, 2, 3) for kind in ("AMQP", "UI")]
        env = {**os.environ, **{name: f"127.0.0.1:{free_port()}" for name in names}}
        checked = subprocess.run(
            [HAPROXY, "-c", "-f", str(HAPROXY_CONFIG)], env=env, capture_output=True, text=True
        )

        assert checked.returncode == 0, checked.stdout + checked.stderr


class TestClusterCommands:
    def test_make_targets_run_both_files(self) -> None:
        files = "docker compose -f docker-compose.yml -f docker-compose.cluster.yml"
        for target, command in (("up-cluster", "up --build --detach"), ("down-cluster", "down")):
            made = subprocess.run(
                ["make", "--no-print-directory", "-n", target],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            assert made.stdout.strip() == f"{files} {command}", made.stderr

    def test_the_readme_says_how(self) -> None:
        readme = (ROOT / "README.md").read_text()

        assert "make up-cluster" in readme
        assert "docker-compose.cluster.yml" in readme
        assert (ROOT / "docs" / "cluster.md").is_file()
