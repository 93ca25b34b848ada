"""Checked by mypy in test_typing.py: lines marked E must be errors there, N notes."""

from __future__ import annotations

from typing import Any, reveal_type

import attrs

from verani import RoomContext, define_room


@attrs.define
class CounterState:
    count: int = 0
    last_updated_by: str | None = None


counter_room = define_room(name="counter", state=CounterState, persisted_keys=["count"])


@counter_room.on("counter:increment")
def increment(ctx: RoomContext[CounterState], data: Any) -> None:
    ctx.actor.room_state.count += 1
    ctx.actor.room_state.last_updated_by = ctx.meta.user_id
    _ = ctx.actor.room_state.foo  # E: "CounterState" has no attribute "foo"
    ctx.actor.room_state.count = "many"  # E: Incompatible types in assignment
    ctx.actor.emit.to("default").emit("counter:update", {"count": ctx.actor.room_state.count})


def actor_state_is_typed_from_the_definition() -> None:
    state: CounterState = counter_room.state_spec.new()
    reveal_type(counter_room)  # N: RoomDefinition[room_state_typos.CounterState]
    assert state.count == 0
