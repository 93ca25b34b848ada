"""A chat room: messages, join/leave notices, typing indicators and recent history.

The last ``HISTORY_LIMIT`` messages are persisted, so a newcomer's ``chat:welcome`` carries them
even after the room hibernated or the server restarted. Who is typing is ephemeral state: it is
meaningless a few seconds later, so it is not persisted and starts empty after every revival.

Client → server: ``chat:message {text}``, ``chat:typing {typing}``.
Server → client: ``chat:welcome {users, typing, history}`` (to the newcomer),
``chat:joined {userId}`` / ``chat:left {userId}`` (to the others), ``chat:message {from, text,
at}`` (to everyone), ``chat:typing {userId, typing}`` (to the others), ``error {code, message}``
(to the sender of a bad message only).
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs

from verani import RoomContext, define_room

HISTORY_LIMIT = 50
MAX_MESSAGE_LENGTH = 2000


@attrs.define
class ChatMessage:
    sender: str  # "from" on the wire; a Python keyword cannot be a field name
    text: str
    at: str  # ISO 8601, UTC, as JavaScript's Date.toISOString()

    def to_wire(self) -> dict[str, str]:
        return {"from": self.sender, "text": self.text, "at": self.at}


@attrs.define
class ChatState:
    history: list[ChatMessage] = attrs.Factory(list)
    typing: set[str] = attrs.Factory(set)


chat_room = define_room(
    name="chat",
    websocket_path="/ws/chat",
    state=ChatState,
    # `typing` is left out on purpose: it resets on every revival.
    persisted_keys=["history"],
)

Ctx = RoomContext[ChatState]


def _reject(ctx: Ctx, code: str, message: str) -> None:
    # Only the sender hears about its own mistake.
    ctx.emit.emit("error", {"code": code, "message": message})


@chat_room.on_connect
def on_connect(ctx: Ctx) -> None:
    actor, me = ctx.actor, ctx.meta.user_id
    # The newcomer is not among the room's sessions until on_connect returns, so "was this user
    # already here on another device?" is simply "does the user have sessions yet?".
    first_device = not actor.get_user_sessions(me)
    ctx.emit.emit(
        "chat:welcome",
        {
            "users": list(dict.fromkeys([*actor.get_connected_user_ids(), me])),
            "typing": sorted(actor.room_state.typing),
            "history": [m.to_wire() for m in actor.room_state.history],
        },
    )
    if first_device:
        # Everyone on "default" but this socket (it is not in the room yet anyway).
        ctx.emit.to("default").emit("chat:joined", {"userId": me})


@chat_room.on_disconnect
def on_disconnect(ctx: Ctx) -> None:
    actor, me = ctx.actor, ctx.meta.user_id
    # The leaving socket is already gone: announce only when the user's last device left.
    if actor.get_user_sessions(me):
        return
    actor.room_state.typing.discard(me)
    actor.emit.emit("chat:left", {"userId": me})


@chat_room.on("chat:message")
def message(ctx: Ctx, data: Any) -> None:
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        _reject(ctx, "empty_message", "a message needs some text")
        return
    if len(text) > MAX_MESSAGE_LENGTH:
        _reject(ctx, "message_too_long", f"a message is at most {MAX_MESSAGE_LENGTH} characters")
        return
    at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    msg = ChatMessage(sender=ctx.meta.user_id, text=text, at=at.replace("+00:00", "Z"))
    state = ctx.actor.room_state
    state.history.append(msg)  # changed in place: saved before the frames below leave
    del state.history[:-HISTORY_LIMIT]
    state.typing.discard(ctx.meta.user_id)  # sending a message ends "is typing"
    # Everyone, the sender included: its own copy confirms the message was saved.
    ctx.actor.emit.emit("chat:message", msg.to_wire())


@chat_room.on("chat:typing")
def typing(ctx: Ctx, data: Any) -> None:
    is_typing = data.get("typing") if isinstance(data, dict) else None
    if not isinstance(is_typing, bool):
        _reject(ctx, "bad_typing", "chat:typing needs {typing: true|false}")
        return
    me, users = ctx.meta.user_id, ctx.actor.room_state.typing
    if is_typing == (me in users):
        return  # no change: clients repeat this on every keystroke
    if is_typing:
        users.add(me)
    else:
        users.discard(me)
    ctx.emit.to("default").emit("chat:typing", {"userId": me, "typing": is_typing})
