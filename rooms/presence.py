"""A presence room: who is online, counting users rather than sockets.

A user with a phone and a laptop connected is online once. Everyone gets
``presence:update {online: [sorted user ids]}`` when the set of online *users* changes: a second
device of someone already online changes nothing and sends nothing. A newcomer always gets the
current list.

The list is persisted, but it is only a cache of the room's sockets: after a crash or a restart
it may name users whose sockets are long gone. So it is always recomputed from the sockets that
are actually connected: on every connect and disconnect, and in ``on_hibernation_restore`` when
the room wakes up with sockets that outlived its sleep.

A phone that loses its network for a few seconds must not make its user leave and come back for
everyone: the room keeps a dropped session for 30 s (``Recovery``). A client that reconnects
with its session token (the Python client's ``recover=True``) gets it back, with the updates it
missed, and nobody sees it leave; only when the 30 s pass without it does ``on_disconnect`` run.
"""

from __future__ import annotations

import attrs

from verani import Recovery, RoomActor, RoomContext, define_room


@attrs.define
class PresenceState:
    online: list[str] = attrs.Factory(list)


presence_room = define_room(
    name="presence",
    websocket_path="/ws/presence",
    state=PresenceState,
    persisted_keys=["online"],
    recovery=Recovery(max_disconnect=30.0),
)

Ctx = RoomContext[PresenceState]


def publish(actor: RoomActor[PresenceState], online: list[str]) -> None:
    """Store ``online`` and tell everyone, unless it is the list they already have."""
    if online == actor.room_state.online:
        return
    actor.room_state.online = online
    actor.emit.emit("presence:update", {"online": online})


@presence_room.on_connect
def on_connect(ctx: Ctx) -> None:
    if ctx.recovered:
        return  # the same session, back: it was never gone for the others, and got what it missed
    # The newcomer is not among the room's sessions until on_connect returns: add it by hand.
    # Recomputing from the sockets (not adding to the stored list) also drops users left over
    # from before a restart, the first time anyone connects.
    online = sorted({*ctx.actor.get_connected_user_ids(), ctx.meta.user_id})
    publish(ctx.actor, online)  # reaches the others only, for the same reason
    ctx.emit.emit("presence:update", {"online": online})


@presence_room.on_disconnect
def on_disconnect(ctx: Ctx) -> None:
    # The leaving socket is already gone; if it was the user's last one, the list shrinks.
    publish(ctx.actor, sorted(ctx.actor.get_connected_user_ids()))


@presence_room.on_hibernation_restore
def on_restore(actor: RoomActor[PresenceState]) -> None:
    # The stored list is what was true when the room last saved it; the sockets are what is
    # true now.
    publish(actor, sorted(actor.get_connected_user_ids()))
