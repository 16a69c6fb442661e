"""The broker topology as RabbitMQ's definitions format, read through the management API (the
view the UI shows), so it can be compared with rabbitmq/definitions.json."""

from __future__ import annotations

from typing import Any

from tests.support.rabbit import RabbitAdmin


async def declared_topology(admin: RabbitAdmin, vhost: str) -> dict[str, list[dict[str, Any]]]:
    exchanges = [
        {
            "name": exchange["name"],
            "vhost": "/",
            "type": exchange["type"],
            "durable": exchange["durable"],
            "auto_delete": exchange["auto_delete"],
            "internal": exchange["internal"],
            "arguments": exchange["arguments"],
        }
        for exchange in await admin.exchanges(vhost)
        if exchange["name"] and not exchange["name"].startswith("amq.")
    ]
    queues = [
        {
            "name": queue["name"],
            "vhost": "/",
            "durable": queue["durable"],
            "auto_delete": queue["auto_delete"],
            "arguments": queue["arguments"],
        }
        for queue in await admin.queues(vhost)
    ]
    bindings = [
        {
            "source": binding["source"],
            "vhost": "/",
            "destination": binding["destination"],
            "destination_type": binding["destination_type"],
            "routing_key": binding["routing_key"],
            "arguments": binding["arguments"],
        }
        for binding in await admin.bindings(vhost)
        if binding["source"]  # the default exchange's implicit bindings are not definitions
    ]
    return {
        "exchanges": sorted(exchanges, key=lambda item: item["name"]),
        "queues": sorted(queues, key=lambda item: item["name"]),
        "bindings": sorted(bindings, key=lambda item: (item["source"], item["destination"])),
    }
