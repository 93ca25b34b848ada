"""A cluster on a real Redis (issue 18): several nodes, each room instance owned by one node,
sockets on any node. In-process nodes here; real ``verani serve`` processes in
test_cluster_processes.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import coredis
import trio

from verani import RoomDefinition, Server, open_server
from verani.cluster import lease

from helpers import Client, connect

LEASE = 1.0


@contextlib.asynccontextmanager
async def nodes(
    rooms: list[RoomDefinition[Any]], url: str, *names: str, **kw: Any
) -> AsyncIterator[list[Server]]:
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                open_server(rooms, cluster=url, node_id=name, lease_seconds=LEASE, **kw)
            )
            for name in names
        ]
        yield servers


async def owner_of(url: str, room: str, instance: str) -> tuple[str, int] | None:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url)
    async with client:
        return await lease.owner(client, room, instance)


async def counts(client: Client, n: int) -> list[int]:
    return [(await client.next_event("counter:update"))[1]["count"] for _ in range(n)]


async def test_clients_on_every_node_see_every_update_in_one_order(
    redis_url: str, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(30):
        async with nodes(counter_rooms, redis_url, "a", "b", "c") as servers:
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(connect(server.url, user_id=f"u{i}"))
                    for i, server in enumerate(servers)
                ]
                for client in clients:
                    assert (await client.next_event("counter:sync"))[1]["count"] == 0
                per_client = 20
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        for _ in range(per_client):
                            nursery.start_soon(client.emit, "counter:increment", {"amount": 1})
                total = per_client * len(clients)
                seen = [await counts(client, total) for client in clients]
                # One order for everyone, and the count is what was sent.
                assert seen[0] == list(range(1, total + 1))
                assert seen[1] == seen[0] and seen[2] == seen[0]
            held = await owner_of(redis_url, "counter", "default")
            assert held is not None
            assert held[0].split("#")[0] in {"a", "b", "c"}
            owners = [s for s in servers if s.supervisor.cluster.epoch_of("counter", "default")]
            assert len(owners) == 1
