"""Recovery logs are committed as what changed (issue: whole logs per frame): the frames a
session got since the last commit and which of its old ones are no longer kept, on every store,
reassembling exactly the log a whole-log save writes; old journal records and the Redis layout
before still read."""

from __future__ import annotations

import gc
import pathlib
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import trio

from faults import FaultyStore
from test_recovery import Raw, name, raw
from verani import Recovery, RoomContext, ServerConfig, define_room, open_server
from verani.cluster import keys
from verani.cluster.redis_store import RedisStore
from verani.errors import StoreError
from verani.recovery import SessionLog
from verani.sessions import ConnectionMeta
from verani.store import FileStore, MemoryStore, Store
from verani.store.base import Changes, JSONValue
from verani.store.journal import read_segment

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

ROOM, INSTANCE = "chat", "lobby"
CONFIG = Recovery(max_frames=5, max_bytes=400)


@pytest.fixture(autouse=True)
def _collect_leaked_streams() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture(params=["memory", "file", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "file":
        file_store = FileStore(tmp_path / "files")
        yield file_store
        await file_store.aclose()
    else:
        url = request.getfixturevalue("redis_url")
        async with RedisStore.from_url(url) as redis_store:
            yield redis_store


def frame(text: str) -> bytes:
    return orjson.dumps({"type": "event", "channel": "default", "data": {"t": text}})


class Sessions:
    """Recoverable sessions as an actor keeps them, committed as the actor does."""

    def __init__(self, n: int) -> None:
        self.logs = {f"tok{i}": SessionLog(CONFIG, f"tok{i}") for i in range(n)}
        self.metas = {t: ConnectionMeta(f"u{t}", f"c{t}", ["default"]) for t in self.logs}
        self.deleted: list[str] = []

    def send(self, text: str, *tokens: str) -> None:
        for token in tokens or list(self.logs):
            self.logs[token].number(frame(text))

    def changes(self) -> tuple[Changes, list[Any]]:
        put: dict[str, JSONValue] = {}
        frames: dict[str, JSONValue] = {}
        marks = []
        for token, log in self.logs.items():
            p, delta, mark = log.changes(self.metas[token])
            if p is not None:
                put[token] = p
            if delta is not None:
                frames[token] = delta
            marks.append((log, mark))
        changes = Changes(recovery_put=put, recovery_frames=frames, recovery_delete=self.deleted)
        self.deleted = []
        return changes, marks

    async def commit(self, store: Store) -> Changes:
        changes, marks = self.changes()
        await store.commit(ROOM, INSTANCE, changes)
        for log, mark in marks:
            log.stored = mark
        return changes

    def end(self, token: str) -> None:
        del self.logs[token]
        self.deleted.append(token)

    def whole(self) -> dict[str, JSONValue]:
        return {t: log.encode(self.metas[t]) for t, log in self.logs.items()}


async def whole_save(store: Store, recovery: dict[str, JSONValue]) -> dict[str, JSONValue]:
    """What a whole-log save of ``recovery`` reads back as (another instance)."""
    await store.save(ROOM, "whole", {}, recovery=recovery)
    doc = await store.load(ROOM, "whole")
    assert doc is not None
    return doc.recovery


async def check(store: Store, sessions: Sessions) -> None:
    doc = await store.load(ROOM, INSTANCE)
    assert doc is not None
    expected = sessions.whole()
    assert doc.recovery == expected
    assert doc.recovery == await whole_save(store, expected)


async def test_commits_append_and_trim_to_exactly_the_whole_log(store: Store) -> None:
    sessions = Sessions(3)
    await store.save(ROOM, INSTANCE, {"n": 1})
    changes = await sessions.commit(store)
    assert set(changes.recovery_put) == {"tok0", "tok1", "tok2"}  # new: their non-frame part
    await check(store, sessions)
    for i in range(12):  # past max_frames: old frames are dropped
        sessions.send(f"m{i}")
        changes = await sessions.commit(store)
        # Only the frame of this turn, never the whole log.
        for delta in changes.recovery_frames.values():
            assert isinstance(delta, dict) and delta["add"] == [[i + 1, delta["add"][0][1]]]  # type: ignore[index]
        await check(store, sessions)
    assert [o for o, _ in sessions.logs["tok0"].frames] == [8, 9, 10, 11, 12]
    # Several frames in one commit, to some sessions only; one frame too big to keep (all
    # frames dropped); a detach (only the non-frame part changes).
    sessions.send("a", "tok0")
    sessions.send("b", "tok0", "tok1")
    sessions.send("x" * 500, "tok2")
    sessions.logs["tok1"].expires = 1234.5
    await sessions.commit(store)
    await check(store, sessions)
    assert sessions.logs["tok2"].frames == type(sessions.logs["tok2"].frames)()
    sessions.logs["tok0"].close_code = 1001
    changes = await sessions.commit(store)
    assert set(changes.recovery_put) == {"tok0"} and changes.recovery_frames["tok0"] == {
        "from": 10,
        "add": [],
    }
    await check(store, sessions)
    sessions.send("after", "tok2")
    await sessions.commit(store)
    await check(store, sessions)
    # Nothing changed: nothing to write.
    assert not (await sessions.commit(store))
    # A session ends; a new one starts.
    sessions.end("tok1")
    sessions.logs["new"] = SessionLog(CONFIG, "new")
    sessions.metas["new"] = ConnectionMeta("unew", "cnew", ["a", "b"])
    sessions.send("hi")
    await sessions.commit(store)
    await check(store, sessions)
    doc = await store.load(ROOM, INSTANCE)
    assert doc is not None and doc.state == {"n": 1}
    if isinstance(store, RedisStore):
        fields = await store.client.hkeys(keys.doc_key(ROOM, INSTANCE))
        # Every kept frame in a field of its own; none left of what is no longer kept.
        frames = sorted(bytes(f).decode() for f in fields if bytes(f).startswith(b"rf:"))
        expected = sorted(f"rf:{t}:{o}" for t, log in sessions.logs.items() for o, _ in log.frames)
        assert frames == expected


async def test_a_failed_commit_is_carried_again_and_a_repeated_one_changes_nothing(
    store: Store,
) -> None:
    sessions = Sessions(2)
    await sessions.commit(store)
    for i in range(4):
        sessions.send(f"m{i}")
    await sessions.commit(store)
    # A commit is made but "fails" (its marks are not kept): the next carries it again, with
    # what came since; the store may have stored it or not (a reply that never came).
    sessions.send("lost")
    lost, _ = sessions.changes()
    await store.commit(ROOM, INSTANCE, lost)
    for i in range(4):
        sessions.send(f"n{i}")
    retried = await sessions.commit(store)
    assert retried.recovery_frames["tok0"]["add"][0][0] == 5  # type: ignore[call-overload, index]
    await check(store, sessions)
    # The same commit applied twice (a retry of one that was stored): nothing more changes.
    sessions.send("twice")
    twice, marks = sessions.changes()
    await store.commit(ROOM, INSTANCE, twice)
    await store.commit(ROOM, INSTANCE, twice)
    for log, mark in marks:
        log.stored = mark
    await check(store, sessions)


async def test_a_checkpoint_between_commits_still_reassembles(store: Store) -> None:
    sessions = Sessions(2)
    await sessions.commit(store)
    sessions.send("a")
    await sessions.commit(store)
    sessions.send("b")
    sessions.send("c")
    # A whole rewrite (what a checkpoint writes) that already has frames the next commit
    # carries, since it is made from the room's state.
    await store.checkpoint(ROOM, INSTANCE, {}, recovery=sessions.whole())
    for i in range(6):
        sessions.send(f"m{i}")
    await sessions.commit(store)
    await check(store, sessions)


async def test_the_journal_replays_frames_after_a_restart(tmp_path: pathlib.Path) -> None:
    store = FileStore(tmp_path)
    sessions = Sessions(2)
    await sessions.commit(store)
    for i in range(8):
        sessions.send(f"m{i}")
        await sessions.commit(store)
    store._journal.close()  # a crash: no checkpoint
    peeked = await FileStore(tmp_path).peek(ROOM, INSTANCE)
    assert peeked is not None and peeked[0].recovery == sessions.whole()
    restarted = FileStore(tmp_path)
    try:
        await restarted.recover()
        doc = await restarted.load(ROOM, INSTANCE)
    finally:
        await restarted.aclose()
    assert doc is not None and doc.recovery == sessions.whole()


def old_record(seq: int, recovery_put: dict[str, Any]) -> bytes:
    """A journal record as verani wrote it before ``frames``: whole logs in ``put``."""
    body = {
        "room": ROOM,
        "instance": INSTANCE,
        "seq": seq,
        "state": {"n": seq},
        "put": {},
        "delete": [],
        "recovery": {"put": recovery_put, "delete": []},
    }
    payload = orjson.dumps(body)
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


async def test_journal_records_of_the_old_shape_still_replay(tmp_path: pathlib.Path) -> None:
    sessions = Sessions(1)
    sessions.send("a")
    first = sessions.whole()
    sessions.send("b")
    second = sessions.whole()
    journal = tmp_path / "journal"
    journal.mkdir(parents=True)
    (journal / "00000001.wal").write_bytes(old_record(1, first) + old_record(2, second))
    records, stopped, _ = read_segment((journal / "00000001.wal").read_bytes())
    assert stopped is None and [dict(r.changes.recovery_frames) for r in records] == [{}, {}]
    store = FileStore(tmp_path)
    try:
        await store.recover()
        doc = await store.load(ROOM, INSTANCE)
        assert doc is not None and doc.recovery == second and doc.state == {"n": 2}
        # And commits of the new shape go on from it.
        log = sessions.logs["tok0"]
        log.stored = (log.encode_meta(sessions.metas["tok0"]), log.first, log.offset)
        sessions.send("c")
        changes = await sessions.commit(store)
        assert changes.recovery_frames["tok0"] == {
            "from": 1,
            "add": [[3, log.frames[-1][1].decode()]],
        }
        doc = await store.load(ROOM, INSTANCE)
        assert doc is not None and doc.recovery == sessions.whole()
    finally:
        await store.aclose()


async def test_a_redis_document_of_the_layout_before_reads_and_is_rewritten(
    redis_url: str,
) -> None:
    sessions = Sessions(2)
    for i in range(7):
        sessions.send(f"m{i}")
    whole = sessions.whole()
    meta = {
        "format": "verani.room",
        "version": 5,
        "room": ROOM,
        "instance": INSTANCE,
        "saved_at": "2030-01-01T00:00:00Z",
        "seq": 0,
    }
    fields: dict[str, bytes] = {"meta": orjson.dumps(meta), "s:n": b"1"}
    fields |= {f"r:{t}": orjson.dumps(v) for t, v in whole.items()}  # whole, frames inside
    async with RedisStore.from_url(redis_url) as store:
        key = keys.doc_key(ROOM, INSTANCE)
        await store.client.hset(key, fields)  # type: ignore[arg-type]
        found = await store.peek(ROOM, INSTANCE)
        assert found is not None and found[0].recovery == whole
        assert await store.client.hget(key, "rr:tok0") is None  # a peek never writes
        doc = await store.load(ROOM, INSTANCE)
        assert doc is not None and doc.recovery == whole and doc.state == {"n": 1}
        # Rewritten in the new layout: frames in fields of their own.
        part = orjson.loads(await store.client.hget(key, "r:tok0"))  # type: ignore[arg-type]
        assert "frames" not in part
        assert await store.client.hget(key, "rr:tok0") == b"3"
        # Commits go on from it.
        for log in sessions.logs.values():
            log.stored = (log.encode_meta(sessions.metas[log.token]), log.first, log.offset)
        sessions.send("more")
        await sessions.commit(store)
        await check(store, sessions)


# --- a room: a broadcast commits only the new frames ------------------------------------------


class Recording(MemoryStore):
    """The memory store, keeping every commit it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[Changes] = []

    async def commit(self, room: str, instance: str, changes: Changes) -> None:
        self.commits.append(changes)
        await super().commit(room, instance, changes)


async def test_a_broadcast_commits_each_sessions_new_frame_only(autojump_clock: Any) -> None:
    room = define_room(name="chat", recovery=Recovery(max_frames=3))

    @room.on("say")
    def say(ctx: RoomContext[Any], data: dict[str, Any]) -> None:
        ctx.actor.emit.emit("said", {"text": data["text"]})

    store = Recording()
    config = ServerConfig(ping_interval=0)
    async with open_server([room], store=store, config=config) as server:
        async with raw(server.url, "userId=a") as a, raw(server.url, "userId=b") as b:
            clients: list[Raw] = [a, b]
            for client in clients:
                assert name(await client.frame()) == "verani:session"
            for i in range(6):
                del store.commits[:]
                await a.say(f"m{i}")
                for client in clients:
                    said = await client.frame()
                    assert said["data"]["text"] == f"m{i}"
                await trio.sleep(0.1)
                carried = [c for c in store.commits if c.recovery_frames]
                assert carried, store.commits
                for changes in carried:
                    for delta in changes.recovery_frames.values():
                        assert isinstance(delta, dict)
                        assert [o for o, _ in delta["add"]] == [i + 1]  # type: ignore[union-attr, misc]
                        assert delta["from"] == max(1, i - 1)
                    for part in changes.recovery_put.values():
                        assert isinstance(part, dict) and "frames" not in part
            doc = await store.load("chat", "r")
            assert doc is not None
            for log in doc.recovery.values():
                assert isinstance(log, dict)
                assert [o for o, _ in log["frames"]] == [4, 5, 6]  # type: ignore[union-attr, misc]


async def test_a_commit_that_failed_is_carried_again_by_the_room(tmp_path: pathlib.Path) -> None:
    room = define_room(name="chat", recovery=Recovery(max_frames=3))

    @room.on("say")
    def say(ctx: RoomContext[Any], data: dict[str, Any]) -> None:
        ctx.actor.emit.emit("said", {"text": data["text"]})

    store = FaultyStore(tmp_path)
    config = ServerConfig(ping_interval=0)
    async with open_server([room], store=store, config=config) as server:
        async with raw(server.url, "userId=a") as a, raw(server.url, "userId=b") as b:
            clients: list[Raw] = [a, b]
            for client in clients:
                assert name(await client.frame()) == "verani:session"

            async def said(*texts: str) -> None:
                for text in texts:
                    await a.say(text)
                for client in clients:
                    for text in texts:
                        assert (await client.frame())["data"]["text"] == text

            await said("m0")
            # The commits of m1 and m2 fail (nothing stored) and are retried.
            store.fail_saves(StoreError("the disk is full"), times=3)
            await said("m1", "m2")
            await said("m3", "m4")
            found = await store.peek("chat", "r")
            assert found is not None
            logs = found[0].recovery
            assert len(logs) == 2
            for log in logs.values():
                assert isinstance(log, dict)
                frames = [(o, orjson.loads(f)["data"]["text"]) for o, f in log["frames"]]  # type: ignore[union-attr, misc, arg-type]
                assert frames == [(3, "m2"), (4, "m3"), (5, "m4")]
