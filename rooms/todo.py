"""A shared to-do list, written as plain Python changes its lists in place.

Nothing here assigns a state key: ``items.append(todo)``, ``todo.done = ...`` and
``del items[i]`` are changes made in place inside the persisted ``items``, and with the default
persist options each is tracked and saved before the frames of its turn leave the server. A client
is never shown an item that a crash could take back.

Client → server: ``todo:add {text}``, ``todo:toggle {id}``, ``todo:remove {id}``,
``todo:clear_done``.
Server → client: ``todo:list {items}`` (to the newcomer), ``todo:added {item}``,
``todo:updated {item}``, ``todo:removed {ids}`` (to everyone), ``error {code, message}`` (to the
sender of a bad request only). An item is ``{id, text, done}``.
"""

from __future__ import annotations

import secrets
from typing import Any

import attrs

from verani import RoomContext, define_room

MAX_TEXT_LENGTH = 500
MAX_ITEMS = 1000


@attrs.define
class Todo:
    id: str
    text: str
    done: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "done": self.done}


@attrs.define
class TodoState:
    items: list[Todo] = attrs.Factory(list)


todo_room = define_room(
    name="todo", websocket_path="/ws/todo", state=TodoState, persisted_keys=["items"]
)

Ctx = RoomContext[TodoState]


def _reject(ctx: Ctx, code: str, message: str) -> None:
    ctx.emit.emit("error", {"code": code, "message": message})


def _index(ctx: Ctx, data: Any) -> int | None:
    """The position of the item ``data["id"]`` names; the sender is told if there is none."""
    wanted = data.get("id") if isinstance(data, dict) else None
    for i, todo in enumerate(ctx.actor.room_state.items):
        if todo.id == wanted:
            return i
    _reject(ctx, "unknown_item", f"no item with id {wanted!r}")
    return None


@todo_room.on_connect
def on_connect(ctx: Ctx) -> None:
    ctx.emit.emit("todo:list", {"items": [t.to_wire() for t in ctx.actor.room_state.items]})


@todo_room.on("todo:add")
def add(ctx: Ctx, data: Any) -> None:
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_LENGTH:
        _reject(ctx, "bad_text", f"an item needs 1 to {MAX_TEXT_LENGTH} characters of text")
        return
    items = ctx.actor.room_state.items
    if len(items) >= MAX_ITEMS:
        _reject(ctx, "list_full", f"the list holds at most {MAX_ITEMS} items")
        return
    items.append(Todo(id=secrets.token_hex(4), text=text.strip()))
    # The state keeps its own copy of what was appended: read it back from the list.
    ctx.actor.emit.emit("todo:added", {"item": items[-1].to_wire()})


@todo_room.on("todo:toggle")
def toggle(ctx: Ctx, data: Any) -> None:
    i = _index(ctx, data)
    if i is not None:
        todo = ctx.actor.room_state.items[i]
        todo.done = not todo.done
        ctx.actor.emit.emit("todo:updated", {"item": todo.to_wire()})


@todo_room.on("todo:remove")
def remove(ctx: Ctx, data: Any) -> None:
    i = _index(ctx, data)
    if i is not None:
        gone = ctx.actor.room_state.items.pop(i)
        ctx.actor.emit.emit("todo:removed", {"ids": [gone.id]})


@todo_room.on("todo:clear_done")
def clear_done(ctx: Ctx, data: Any) -> None:
    items = ctx.actor.room_state.items
    gone = [t.id for t in items if t.done]
    if gone:
        items[:] = [t for t in items if not t.done]
        ctx.actor.emit.emit("todo:removed", {"ids": gone})
