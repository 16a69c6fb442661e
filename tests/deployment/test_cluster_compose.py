"""docker-compose.cluster.yml, the three-node RabbitMQ cluster behind HAProxy, as compose merges
it onto docker-compose.yml; rabbitmq/cluster.conf and haproxy/rabbitmq.cfg. (No Docker engine
here: the drills in tests/cluster run the same two files on this machine.)"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deployment.test_artifacts import venv_tool
from tests.support.cluster import COMPOSE_NODE_NAMES, HAPROXY, cluster_config
from tests.support.processes import ROOT, free_port

BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
CLUSTER = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")  # the services
HOSTNAMES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")  # their nodes' host names, in order
BALANCER = "rabbitmq-lb"
HAPROXY_CONFIG = ROOT / "haproxy" / "rabbitmq.cfg"
CLUSTER_CONF = ROOT / "rabbitmq" / "cluster.conf"
COOKIE = "${RABBITMQ_ERLANG_COOKIE:?set RABBITMQ_ERLANG_COOKIE in .env (make cluster-cookie)}"


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


def shell(script: str) -> str:
    """A compose string as the container's shell gets it: $$ is compose's escape for a $."""
    return script.replace("$$", "$")


def settings(text: str) -> dict[str, str]:
    """The key = value lines of a rabbitmq.conf."""
    return dict(re.findall(r"^([a-z_.0-9]+) = (.+)$", text, re.M))


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
            CLUSTER_CONF.read_text(),
            re.M,
        )

        for node, hostname in zip(NODES, HOSTNAMES, strict=True):
            service = merged_service(node)
            assert service["image"] == image, node
            # The node's name is rabbit@<hostname>, and the other containers find that host
            # name by DNS: the service's name, or an alias on the network.
            assert service["hostname"] == hostname
            aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
            assert hostname in {node, *aliases}, node
        assert listed == [f"rabbit@{name}" for name in HOSTNAMES] == list(COMPOSE_NODE_NAMES)
        # quorum_queue.initial_cluster_size (rabbitmq/cluster.conf) is a key from RabbitMQ 4.1.
        assert version(image) >= (4, 1)

    def test_the_cluster_shares_no_data_with_the_single_node(self) -> None:
        # Switching stacks must neither leave the cluster's first node with the single node's
        # queues (one member each) nor leave the single node believing it is in a cluster.
        single = BASE["services"]["rabbitmq"]
        single_data = mounts(single)["/var/lib/rabbitmq"]
        cluster_data = {mounts(merged_service(node))["/var/lib/rabbitmq"] for node in NODES}

        assert single_data == "rabbitmq-data"
        assert single_data not in cluster_data
        assert single["hostname"] not in HOSTNAMES
        assert f"rabbit@{single['hostname']}" not in COMPOSE_NODE_NAMES  # cluster.conf's list

    def test_each_node_has_its_own_data_and_the_platforms_config_plugins_and_topology(
        self,
    ) -> None:
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
            # The UI, metrics and the shovel (the UI's "Move messages") on every node.
            assert mounted["/etc/rabbitmq/enabled_plugins"] == "./rabbitmq/enabled_plugins"
            data.append(mounted["/var/lib/rabbitmq"])
        assert len(set(data)) == 3
        assert set(data) <= set(CLUSTER["volumes"])

    def test_nodes_share_a_required_cookie_and_import_the_topology_once_all_three_run(
        self,
    ) -> None:
        cookies = set()
        for node in NODES:
            service = merged_service(node)
            cookies.add(service["environment"]["RABBITMQ_CLUSTER_COOKIE"])
            script = service["command"][-1]
            assert service["command"][:2] == ["sh", "-c"]
            syntax = subprocess.run(
                ["sh", "-n", "-c", shell(script)], capture_output=True, text=True
            )
            assert syntax.returncode == 0, syntax.stderr
            cookie = script.index("/var/lib/rabbitmq/.erlang.cookie")
            assert script.index("umask 077") < cookie < script.index("exec docker-entrypoint.sh")
            # Once the three run: the topology, then this node's member of every quorum queue
            # that lacks one (declared while the node was down).
            waited = script.index("await_online_nodes 3")
            imported = script.index("import_definitions")
            grown = shell(script).index('rabbitmq-queues --quiet grow "rabbit@$(hostname)" all')
            assert waited < imported < grown < script.index("exec docker-entrypoint.sh")
            assert service["healthcheck"] == CLUSTER["x-node-healthcheck"]
            assert service["restart"] == "unless-stopped"
        # No default: compose refuses to start the cluster without one, and says how to get one.
        assert cookies == {COOKIE}
        assert "RABBITMQ_ERLANG_COOKIE:-" not in (ROOT / "docker-compose.cluster.yml").read_text()

    @pytest.mark.parametrize(
        ("running", "queues", "healthy"),
        [
            (True, {"other": 1, "worker.campaign.created": 3}, True),
            (True, {"other": 3, "worker.campaign.created": 2}, False),
            (True, {"other": 3}, False),
            (True, {}, False),
            (False, {"worker.campaign.created": 3}, False),
        ],
        ids=["three-members", "two-members", "no-queue", "no-queues", "not-running"],
    )
    def test_a_node_is_healthy_once_the_queue_has_its_three_members(
        self, tmp_path: Path, running: bool, queues: dict[str, int], healthy: bool
    ) -> None:
        # The CLI's `rabbitmqctl --silent list_queues name members` (tab-separated, no header,
        # as RabbitMQ's CLI prints it); the commands are stand-ins, the pipeline is the check's.
        [kind, check] = CLUSTER["x-node-healthcheck"]["test"]
        (tmp_path / "queues").write_text(
            "".join(
                f"{name}\t[{', '.join(COMPOSE_NODE_NAMES[:members])}]\n"
                for name, members in queues.items()
            )
        )
        for name, body in (
            ("rabbitmq-diagnostics", f"exit {0 if running else 69}"),
            ("rabbitmqctl", f"cat '{tmp_path / 'queues'}'"),
        ):
            (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
            (tmp_path / name).chmod(0o755)
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

        checked = subprocess.run(["sh", "-c", shell(check)], env=env, capture_output=True)

        assert kind == "CMD-SHELL"
        assert (checked.returncode == 0) == healthy, checked.stderr

    def test_queues_grow_to_three_members_whenever_declared(self) -> None:
        conf = settings(CLUSTER_CONF.read_text())

        assert conf["quorum_queue.initial_cluster_size"] == "3"
        assert conf["quorum_queue.continuous_membership_reconciliation.enabled"] == "true"
        assert conf["quorum_queue.continuous_membership_reconciliation.target_group_size"] == "3"
        assert conf["cluster_partition_handling"] == "pause_minority"

    def test_the_drills_get_the_same_config_in_their_servers_terms(self) -> None:
        names = [f"rabbit-{letter}@localhost" for letter in "abc"]

        newer, newer_advanced = cluster_config(names, server_version=(4, 1, 0))
        older, older_advanced = cluster_config(names, server_version=(3, 10, 8))

        # The image's server takes every line as it is, with the drills' node names.
        assert settings(newer) == {
            **settings(CLUSTER_CONF.read_text()),
            **{
                f"cluster_formation.classic_config.nodes.{n}": name
                for n, name in enumerate(names, 1)
            },
        }
        assert newer_advanced == "[].\n"
        # 3.10 knows neither key: the initial size moves to advanced.config; reconciliation,
        # which it lacks, is left out (the drills declare their queues with three nodes up).
        assert not {key for key in settings(older) if key.startswith("quorum_queue.")}
        assert older_advanced == "[{rabbit, [{quorum_cluster_size, 3}]}].\n"

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
        example = (ROOT / ".env.example").read_text()
        used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
        documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", example, re.M))

        assert used - documented == set()
        # No cookie to copy: a value there would be one more secret known to everyone.
        assert re.findall(r"^#?\s*RABBITMQ_ERLANG_COOKIE=(.*)$", example, re.M) == [""]


class TestHaproxyConfig:
    TEXT = HAPROXY_CONFIG.read_text()

    def test_balances_amqp_and_the_ui_over_the_three_nodes_by_default(self) -> None:
        servers = re.findall(r'^\s+server \S+ "\$\{LB_NODE\d_(AMQP|UI)-([^}]+)\}"', self.TEXT, re.M)
        binds = re.findall(r'^\s+bind "\$\{LB_(AMQP|UI)_BIND-([^}]+)\}"', self.TEXT, re.M)

        assert binds == [("AMQP", ":5672"), ("UI", ":15672")]
        assert servers == [("AMQP", f"{name}:5672") for name in HOSTNAMES] + [
            ("UI", f"{name}:15672") for name in HOSTNAMES
        ]
        assert re.search(r"on-marked-down shutdown-sessions", self.TEXT)
        assert re.search(r"^\s+option redispatch$", self.TEXT, re.M)

    def test_node_names_are_resolved_again_through_dockers_dns(self) -> None:
        sections = re.split(r"^(?=\S)", self.TEXT, flags=re.M)
        [resolvers] = [s for s in sections if s.startswith("resolvers docker")]
        with_servers = [s for s in sections if re.search(r"^\s+server ", s, re.M)]

        assert re.search(r"^\s+nameserver dns 127\.0\.0\.11:53$", resolvers, re.M)
        assert len(with_servers) == 2  # AMQP, the UI
        for section in with_servers:
            # Every server of the section takes its default-server's settings.
            [defaults] = re.findall(r"^\s+default-server (.+)$", section, re.M)
            assert "resolvers docker" in defaults
            assert "init-addr last,libc,none" in defaults

    def test_haproxy_accepts_it(self) -> None:
        # As the drills run it: addresses of this machine (IP addresses: nothing to resolve).
        names = [f"LB_NODE{n}_{kind}" for n in (1, 2, 3) for kind in ("AMQP", "UI")]
        env = {**os.environ, **{name: f"127.0.0.1:{free_port()}" for name in names}}
        checked = subprocess.run(
            [HAPROXY, "-c", "-f", str(HAPROXY_CONFIG)], env=env, capture_output=True, text=True
        )

        assert checked.returncode == 0, checked.stdout + checked.stderr

    def test_haproxy_starts_before_the_node_names_resolve(self) -> None:
        # The compose names resolve only on the compose network: here, as in a container that
        # starts before a node's, they do not, and HAProxy starts anyway (init-addr none).
        env = {name: value for name, value in os.environ.items() if not name.startswith("LB_")}
        checked = subprocess.run(
            [HAPROXY, "-c", "-f", str(HAPROXY_CONFIG)], env=env, capture_output=True, text=True
        )

        assert checked.returncode == 0, checked.stdout + checked.stderr


def make(target: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    made = subprocess.run(
        ["make", "--no-print-directory", "-s", "-f", str(ROOT / "Makefile"), *args, target],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    return made.stdout


class TestClusterCommands:
    def test_make_targets_run_both_files(self) -> None:
        files = "docker compose -f docker-compose.yml -f docker-compose.cluster.yml"
        for target, command in (("up-cluster", "up --build --detach"), ("down-cluster", "down")):
            # up-cluster writes the cookie first (its recipe printed before, by -n).
            last = make(target, ROOT, "-n").strip().splitlines()[-1]
            assert last == f"{files} {command}"
        rule = re.search(r"^up-cluster:(.*)$", (ROOT / "Makefile").read_text(), re.M)
        assert rule is not None
        assert rule.group(1).split() == ["cluster-cookie"]

    def test_cluster_cookie_writes_a_random_one_into_env_when_there_is_none(
        self, tmp_path: Path
    ) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RABBITMQ_ERLANG_COOKIE"}
        cookie_line = re.compile(r"^RABBITMQ_ERLANG_COOKIE=([0-9a-f]{64})$", re.M)

        make("cluster-cookie", tmp_path, env=env)  # no .env: one is created
        first = cookie_line.findall((tmp_path / ".env").read_text())
        assert len(first) == 1
        assert (tmp_path / ".env").stat().st_mode & 0o077 == 0  # owner-only
        make("cluster-cookie", tmp_path, env=env)  # set: kept
        assert cookie_line.findall((tmp_path / ".env").read_text()) == first

        # An empty line is replaced, the other settings kept; each run draws a new one.
        (tmp_path / ".env").write_text("A=1\nRABBITMQ_ERLANG_COOKIE=\nB=2")
        make("cluster-cookie", tmp_path, env=env)
        text = (tmp_path / ".env").read_text()
        assert text.splitlines()[:2] == ["A=1", "B=2"]
        assert len(second := cookie_line.findall(text)) == 1
        assert second != first
        assert text.count("RABBITMQ_ERLANG_COOKIE=") == 1

        # One in the environment (which compose prefers to .env): .env is left alone.
        (tmp_path / ".env").write_text("A=1\n")
        make("cluster-cookie", tmp_path, env={**env, "RABBITMQ_ERLANG_COOKIE": "x" * 64})
        assert (tmp_path / ".env").read_text() == "A=1\n"

    def test_the_readme_says_how(self) -> None:
        readme = (ROOT / "README.md").read_text()

        assert "make up-cluster" in readme
        assert "docker-compose.cluster.yml" in readme
        assert (ROOT / "docs" / "cluster.md").is_file()
