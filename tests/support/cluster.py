"""A RabbitMQ cluster of this test run's own, as docker-compose.cluster.yml runs one: three private
nodes on this machine clustered by classic peer discovery (``rabbitmq/cluster.conf``, with this
machine's node names), and Debian's haproxy in front (``haproxy/rabbitmq.cfg``). Tests kill, stop
and start its nodes; everything is removed at the end, whatever happened."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika

from tests.support.polling import eventually
from tests.support.processes import ROOT, free_port
from tests.support.rabbit import PrivateRabbitNode

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
# The compose nodes' names in rabbitmq/cluster.conf, in order.
COMPOSE_NODE_NAMES = ("rabbit@rabbitmq-1", "rabbit@rabbitmq-2", "rabbit@rabbitmq-3")
_QUORUM_CLUSTER_SIZE = "[{{rabbit, [{{quorum_cluster_size, {value}}}]}}].\n"
# Keys of rabbitmq/cluster.conf that older servers (this machine's 3.10) do not know: the version
# that knows each, and what says the same to an older one in advanced.config (Erlang terms), if
# anything. Continuous membership reconciliation has no equivalent before 3.13: the drills
# declare their queues with the three nodes running, so no queue needs it.
_NEWER_KEYS: dict[str, tuple[tuple[int, ...], str | None]] = {
    "quorum_queue.initial_cluster_size": ((4, 1), _QUORUM_CLUSTER_SIZE),
    "quorum_queue.continuous_membership_reconciliation.enabled": ((3, 13), None),
    "quorum_queue.continuous_membership_reconciliation.target_group_size": ((3, 13), None),
}


def cluster_config(names: Sequence[str], *, server_version: tuple[int, ...]) -> tuple[str, str]:
    """``rabbitmq/cluster.conf`` with ``names`` for the compose node names, as the lines of a
    rabbitmq.conf and an advanced.config (Erlang terms) for a server of ``server_version``."""
    lines, advanced = [], "[].\n"
    for line in (ROOT / "rabbitmq" / "cluster.conf").read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        if key in _NEWER_KEYS and server_version < _NEWER_KEYS[key][0]:
            equivalent = _NEWER_KEYS[key][1]
            if equivalent is not None:
                advanced = equivalent.format(value=value)
            continue
        for compose_name, name in zip(COMPOSE_NODE_NAMES, names, strict=True):
            if value == compose_name:
                line = f"{key} = {name}"
        lines.append(line)
    return "\n".join(lines), advanced


def server_version() -> tuple[int, ...]:
    """The installed RabbitMQ's version, from the folder its Debian package installs."""
    found = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
    match = re.search(r"(\d+)\.(\d+)\.(\d+)$", found[-1].name) if found else None
    if match is None:
        raise RuntimeError("RabbitMQ is not installed (rabbitmq-server, a Debian package)")
    return tuple(int(part) for part in match.groups())


@dataclass(frozen=True)
class QueueReplicas:
    leader: str
    members: list[str]
    online: list[str]


class Balancer:
    """Debian's haproxy from ``haproxy/rabbitmq.cfg``, in the foreground, logging to a file."""

    def __init__(self, nodes: Sequence[PrivateRabbitNode], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        unused = [free_port() for _ in nodes]  # the private nodes have no management UI
        self._env = {
            **os.environ,
            "LB_AMQP_BIND": f"127.0.0.1:{self.port}",
            "LB_UI_BIND": f"127.0.0.1:{free_port()}",
        }
        for number, (node, ui_port) in enumerate(zip(nodes, unused, strict=True), start=1):
            self._env[f"LB_NODE{number}_AMQP"] = f"127.0.0.1:{node.port}"
            self._env[f"LB_NODE{number}_UI"] = f"127.0.0.1:{ui_port}"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                HAPROXY,
                "-db",
                "-f",
                str(ROOT / "haproxy" / "rabbitmq.cfg"),
                env=self._env,
                stdout=log,
                stderr=log,
            )

        async def answers() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"haproxy exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                connection = await aio_pika.connect(self.url, timeout=2)
            except Exception:
                return False
            await connection.close()
            return True

        await eventually(answers, timeout=30, interval=0.2, what="AMQP through haproxy")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class RabbitCluster:
    """Three private nodes (``rabbit-a-…@localhost`` …) clustered, with haproxy in front.

    Start: the first node, then the other two together, which join it (classic peer discovery);
    the cluster is up once every node sees three running nodes, and haproxy answers AMQP.
    """

    def __init__(self, workdir: Path, size: int = 3) -> None:
        suffix = uuid.uuid4().hex[:8]
        names = [f"rabbit-{letter}-{suffix}@localhost" for letter in "abc"[:size]]
        config, advanced = cluster_config(names, server_version=server_version())
        base = "\n".join(  # the platform's settings, minus the management port (no plugins here)
            line
            for line in (ROOT / "rabbitmq" / "rabbitmq.conf").read_text().splitlines()
            if not line.startswith("management.")
        )
        self.nodes = [
            PrivateRabbitNode(
                port=free_port(),
                dist_port=free_port(),
                name=name,
                # A log file too (the platform's config logs to the console alone, for docker).
                extra_config=f"{base}\n{config}\nlog.file = node.log\nlog.file.level = info",
                advanced_config=advanced,
            )
            for name in names
        ]
        self.workdir = workdir
        self.balancer = Balancer(self.nodes, workdir / "haproxy.log")
        self._killed: set[str] = set()

    @property
    def url(self) -> str:
        """Where clients connect: haproxy."""
        return self.balancer.url

    def node(self, name: str) -> PrivateRabbitNode:
        [node] = [node for node in self.nodes if node.name == name]
        return node

    async def start(self) -> None:
        first, *others = self.nodes
        await first.start()
        await asyncio.gather(*(node.start() for node in others))
        await self.wait_running(len(self.nodes))
        await self.balancer.start()

    async def remove(self) -> None:
        """Stop haproxy and every node (killing what does not stop), and remove their folders;
        their logs are kept in ``workdir``."""
        with contextlib.suppress(Exception):
            await self.balancer.stop()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await self.kill(node)
            with contextlib.suppress(Exception):
                shutil.copytree(node.log_dir, self.workdir / node.name.partition("@")[0])
            with contextlib.suppress(Exception):
                await node.remove()

    # What the cluster says.

    async def ctl(self, *args: str, node: PrivateRabbitNode | None = None) -> str:
        """``rabbitmqctl -n NODE ARGS`` on ``node``, or on the first node that answers."""
        candidates = [node] if node is not None else self.nodes
        error: Exception | None = None
        for each in candidates:
            try:
                return await each.output("rabbitmqctl", "-q", "-n", each.name, *args, timeout=30)
            except RuntimeError as exc:
                error = exc
        raise RuntimeError(f"no node answered rabbitmqctl {' '.join(args)}") from error

    async def ctl_json(self, *args: str, node: PrivateRabbitNode | None = None) -> Any:
        return json.loads(await self.ctl(*args, "--formatter", "json", node=node))

    async def running_nodes(self, node: PrivateRabbitNode) -> list[str]:
        status = await self.ctl_json("cluster_status", node=node)
        return sorted(status["running_nodes"])

    async def is_running(self, node: PrivateRabbitNode) -> bool:
        try:
            await node.output("rabbitmq-diagnostics", "-q", "-n", node.name, "check_running")
        except RuntimeError:
            return False
        return True

    async def wait_running(self, count: int, timeout: float = 120) -> None:
        """Every running node sees ``count`` running nodes."""

        async def views() -> list[list[str]]:
            seen = []
            for node in self.nodes:
                if node.name in self._killed or not await self.is_running(node):
                    continue
                with contextlib.suppress(RuntimeError, ValueError):
                    seen.append(await self.running_nodes(node))
            return seen

        await eventually(
            views,
            until=lambda seen: len(seen) == count and all(len(v) == count for v in seen),
            timeout=timeout,
            interval=0.5,
            what=f"{count} nodes running together",
        )

    async def all_replicas(self, vhost: str = "/") -> dict[str, QueueReplicas]:
        """Where each (quorum) queue has its members, and which one leads."""
        rows = await self.ctl_json(
            "list_queues", "-p", vhost, "name", "leader", "members", "online"
        )
        return {
            row["name"]: QueueReplicas(row["leader"], sorted(row["members"]), sorted(row["online"]))
            for row in rows
        }

    async def replicas(self, queue: str, vhost: str = "/") -> QueueReplicas:
        return (await self.all_replicas(vhost))[queue]

    async def queue_counts(self, queue: str, vhost: str = "/") -> tuple[int, int]:
        """(ready, unacknowledged) messages of ``queue``, as the cluster counts them."""
        rows = await self.ctl_json(
            "list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged"
        )
        [row] = [row for row in rows if row["name"] == queue]
        return int(row["messages_ready"]), int(row["messages_unacknowledged"])

    async def find_connection(self, name_end: str) -> PrivateRabbitNode | None:
        """The node holding the (first) connection whose client-provided name ends with
        ``name_end``, if any. Behind haproxy every connection comes from haproxy's address;
        the port a connection reached tells the node."""
        rows = await self.ctl_json("list_connections", "port", "client_properties")
        for row in rows:
            # rabbitmqctl's JSON gives a field table as a list of [name, type, value].
            properties = {entry[0]: entry[2] for entry in row["client_properties"]}
            if str(properties.get("connection_name", "")).endswith(name_end):
                [node] = [node for node in self.nodes if node.port == int(row["port"])]
                return node
        return None

    async def node_of_connection(self, name_end: str) -> PrivateRabbitNode:
        node = await self.find_connection(name_end)
        assert node is not None, f"no connection named like {name_end!r}"
        return node

    # What tests do to it.

    async def beam_pid(self, node: PrivateRabbitNode) -> int:
        output = await self.ctl("eval", "os:getpid().", node=node)
        return int(output.strip().strip('"'))

    async def kill(self, node: PrivateRabbitNode) -> None:
        """SIGKILL the node's Erlang VM: no goodbye to its peers or its clients."""
        pid = await self.beam_pid(node)
        os.kill(pid, signal.SIGKILL)
        self._killed.add(node.name)

        async def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        await eventually(gone, timeout=10, what=f"{node.name} gone")

    async def stop(self, node: PrivateRabbitNode) -> None:
        """Stop the node as an operator would (``rabbitmqctl stop``)."""
        await node.stop()
        self._killed.add(node.name)

    async def start_node(self, node: PrivateRabbitNode) -> None:
        """Start a node that was killed or stopped; it rejoins its cluster."""
        await node.start()
        self._killed.discard(node.name)

    async def start_down_nodes(self) -> None:
        """Start every node a test killed or stopped (and did not start again), together."""
        down = [node for node in self.nodes if node.name in self._killed]
        await asyncio.gather(*(self.start_node(node) for node in down))
