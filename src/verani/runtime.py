"""Internal: reaching a room from outside it: Verani's actor stubs (``emitToChannel`` and co).

Other Python code in the same process — a timer, an HTTP endpoint, another room's handler —
gets a :class:`RoomHandle` from ``server.runtime.room(name, instance)`` (or ``ctx.runtime`` in a
handler). Each call runs as a turn of that room, serialized with its other events, and wakes it
if it is hibernated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

from .actor import Call, current_room
from .context import RoomActor

# CallCycleError is raised here; it is defined with the rest of the family.
from .errors import CallCycleError as CallCycleError
from .errors import RoomNotFoundError, VeraniError
from .routing import DEFAULT_INSTANCE

if TYPE_CHECKING:
    from .supervisor import Supervisor

T = TypeVar("T")


class Runtime:
    """The rooms of a running server, by name."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def room(self, name: str, instance: str = DEFAULT_INSTANCE) -> RoomHandle:
        """A handle on instance ``instance`` of room ``name`` (it need not be awake or exist).

        Raises :class:`RoomNotFoundError` for a room the server does not serve and ValueError
        for an instance name a client could not use either.
        """
        if name not in self._supervisor.rooms:
            known = ", ".join(sorted(self._supervisor.rooms)) or "(none)"
            raise RoomNotFoundError(f"no room named {name!r} is served (rooms: {known})")
        problem = self._supervisor.instance_rules.problem(self._supervisor.rooms[name], instance)
        if problem is not None:
            raise ValueError(f"bad instance name {instance!r}: {problem}")
        return RoomHandle(self._supervisor, name, instance)


class RoomHandle:
    """One room instance, reached from outside its turns. Every method runs as one turn."""

    def __init__(self, supervisor: Supervisor, room: str, instance: str) -> None:
        self._supervisor = supervisor
        self.room = room
        self.instance = instance

    def __repr__(self) -> str:
        return f"<RoomHandle {self.room}/{self.instance}>"

    async def call(self, fn: Callable[[RoomActor[Any]], T | Awaitable[T]]) -> T:
        """Run ``fn(actor)`` as a turn of the room and return its result (or raise its error).

        The result comes back, like the turn's frames, once what the turn changed is durable.
        Raises :class:`CallCycleError` when the call would wait on the caller's own turn,
        directly or through other rooms' calls. In a cluster, ``fn`` runs only where the room
        is owned: a room owned by another node is reached through this handle's other methods
        (they travel as data), and ``call`` raises :class:`RoomNotFoundError` for it.
        """
        return await self._call(fn, None)

    async def _call(
        self, fn: Callable[[RoomActor[Any]], T | Awaitable[T]], op: tuple[Any, ...] | None
    ) -> T:
        target = (self.room, self.instance)
        caller = current_room()
        waiting = self._supervisor.waiting
        if caller is not None:
            # Follow who waits for whom from the target: reaching the caller is a deadlock.
            route, room = [target], target
            while room != caller and room in waiting:
                room = waiting[room]
                route.append(room)
            if room == caller:
                path = " -> ".join(f"{r}/{i}" for r, i in [caller, *route])
                raise CallCycleError(
                    f"room {self.room}/{self.instance} cannot be called from inside room "
                    f"{caller[0]}/{caller[1]}'s turn ({path}) without a deadlock; use "
                    f"ctx.actor for the room you are in"
                )
        event = Call(fn, op=op)
        inst = self._supervisor.instance(self.room, self.instance)
        if caller is not None:
            waiting[caller] = target
        try:
            if not await inst.submit(event):
                raise VeraniError(f"room {self.room}/{self.instance}: the server is shutting down")
            await event.done.wait()
        finally:
            if caller is not None:
                waiting.pop(caller, None)
        if event.error is not None:
            raise event.error
        result: T = event.result
        return result

    async def emit_to_channel(self, channel: str, event: str, data: Any = None) -> int:
        """Send ``event`` to every socket on ``channel``; returns the count."""
        return await self._call(
            lambda actor: actor.emit_to_channel(channel, event, data),
            ("emit_to_channel", channel, event, data),
        )

    async def emit_to_user(self, user_id: str, event: str, data: Any = None) -> int:
        """Send ``event`` to every socket of ``user_id``; returns the count."""
        return await self._call(
            lambda actor: actor.emit_to_user(user_id, event, data),
            ("emit_to_user", user_id, event, data),
        )

    async def broadcast(
        self,
        channel: str,
        data: Any,
        *,
        user_ids: Collection[str] | None = None,
        client_ids: Collection[str] | None = None,
    ) -> int:
        """``actor.broadcast`` from outside (no ``except_``: there is no current socket)."""
        users = sorted(user_ids) if user_ids is not None else None
        clients = sorted(client_ids) if client_ids is not None else None
        return await self._call(
            lambda actor: actor.broadcast(channel, data, user_ids=user_ids, client_ids=client_ids),
            ("broadcast", channel, data, users, clients),
        )

    async def send_to_user(self, user_id: str, channel: str, data: Any = None) -> int:
        """``actor.send_to_user`` from outside."""
        return await self._call(
            lambda actor: actor.send_to_user(user_id, channel, data),
            ("send_to_user", user_id, channel, data),
        )

    async def disconnect(
        self,
        client_id: str | None = None,
        *,
        user_id: str | None = None,
        code: int = 4000,
        reason: str = "",
    ) -> int:
        """``actor.disconnect`` from outside: close a client's socket, or a user's sockets."""
        return await self._call(
            lambda actor: actor.disconnect(client_id, user_id=user_id, code=code, reason=reason),
            ("disconnect", client_id, user_id, code, reason),
        )

    async def get_session_count(self) -> int:
        """How many sockets are connected to the instance."""
        return await self._call(lambda actor: actor.get_session_count(), ("get_session_count",))

    async def get_connected_user_ids(self) -> list[str]:
        """The ids of the connected users, each once."""
        return await self._call(
            lambda actor: actor.get_connected_user_ids(), ("get_connected_user_ids",)
        )
