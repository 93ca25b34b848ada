"""A notifications room: messages addressed to one user, on every device of that user.

``notify {to, title, body}`` sends ``notification {from, title, body, unread}`` to each socket
of user ``to`` (and to no one else); the sender gets ``notify:sent {to, delivered}``, where
``delivered`` counts the sockets it reached (0: the user is offline and will see it as unread).

Each user's unread count is persisted. A user gets ``notifications:unread {count}`` on connect,
and ``notifications:read`` resets it to 0 on all of that user's devices.
"""

from __future__ import annotations

from typing import Any

import attrs

from verani import RoomContext, define_room


@attrs.define
class NotificationsState:
    unread: dict[str, int] = attrs.Factory(dict)  # user id -> unread count; absent means 0


notifications_room = define_room(
    name="notifications",
    websocket_path="/ws/notifications",
    state=NotificationsState,
    persisted_keys=["unread"],
)

Ctx = RoomContext[NotificationsState]


@notifications_room.on_connect
def on_connect(ctx: Ctx) -> None:
    count = ctx.actor.room_state.unread.get(ctx.meta.user_id, 0)
    ctx.emit.emit("notifications:unread", {"count": count})


@notifications_room.on("notify")
def notify(ctx: Ctx, data: Any) -> None:
    fields = data if isinstance(data, dict) else {}
    to, title, body = fields.get("to"), fields.get("title"), fields.get("body", "")
    if not isinstance(to, str) or not to or not isinstance(title, str) or not isinstance(body, str):
        ctx.emit.emit("error", {"code": "bad_notify", "message": "notify needs {to, title, body}"})
        return
    state = ctx.actor.room_state
    count = state.unread.get(to, 0) + 1
    state.unread[to] = count
    # Every socket of `to`, whatever its channels; returns how many sockets that was.
    delivered = ctx.actor.emit_to_user(
        to,
        "notification",
        {"from": ctx.meta.user_id, "title": title, "body": body, "unread": count},
    )
    ctx.emit.emit("notify:sent", {"to": to, "delivered": delivered})


@notifications_room.on("notifications:read")
def mark_read(ctx: Ctx, data: Any) -> None:
    me, state = ctx.meta.user_id, ctx.actor.room_state
    state.unread.pop(me, None)
    # All of my devices, so the badge clears on the phone when I read on the laptop.
    ctx.actor.emit_to_user(me, "notifications:unread", {"count": 0})
