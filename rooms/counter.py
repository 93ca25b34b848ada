"""The counter room of Verani's State Persistence example, in Python.

The count survives hibernation and restarts: disconnect, wait for the room to hibernate (or run
``verani hibernate counter``, or restart the server), reconnect, and the count is still there.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from verani import ClientError, RoomContext, define_room

log = logging.getLogger("rooms.counter")


@attrs.define
class CounterState:
    count: int = 0
    last_updated_by: str | None = None


def report_persist_error(key: str, error: BaseException) -> None:
    log.error("Failed to persist %r: %s", key, error)


counter_room = define_room(
    name="counter",
    websocket_path="/ws/counter",
    state=CounterState,
    # Only these keys are persisted; any other state key starts afresh after hibernation.
    persisted_keys=["count", "last_updated_by"],
    on_persist_error=report_persist_error,
)

Ctx = RoomContext[CounterState]

#: Largest |amount|: 2**53 - 1 is the largest integer a JavaScript number holds exactly.
MAX_AMOUNT = 2**53 - 1


def _amount(data: Any) -> int:
    amount = data.get("amount", 1) if isinstance(data, dict) else 1
    # Missing means 1, as the seed's `data?.amount ?? 1`; a non-integer amount is refused (the
    # sender gets verani:error with this message) rather than silently turning the count into
    # a float.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ClientError(f"amount must be an integer, not {amount!r}", code="bad_amount")
    if abs(amount) > MAX_AMOUNT:
        # Keeps the count a number JavaScript clients read exactly.
        raise ClientError(
            f"amount must be at most {MAX_AMOUNT} in size, not {amount}", code="bad_amount"
        )
    return amount


@counter_room.on_connect
def on_connect(ctx: Ctx) -> None:
    # Send the current count to the new connection.
    sync(ctx, None)


@counter_room.on("counter:increment")
def increment(ctx: Ctx, data: Any) -> None:
    state = ctx.actor.room_state
    state.count += _amount(data)
    state.last_updated_by = ctx.meta.user_id
    ctx.actor.emit.to("default").emit(
        "counter:update", {"count": state.count, "updatedBy": ctx.meta.user_id}
    )


@counter_room.on("counter:decrement")
def decrement(ctx: Ctx, data: Any) -> None:
    state = ctx.actor.room_state
    state.count -= _amount(data)
    state.last_updated_by = ctx.meta.user_id
    ctx.actor.emit.to("default").emit(
        "counter:update", {"count": state.count, "updatedBy": ctx.meta.user_id}
    )


@counter_room.on("counter:reset")
def reset(ctx: Ctx, data: Any) -> None:
    ctx.actor.room_state.count = 0
    ctx.actor.room_state.last_updated_by = ctx.meta.user_id
    ctx.actor.emit.to("default").emit("counter:reset", {"resetBy": ctx.meta.user_id})


@counter_room.on("counter:get")
def sync(ctx: Ctx, data: Any) -> None:
    ctx.emit.emit(
        "counter:sync",
        {
            "count": ctx.actor.room_state.count,
            "lastUpdatedBy": ctx.actor.room_state.last_updated_by,
        },
    )
