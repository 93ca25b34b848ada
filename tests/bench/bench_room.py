"""Rooms for the benchmarks, served next to ``rooms/counter.py`` by ``verani serve``; never
collected by pytest. Each speaks the counter's events (``counter:sync`` on connect,
``counter:increment`` answered by ``counter:update`` to every socket of the instance), so the one
load generator drives them all:

- ``bench`` (``/ws/bench``, the revive benchmark): the count, plus a list of persisted strings
  that makes the stored document as big as the case needs (1 KB, 1 MB), written by the harness;
- ``broadcast`` (``/ws/broadcast``, the broadcast benchmark): nothing persisted, so a turn is
  only its broadcast — a chat message to a big room, with no durable write to wait for;
- ``large`` (``/ws/large``, the large-state benchmark): ~1 MB persisted in one key, which the
  room fills itself on its first connect, and the count in another; a turn changes the count.
"""

from __future__ import annotations

from typing import Any

import attrs

from verani import RoomContext, define_room


@attrs.define
class BenchState:
    count: int = 0
    items: list[str] = attrs.Factory(list)


bench_room = define_room(
    name="bench", websocket_path="/ws/bench", state=BenchState, persisted_keys=["count", "items"]
)


@bench_room.on_connect
def sync(ctx: RoomContext[BenchState]) -> None:
    state = ctx.actor.room_state
    ctx.emit.emit("counter:sync", {"count": state.count, "items": len(state.items)})


@bench_room.on("counter:increment")
def increment(ctx: RoomContext[BenchState], data: Any) -> None:
    state = ctx.actor.room_state
    state.count += 1
    ctx.actor.emit.to("default").emit(
        "counter:update", {"count": state.count, "updatedBy": ctx.meta.user_id}
    )


def items_for(doc_bytes: int) -> list[str]:
    """Distinct 100-character strings making a document of about ``doc_bytes`` (each takes ~110
    bytes of indented JSON)."""
    return [f"{i:08d}" + "x" * 92 for i in range(max(1, doc_bytes // 110))]


@attrs.define
class BroadcastState:
    count: int = 0


broadcast_room = define_room(name="broadcast", websocket_path="/ws/broadcast", state=BroadcastState)


@broadcast_room.on_connect
def broadcast_sync(ctx: RoomContext[BroadcastState]) -> None:
    ctx.emit.emit("counter:sync", {"count": ctx.actor.room_state.count})


@broadcast_room.on("counter:increment")
def broadcast_increment(ctx: RoomContext[BroadcastState], data: Any) -> None:
    state = ctx.actor.room_state
    state.count += 1
    ctx.actor.emit.to("default").emit(
        "counter:update", {"count": state.count, "updatedBy": ctx.meta.user_id}
    )


#: What the large room keeps in its big key: about 1 MB of encoded JSON.
LARGE_BYTES = 1_000_000


@attrs.define
class LargeState:
    count: int = 0
    items: list[str] = attrs.Factory(list)


large_room = define_room(
    name="large", websocket_path="/ws/large", state=LargeState, persisted_keys=["count", "items"]
)


@large_room.on_connect
def large_sync(ctx: RoomContext[LargeState]) -> None:
    state = ctx.actor.room_state
    if not state.items:
        state.items = items_for(LARGE_BYTES)
    ctx.emit.emit("counter:sync", {"count": state.count, "items": len(state.items)})


@large_room.on("counter:increment")
def large_increment(ctx: RoomContext[LargeState], data: Any) -> None:
    state = ctx.actor.room_state
    state.count += 1
    ctx.actor.emit.to("default").emit(
        "counter:update", {"count": state.count, "updatedBy": ctx.meta.user_id}
    )
