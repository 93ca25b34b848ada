"""A room for the revive benchmark: the counter's events, plus a list of persisted strings that
makes the stored document as big as the case needs (1 KB, 1 MB). Served next to
``rooms/counter.py`` by ``verani serve``; never collected by pytest."""

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
