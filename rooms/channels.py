"""Channels: sub-rooms inside one room, joined and left by each socket.

``channels:join {channel}`` and ``channels:leave {channel}`` change which channels a socket is
on (the answer is ``channels:joined`` / ``channels:left`` with all of them but ``default``);
``channels:message {channel, text}`` reaches everyone on that channel, the sender included, so
the sender sees its message in the same order as everyone else. Sending to a channel you are not
on gets you ``error {code: "not_a_member", channel}``; a bad channel name or text, or a 17th
channel, gets ``error {code: "invalid_channel" | "invalid_text" | "too_many_channels", ...}``.
Every socket is on ``default`` and stays there: it can be written to, not joined or left.

A socket's channels live on its ``ConnectionMeta``, which stays with the socket while the room
hibernates, so memberships survive hibernation without any room state. They do not survive a
server restart: neither do the sockets, and a client that reconnects joins its channels again.
"""

from __future__ import annotations

import re
from typing import Any

from verani import RoomContext, define_room

#: Channel names: short, and safe to show or log as they are.
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_:.-]{1,32}")
#: Channels one socket may be on (besides ``default``); each costs a little memory per socket.
MAX_CHANNELS = 16
MAX_TEXT = 2000

channels_room = define_room(name="channels", websocket_path="/ws/channels")

# No room state: everything this room knows lives on the sockets' meta.
Ctx = RoomContext[Any]


def _channel(ctx: Ctx, data: Any, *, may_be_default: bool = False) -> str | None:
    """The frame's channel if it is valid, else None after telling the sender why."""
    channel = data.get("channel") if isinstance(data, dict) else None
    # Every socket stays on "default": the room's own announcements and each socket's direct
    # answers (ctx.emit) go there, so it can be written to but never joined or left.
    if not isinstance(channel, str) or not CHANNEL_NAME.fullmatch(channel):
        reason = "a channel is 1-32 letters, digits or _ : . -"
    elif channel == "default" and not may_be_default:
        reason = "every socket stays on channel 'default'"
    else:
        return channel
    ctx.emit.emit("error", {"code": "invalid_channel", "channel": channel, "message": reason})
    return None


def _my_channels(ctx: Ctx) -> list[str]:
    return [c for c in ctx.meta.channels if c != "default"]


@channels_room.on("channels:join")
def join(ctx: Ctx, data: Any) -> None:
    channel = _channel(ctx, data)
    if channel is None:
        return
    if channel not in ctx.meta.channels and len(_my_channels(ctx)) >= MAX_CHANNELS:
        ctx.emit.emit("error", {"code": "too_many_channels", "channel": channel})
        return
    ctx.join(channel)  # joining twice is harmless: the answer is the same
    ctx.emit.emit("channels:joined", {"channel": channel, "channels": _my_channels(ctx)})


@channels_room.on("channels:leave")
def leave(ctx: Ctx, data: Any) -> None:
    channel = _channel(ctx, data)
    if channel is None:
        return
    ctx.leave(channel)  # leaving a channel you are not on is harmless too
    ctx.emit.emit("channels:left", {"channel": channel, "channels": _my_channels(ctx)})


@channels_room.on("channels:message")
def message(ctx: Ctx, data: Any) -> None:
    channel = _channel(ctx, data, may_be_default=True)
    if channel is None:
        return
    if channel not in ctx.meta.channels:
        ctx.emit.emit("error", {"code": "not_a_member", "channel": channel})
        return
    text = data.get("text")  # data is a dict: _channel() found a channel in it
    if not isinstance(text, str) or not text or len(text) > MAX_TEXT:
        ctx.emit.emit("error", {"code": "invalid_text", "channel": channel})
        return
    # actor.emit.to(channel) addresses everyone on the channel, the sender included; the frame's
    # "channel" field is the channel too, so a client can route it without reading the payload.
    ctx.actor.emit.to(channel).emit(
        "channels:message", {"channel": channel, "from": ctx.meta.user_id, "text": text}
    )
