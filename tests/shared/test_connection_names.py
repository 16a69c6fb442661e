"""Every process names its RabbitMQ connections: behind a load balancer the peer address is the
balancer's, and the name is what tells an operator which process holds a connection."""

from __future__ import annotations

import os
import socket
from urllib.parse import parse_qs, urlsplit

from shared.messaging import connection_name, named_url


class TestConnectionNames:
    def test_the_name_says_service_host_and_process(self) -> None:
        name = connection_name("worker")

        assert name == f"worker@{socket.gethostname()} pid {os.getpid()}"

    def test_the_name_goes_into_the_url_keeping_the_rest(self) -> None:
        url = named_url("amqp://user:p%40ss@rabbitmq-lb:5672/tenant%2Fa?heartbeat=30", "w@h pid 7")
        parts = urlsplit(url)

        assert parts.netloc == "user:p%40ss@rabbitmq-lb:5672"
        assert parts.path == "/tenant%2Fa"
        assert parse_qs(parts.query) == {"heartbeat": ["30"], "name": ["w@h pid 7"]}

    def test_a_name_the_url_gives_is_kept(self) -> None:
        url = "amqp://guest:guest@127.0.0.1:5672/?name=chosen"

        assert named_url(url, "worker@host pid 1") == url
