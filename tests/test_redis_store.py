"""The Redis store and leases on a real redis-server (tests/redis_server.py): the store contract,
fencing between two owners of one instance, and Redis going away and coming back."""

from __future__ import annotations

import datetime
import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import coredis
import orjson
import pytest
import trio

from redis_server import RedisServer
from verani.cluster import keys, lease
from verani.cluster.redis_store import RedisStore
from verani.errors import (
    CorruptDocumentError,
    FencedError,
    LeaseLostError,
    StoreError,
    StoreUnavailableError,
)
from verani.store import FORMAT_VERSION, Store
from verani.store.base import Changes

STATE: dict[str, Any] = {
    "count": 3,
    "big": 2**62,
    "negative_big": -(2**63),
    "sum": 0.1 + 0.2,
    "tiny": 5e-324,
    "name": "zoë ✓",
    "flags": [True, False, None],
    "nested": {"items": [{"id": 1}, {"id": 2}], "empty": {}},
}
SCHEDULES: dict[str, Any] = {
    "a": {"due": "2030-01-01T00:00:05+00:00", "event": "tick"},
    "b": {"due": "2030-01-01T00:00:01.250000+00:00", "event": "tock"},
}
EARLIEST = datetime.datetime(2030, 1, 1, 0, 0, 1, 250000, tzinfo=datetime.UTC)

# coredis (6.9) leaks the anyio memory streams of a connection that fails to connect: they warn
# (ResourceWarning) when collected, which the project's warnings-as-errors would pin on whatever
# test runs then. Here they are ignored, and collected before each test ends.
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(autouse=True)
def _collect_leaked_streams() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with RedisStore.from_url(redis_url) as opened:
        yield opened


# --- the store contract -----------------------------------------------------------------------


async def test_round_trip_keeps_numbers_exact(store: RedisStore) -> None:
    assert isinstance(store, Store)
    before = datetime.datetime.now(datetime.UTC)
    await store.save(
        "chat",
        "lobby",
        STATE,
        {"k": 2**62, "f": 0.1 + 0.2},
        schedules=SCHEDULES,
        recovery={"tok": {"offset": 7}},
    )
    doc = await store.load("chat", "lobby")
    assert doc is not None
    assert doc.state == STATE
    assert doc.state["big"] == 2**62 and doc.state["sum"] == 0.30000000000000004
    assert doc.storage == {"k": 2**62, "f": 0.1 + 0.2}
    assert doc.schedules == SCHEDULES
    assert doc.recovery == {"tok": {"offset": 7}}
    assert (doc.room, doc.instance, doc.format_version) == ("chat", "lobby", FORMAT_VERSION)
    assert before <= doc.saved_at <= datetime.datetime.now(datetime.UTC)
    assert doc.saved_at.utcoffset() == datetime.timedelta(0)
    assert store.saves == 1


async def test_commits_of_many_rooms_at_once_go_out_together_and_survive_a_script_flush(
    store: RedisStore,
) -> None:
    await store.commit("chat", "r0", Changes(state={"n": 0}))
    await store.client.script_flush()  # as after a restart of Redis: the script is gone
    before = store.writes
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(store.commit, "chat", f"r{i}", Changes(state={"n": i + 1}))
    for i in range(20):
        doc = await store.load("chat", f"r{i}")
        assert doc is not None and doc.state == {"n": i + 1}
    # One round trip for the first commit (and one to find the script gone), one for the 19
    # that queued behind it, give or take one.
    assert store.writes - before <= 4


async def test_load_of_nothing_is_none(store: RedisStore) -> None:
    assert await store.load("chat", "lobby") is None
    assert await store.peek("chat", "lobby") is None


async def test_layout_is_one_hash_of_json_fields(store: RedisStore) -> None:
    await store.save("chat", "lobby", {"count": 1}, {"s": "x"}, recovery={"t1": {"o": 1}})
    raw = await store.client.hgetall(keys.doc_key("chat", "lobby"))
    assert set(raw) == {b"meta", b"s:count", b"t:s", b"schedules", b"r:t1"}
    meta = orjson.loads(raw[b"meta"])
    assert meta["format"] == "verani.room" and meta["version"] == FORMAT_VERSION
    assert raw[b"s:count"] == b"1"
    assert await store.client.smembers(keys.INSTANCES) == {b"chat/lobby"}


async def test_save_replaces_the_whole_document(store: RedisStore) -> None:
    await store.save("chat", "lobby", {"a": 1, "b": 2}, {"x": 1})
    await store.save("chat", "lobby", {"a": 3})
    doc = await store.load("chat", "lobby")
    assert doc is not None
    assert (doc.state, doc.storage) == ({"a": 3}, {})


async def test_commit_writes_changes_only(store: RedisStore) -> None:
    await store.save("chat", "lobby", {"a": 1, "b": 2}, {"x": 1, "y": 2}, recovery={"t1": 1})
    await store.commit(
        "chat",
        "lobby",
        Changes(
            state={"b": 20},
            storage_put={"z": 3},
            storage_delete=["x"],
            recovery_put={"t2": 2},
            recovery_delete=["t1"],
        ),
    )
    doc = await store.load("chat", "lobby")
    assert doc is not None
    assert doc.state == {"a": 1, "b": 20}
    assert doc.storage == {"y": 2, "z": 3}
    assert doc.recovery == {"t2": 2}
    # A commit to an instance with no document yet makes one.
    await store.commit("chat", "new", Changes(state={"n": 1}))
    fresh = await store.load("chat", "new")
    assert fresh is not None and fresh.state == {"n": 1} and fresh.schedules == {}


async def test_delete_and_list_instances(store: RedisStore) -> None:
    assert await store.list_instances() == []
    long_name = "é" * 200  # hashed in member strings: listed from its document's meta
    for room, instance in [("chat", "b"), ("chat", "a/b"), ("poll", "x"), ("chat", long_name)]:
        await store.save(room, instance, {"n": 1})
    assert await store.list_instances() == sorted(
        [("chat", "a/b"), ("chat", "b"), ("chat", long_name), ("poll", "x")]
    )
    assert await store.list_instances("poll") == [("poll", "x")]
    assert await store.delete("chat", "b") is True
    assert await store.delete("chat", "b") is False
    assert await store.load("chat", "b") is None
    assert ("chat", "b") not in await store.list_instances()
    with pytest.raises(ValueError):
        await store.list_instances("bad room")
    with pytest.raises(ValueError):
        await store.load("chat", "")


async def test_state_that_is_not_json_is_a_type_error(store: RedisStore) -> None:
    with pytest.raises(TypeError, match="chat/lobby"):
        await store.save("chat", "lobby", {"big": 2**70})
    assert await store.load("chat", "lobby") is None


async def test_due_index_follows_schedules_and_reloads(store: RedisStore, redis_url: str) -> None:
    await store.save("chat", "lobby", {}, schedules=SCHEDULES)
    assert store.due_times() == {("chat", "lobby"): EARLIEST}
    # Another node (another store on the same Redis) sees it once it refreshes.
    async with RedisStore.from_url(redis_url) as other:
        assert other.due_times() == {}
        await other.refresh_due_times()
        assert other.due_times() == {("chat", "lobby"): EARLIEST}
        await store.commit("chat", "lobby", Changes(schedules={}))
        assert store.due_times() == {}
        await other.refresh_due_times()
        assert other.due_times() == {}
        # Changes without schedules leave the index alone.
        await store.commit("chat", "lobby", Changes(schedules={"a": SCHEDULES["a"]}))
        await store.commit("chat", "lobby", Changes(state={"n": 1}))
        await other.recover()
        five = datetime.datetime(2030, 1, 1, 0, 0, 5, tzinfo=datetime.UTC)
        assert other.due_times() == {("chat", "lobby"): five}
    await store.delete("chat", "lobby")
    assert store.due_times() == {}
    assert await store.client.zrange(keys.DUE, 0, -1) == ()


async def test_old_format_versions_are_migrated_on_read(store: RedisStore) -> None:
    meta = {
        "format": "verani.room",
        "version": 1,
        "room": "chat",
        "instance": "lobby",
        "saved_at": "2025-01-31T12:00:00Z",
    }
    await store.client.hset(
        keys.doc_key("chat", "lobby"), {"meta": orjson.dumps(meta), "s:count": b"4"}
    )
    doc = await store.load("chat", "lobby")
    assert doc is not None
    assert doc.format_version == 1
    assert (doc.state, doc.storage, doc.seq, doc.schedules, doc.recovery) == (
        {"count": 4},
        {},
        0,
        {},
        {},
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"s:count": b"1"},
        {"meta": b"not json"},
        {"meta": b"[]"},
        {"meta": orjson.dumps({"format": "verani.room", "version": 99})},
        {"meta": orjson.dumps({"format": "verani.room", "version": 5, "room": "other"})},
    ],
    ids=["no-meta", "meta-not-json", "meta-not-object", "newer-version", "wrong-room"],
)
async def test_corrupt_document_is_moved_aside(store: RedisStore, fields: dict[str, bytes]) -> None:
    await store.save("chat", "lobby", {"count": 1})
    key = keys.doc_key("chat", "lobby")
    await store.client.delete([key])
    await store.client.hset(key, fields)
    with pytest.raises(CorruptDocumentError, match="moved it to verani:"):
        await store.load("chat", "lobby")
    assert await store.load("chat", "lobby") is None
    assert await store.list_instances() == []
    aside = list(await store.client.keys("verani:*:corrupt:*"))
    assert len(aside) == 1
    assert await store.client.hgetall(aside[0]) == {k.encode(): v for k, v in fields.items()}


async def test_a_value_that_is_not_json_is_corruption(store: RedisStore) -> None:
    await store.save("chat", "lobby", {"count": 1})
    await store.client.hset(keys.doc_key("chat", "lobby"), {"s:count": b"{"})
    with pytest.raises(CorruptDocumentError, match="s:count"):
        await store.peek("chat", "lobby")  # peek never moves it
    assert await store.client.exists([keys.doc_key("chat", "lobby")]) == 1
    with pytest.raises(CorruptDocumentError):
        await store.load("chat", "lobby")
    assert await store.load("chat", "lobby") is None


async def test_set_aside_copies_and_keeps_the_document(store: RedisStore) -> None:
    assert await store.set_aside("chat", "lobby", "nothing there") is None
    await store.save("chat", "lobby", {"count": 1})
    first = await store.set_aside("chat", "lobby", "keys no longer read back")
    second = await store.set_aside("chat", "lobby", "again")
    assert first is not None and second is not None and first != second
    assert first.startswith("verani:{chat/lobby}:corrupt:")
    assert await store.client.hget(first, "s:count") == b"1"
    doc = await store.load("chat", "lobby")
    assert doc is not None and doc.state == {"count": 1}


async def test_peek_reports_the_size(store: RedisStore) -> None:
    await store.save("chat", "lobby", {"count": 1})
    found = await store.peek("chat", "lobby")
    assert found is not None
    assert found[0].state == {"count": 1} and found[1] > 0


# --- leases and fencing -----------------------------------------------------------------------


async def test_acquire_renew_release(store: RedisStore) -> None:
    client = store.client
    a, b = lease.holder_for("node-a"), lease.holder_for("node-b")
    assert await lease.owner(client, "chat", "lobby") is None
    assert await lease.acquire(client, "chat", "lobby", a, 10_000) == lease.Acquired(True, a, 1)
    # Again by the same holder: extended, same epoch; by another: refused, told who holds it.
    assert await lease.acquire(client, "chat", "lobby", a, 10_000) == lease.Acquired(True, a, 1)
    assert await lease.acquire(client, "chat", "lobby", b, 10_000) == lease.Acquired(False, a, 1)
    assert await lease.owner(client, "chat", "lobby") == (a, 1)
    got = await lease.acquire(client, "chat", "other", a, 10_000)
    assert got.ok and got.epoch == 1
    assert await lease.renew(client, [("chat", "lobby", 1), ("chat", "other", 1)], a, 5000) == [
        True,
        True,
    ]
    assert await lease.renew(client, [("chat", "lobby", 1)], b, 5000) == [False]
    assert await lease.renew(client, [("chat", "lobby", 2)], a, 5000) == [False]
    assert await lease.renew(client, [], a, 5000) == []
    assert 0 < await client.pttl(keys.lease_key("chat", "lobby")) <= 5000
    # Only the holder at its epoch releases it.
    assert await lease.release(client, "chat", "lobby", b, 1) is False
    assert await lease.release(client, "chat", "lobby", a, 2) is False
    assert await lease.release(client, "chat", "lobby", a, 1) is True
    assert await lease.owner(client, "chat", "lobby") is None
    assert await lease.renew(client, [("chat", "lobby", 1)], a, 5000) == [False]
    # The next owner takes a newer epoch.
    assert await lease.acquire(client, "chat", "lobby", b, 10_000) == lease.Acquired(True, b, 2)


async def test_a_restarted_node_gets_a_new_incarnation_and_epoch(store: RedisStore) -> None:
    before, after = lease.holder_for("node-a"), lease.holder_for("node-a")
    assert before != after and before.startswith("node-a#")
    assert (await lease.acquire(store.client, "chat", "lobby", before, 10_000)).epoch == 1
    # The restarted process cannot take over its old self's lease (it waits for expiry)...
    got = await lease.acquire(store.client, "chat", "lobby", after, 10_000)
    assert (got.ok, got.holder) == (False, before)
    # ...and once it has expired, it writes at a new epoch, never the old one.
    await store.client.delete([keys.lease_key("chat", "lobby")])
    assert await lease.acquire(store.client, "chat", "lobby", after, 10_000) == lease.Acquired(
        True, after, 2
    )
    with pytest.raises(ValueError):
        lease.holder_for("bad id")


async def test_fencing_refuses_the_old_owner(redis_url: str) -> None:
    a, b = lease.holder_for("node-a"), lease.holder_for("node-b")
    epochs: dict[str, dict[tuple[str, str], int]] = {a: {}, b: {}}

    def fence_of(holder: str) -> Any:
        return lambda room, instance: epochs[holder].get((room, instance))

    async with (
        RedisStore.from_url(redis_url, fence=fence_of(a)) as store_a,
        RedisStore.from_url(redis_url, fence=fence_of(b)) as store_b,
    ):
        got = await lease.acquire(store_a.client, "chat", "lobby", a, 100)
        assert got == lease.Acquired(True, a, 1)
        epochs[a]["chat", "lobby"] = got.epoch
        await store_a.save("chat", "lobby", {"writer": "a", "n": 1})
        await store_a.commit("chat", "lobby", Changes(state={"n": 2}))

        await trio.sleep(0.15)  # A's lease expires (real time: Redis keeps it)
        assert await lease.owner(store_b.client, "chat", "lobby") is None
        assert await lease.renew(store_a.client, [("chat", "lobby", 1)], a, 100) == [False]
        got = await lease.acquire(store_b.client, "chat", "lobby", b, 10_000)
        assert got == lease.Acquired(True, b, 2)
        epochs[b]["chat", "lobby"] = got.epoch
        await store_b.commit("chat", "lobby", Changes(state={"writer": "b"}))

        # A still thinks it owns the room: every write it tries is refused, nothing changes.
        message = (
            "this node no longer owns room chat/lobby: a newer owner holds epoch 2 (ours: 1);"
            " it stops serving the room"
        )
        with pytest.raises(FencedError) as caught:
            await store_a.commit("chat", "lobby", Changes(state={"writer": "a", "n": 3}))
        assert str(caught.value) == message
        assert (caught.value.ours, caught.value.theirs) == (1, 2)
        assert isinstance(caught.value, StoreError)
        with pytest.raises(FencedError):
            await store_a.save("chat", "lobby", {"writer": "a"})
        with pytest.raises(FencedError):
            await store_a.delete("chat", "lobby")
        doc = await store_a.load("chat", "lobby")
        assert doc is not None and doc.state == {"writer": "b", "n": 2}

        # A node that knows it lost the instance does not even ask Redis.
        del epochs[a]["chat", "lobby"]
        with pytest.raises(LeaseLostError, match="no longer owns room chat/lobby"):
            await store_a.commit("chat", "lobby", Changes(state={"n": 4}))

        # An unfenced store (tools) writes whatever the epoch.
        async with RedisStore.from_url(redis_url) as tool:
            await tool.commit("chat", "lobby", Changes(state={"n": 5}))
        await store_b.delete("chat", "lobby")
        assert await store_b.load("chat", "lobby") is None


# --- Redis going away -------------------------------------------------------------------------


async def test_redis_down_is_a_store_error_naming_the_instance(
    redis_server: RedisServer,
) -> None:
    async with RedisStore.from_url(redis_server.url, connect_timeout=1) as store:
        await store.save("chat", "lobby", {"n": 1})
        await trio.to_thread.run_sync(redis_server.stop)
        with pytest.raises(StoreUnavailableError) as caught:
            await store.commit("chat", "lobby", Changes(state={"n": 2}))
        message = str(caught.value)
        assert "room 'chat' instance 'lobby'" in message
        assert redis_server.url in message
        assert isinstance(caught.value, StoreError)
        with pytest.raises(StoreUnavailableError, match="lobby"):
            await store.load("chat", "lobby")
        with pytest.raises(StoreUnavailableError):
            await store.list_instances()
        with pytest.raises(StoreUnavailableError, match="lease of room chat/lobby"):
            await lease.acquire(store.client, "chat", "lobby", lease.holder_for("a"), 1000)

        await trio.to_thread.run_sync(redis_server.start)
        await store.commit("chat", "lobby", Changes(state={"n": 3}))
        doc = await store.load("chat", "lobby")
        assert doc is not None and doc.state == {"n": 3}


async def test_a_store_that_is_not_open_says_so(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    with pytest.raises(StoreError, match="not open"):
        await store.load("chat", "lobby")
    await store.aclose()


async def test_a_callers_client_and_wait_for_replicas(redis_url: str) -> None:
    client: coredis.Redis[Any] = coredis.Redis.from_url(redis_url, decode_responses=False)
    async with client:
        store = RedisStore(client)
        await store.save("chat", "lobby", {"n": 1})
        assert await client.exists([keys.doc_key("chat", "lobby")]) == 1
        await store.aclose()  # not its client: still usable
        assert await client.ping() == b"PONG"
        # No replica exists: a store that wants one fails the write, naming the instance.
        waiting = RedisStore(client, wait_replicas=1, wait_timeout_ms=50)
        with pytest.raises(StoreError, match="fewer than 1 replicas"):
            await waiting.commit("chat", "lobby", Changes(state={"n": 2}))
