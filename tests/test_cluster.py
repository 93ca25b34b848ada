"""A cluster on a real Redis (issue 18): several nodes, each room instance owned by one node,
sockets on any node. In-process nodes here; real ``verani serve`` processes in
test_cluster_processes.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import coredis
import pytest
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


async def test_the_http_api_and_the_runtime_handle_reach_a_room_owned_elsewhere(
    redis_url: str, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    from verani import ServerConfig
    from verani.remote import AsyncRoomsClient

    config = ServerConfig(api_token="t0ken")
    with trio.fail_after(30):
        async with nodes(counter_rooms, redis_url, "a", "b", config=config) as (a, b):
            async with connect(a.url, user_id="ann") as ann:  # a owns counter/default
                await ann.next_event("counter:sync")
                assert a.supervisor.cluster.epoch_of("counter", "default")
                base = b.url.replace("ws://", "http://")
                async with AsyncRoomsClient(base, "t0ken") as api:
                    sent = await api.emit("counter", "default", "news", {"n": 1})
                    assert sent == 1
                    assert (await ann.next_event("news"))[1]["n"] == 1
                    assert await b.room("counter").get_connected_user_ids() == ["ann"]
                    await b.room("counter").emit_to_user("ann", "hi", {"from": "b"})
                    assert (await ann.next_event("hi"))[1]["from"] == "b"
                    # A Python function cannot travel: it runs only on the owner.
                    from verani.errors import RoomNotFoundError

                    with pytest.raises(RoomNotFoundError, match="owned by another node"):
                        await b.room("counter").call(lambda actor: actor.get_session_count())
                    rooms = await api.rooms()
                    assert [r["owner"]["node"] for r in rooms] == ["a"]
                    report = await api.inspect("counter", "default")
                    assert report["owner"]["node"] == "a" and report["sessions"] == {"a": 1}
                    # Hibernate through b's API: the owner a hibernates and lets the room go.
                    await api.hibernate("counter", "default")
                    assert await owner_of(redis_url, "counter", "default") is None


async def test_a_session_recovers_on_another_node(redis_url: str) -> None:
    from verani.client import open_client
    from verani.loader import load_rooms

    from helpers import ROOMS

    rooms = load_rooms([ROOMS / "presence.py"])
    with trio.fail_after(30):
        async with nodes(rooms, redis_url, "a", "b") as (a, b):
            async with connect(a.url, "/ws/presence", user_id="ann") as ann:  # a owns it
                await ann.next_event("presence:update")
                # bob's phone on node b drops without a close, and comes back through node a.
                async with open_client(
                    f"{b.url}/ws/presence?userId=bob", recover=True, ping_interval=0
                ) as bob:
                    await bob.wait_for_connection()
                    assert (await bob.receive("presence:update"))["online"] == ["ann", "bob"]
                    assert (await ann.next_event("presence:update"))[1]["online"] == [
                        "ann",
                        "bob",
                    ]
                    token = bob._token
                    offset = bob._offset
                    assert token is not None
                    assert bob._ws is not None
                    await trio.aclose_forcefully(bob._ws._stream)
                    bob.disconnect()
                query = f"userId=bob&recover={token}&offset={offset}"
                async with connect(a.url, f"/ws/presence?{query}") as again:
                    hello = await again.next_event("verani:session")
                    assert hello[1]["recovered"] is True
                    # Nobody saw bob leave and come back: ann got no update meanwhile.
                    with trio.move_on_after(0.5):
                        extra = await ann.next_event("presence:update")
                        raise AssertionError(f"presence flickered: {extra}")
                # bob leaves for good (a clean close): now ann is told.
                assert (await ann.next_event("presence:update"))[1]["online"] == ["ann"]


async def test_a_due_schedule_wakes_its_sleeping_room_on_exactly_one_node(redis_url: str) -> None:
    from verani import RoomContext, define_room
    from verani.cluster.redis_store import RedisStore

    room = define_room(name="alarm", state={"rung": 0}, persisted_keys=["rung"])

    @room.on("set")
    def set_alarm(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.schedule(1.0, "ring")

    @room.on_schedule("ring")
    def ring(ctx: Any, data: Any) -> None:
        ctx.actor.room_state.rung += 1

    with trio.fail_after(30):
        async with nodes([room], redis_url, "a", "b", "c") as servers:
            async with connect(servers[0].url, "/ws/alarm") as client:
                await client.emit("set")
                while await owner_of(redis_url, "alarm", "default") is None:
                    await trio.sleep(0.05)
            # Asleep everywhere, its schedule in Redis' index of due times.
            assert await servers[1].hibernate("alarm", "default") == [("alarm", "default", None)]
            assert await owner_of(redis_url, "alarm", "default") is None
            store = RedisStore.from_url(redis_url)
            async with store:
                while True:
                    doc = await store.load("alarm", "default")
                    assert doc is not None
                    if doc.state.get("rung") and not doc.schedules:
                        break
                    await trio.sleep(0.1)
                await trio.sleep(1.5)  # every node's waker looked again meanwhile
                doc = await store.load("alarm", "default")
                assert doc is not None and doc.state["rung"] == 1


async def test_channels_joined_on_one_owner_hold_under_the_next(redis_url: str) -> None:
    from verani.loader import load_rooms

    from helpers import ROOMS

    rooms = load_rooms([ROOMS / "channels.py"])
    with trio.fail_after(30):
        async with nodes(rooms, redis_url, "a", "b") as (a, b):
            async with (
                connect(a.url, "/ws/channels", user_id="ann") as ann,  # a owns the room
                connect(b.url, "/ws/channels", user_id="bo") as bo,
            ):
                await bo.emit("channels:join", {"channel": "news"})
                await bo.next_event("channels:joined")
                # The room moves: hibernated, then woken by bo's next event, on b this time.
                assert await a.hibernate("channels", "default") == [("channels", "default", None)]
                await bo.emit("channels:join", {"channel": "sport"})
                joined = await bo.next_event("channels:joined")
                assert b.supervisor.cluster.epoch_of("channels", "default")
                assert "news" in joined[1]["channels"]
                await ann.emit("channels:join", {"channel": "news"})
                await ann.next_event("channels:joined")
                await ann.emit("channels:message", {"channel": "news", "text": "hi"})
                message = await bo.next_event("channels:message")
                assert message[1]["text"] == "hi"


async def test_a_room_idle_with_a_socket_open_never_runs_twice_on_one_node(
    redis_url: str, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    key = ("counter", "default")
    with trio.fail_after(30):
        async with nodes(counter_rooms, redis_url, "a", idle_timeout=0.5) as (a,):
            supervisor = a.supervisor
            async with connect(a.url, user_id="u1") as c1:
                await c1.next_event("counter:sync")
                first = supervisor.instances[key]
                while first.running:  # hibernated, its socket still open
                    await trio.sleep(0.05)
                async with connect(a.url, user_id="u2") as c2:
                    await c2.next_event("counter:sync")
                    assert supervisor.instances[key] is first  # one instance, one actor
                    for client in (c1, c2, c1):
                        await client.emit("counter:increment", {"amount": 1})
                    assert [(await c2.next_event("counter:update"))[1]["count"] for _ in "123"] == [
                        1,
                        2,
                        3,
                    ]


async def test_a_socket_leaving_a_node_that_stopped_forwarding_still_leaves_the_room(
    redis_url: str, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(30):
        async with nodes(counter_rooms, redis_url, "a", "b") as (a, b):
            b.supervisor.cluster.forward_idle = 0.3
            async with connect(a.url, user_id="u1") as c1:  # a owns the room
                await c1.next_event("counter:sync")
                async with connect(b.url, user_id="u2") as c2:
                    await c2.next_event("counter:sync")
                    assert await a.room("counter").get_session_count() == 2
                    while b.supervisor.instances[("counter", "default")].running:
                        await trio.sleep(0.05)  # b forwards no more: idle
                while await a.room("counter").get_session_count() != 1:
                    await trio.sleep(0.05)
                assert a.supervisor.cluster.remote == {}


async def test_a_call_the_owner_never_answers_fails_the_call_not_the_server(
    redis_url: str, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    from verani.cluster import keys as cluster_keys
    from verani.errors import VeraniError

    with trio.fail_after(30):
        async with nodes(counter_rooms, redis_url, "a") as (a,):
            # A lease held by a node that is not there (paused, say): calls go to its inbox.
            client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
            async with client:
                await client.set(
                    cluster_keys.lease_key("counter", "default"), "ghost#1 7", px=60_000
                )
            with pytest.raises(VeraniError, match="did not answer"):
                await a.room("counter").get_session_count()
            # The node goes on: other rooms are served.
            async with connect(a.url, "/ws/counter/other", user_id="u1") as other:
                assert (await other.next_event("counter:sync"))[1]["count"] == 0


async def test_a_dropped_session_ends_on_time_though_its_room_moved_to_sleep(
    redis_url: str,
) -> None:
    from verani import Recovery
    from verani.loader import load_rooms

    from helpers import ROOMS

    rooms = load_rooms([ROOMS / "presence.py"])
    rooms[0].recovery = Recovery(max_disconnect=1.0)
    with trio.fail_after(30):
        async with nodes(rooms, redis_url, "a", "b") as (a, b):
            async with connect(a.url, "/ws/presence", user_id="ann") as ann:  # a owns it
                await ann.next_event("presence:update")
                async with connect(b.url, "/ws/presence", user_id="bo") as bo:
                    await bo.next_event("presence:update")
                    assert (await ann.next_event("presence:update"))[1]["online"] == ["ann", "bo"]
                    await trio.aclose_forcefully(bo.ws._stream)  # bo's network drops
                while not any(
                    s.detached for s in a.supervisor.instances[("presence", "default")].sessions
                ):
                    await trio.sleep(0.02)
                # The room goes to sleep with bo's session waiting in its document.
                assert await a.hibernate("presence", "default") == [("presence", "default", None)]
                # Its grace period ends: the room wakes and bo leaves (ann is told).
                assert (await ann.next_event("presence:update"))[1]["online"] == ["ann"]


async def test_a_broadcast_reaches_another_nodes_sockets_as_one_copy(
    redis_url: str, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(30):
        async with nodes(counter_rooms, redis_url, "a", "b") as (a, b):
            async with contextlib.AsyncExitStack() as stack:
                owner = await stack.enter_async_context(connect(a.url, user_id="ann"))
                await owner.next_event("counter:sync")  # a owns the room
                on_b = [
                    await stack.enter_async_context(connect(b.url, user_id=f"b{i}"))
                    for i in range(3)
                ]
                for client in on_b:
                    await client.next_event("counter:sync")
                for n in (1, 2):
                    await owner.emit("counter:increment", {"amount": 1})
                    for client in on_b:
                        assert (await client.next_event("counter:update"))[1]["count"] == n
                cluster = b.supervisor.cluster
                assert cluster is not None and cluster.stats["shared_frames"] >= 1
