"""Internal: the output gate — a turn's frames wait until the writes before them are durable.

Durable Objects' output gate, for one room instance: the frames a turn emits go to the sockets
only once every write the room made up to that turn is on disk, so no client ever sees a change
that a crash could take back. Turns that changed nothing persisted pass straight through when
nothing is held; otherwise their frames queue behind the held ones, in emission order.

Frames held for a socket count on its :class:`~verani.sessions.Session` (``held_frames``,
``held_bytes``): the bytes toward the socket's outbound budget, the frames toward
``max_held_per_socket``, past which :attr:`OutputGate.full` tells the room to take no new event
until writes catch up (so a burst of releases never overflows a socket's queue, and a failing
store cannot make held frames grow without bound).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .sessions import Session, send_to

#: A turn's outputs: each frame with the sessions it goes to.
Outputs = list[tuple[Sequence[Session], bytes]]


class OutputGate:
    """The held outputs of one awake room instance. ``released(event)`` is called for each
    turn's event once its frames have left (a socket's flow control, a caller waiting)."""

    def __init__(self, *, max_held_per_socket: int, released: Callable[[Any], None]) -> None:
        # A list, released in slices: an awake room's empty deque would cost 600+ bytes.
        self._held: list[tuple[int, Outputs, Any]] = []
        self._max_held = max_held_per_socket
        self._released = released
        # Sessions past the frame limit: counted as they cross it, no scan on release.
        self._over_limit = 0

    @property
    def full(self) -> bool:
        """Some socket has more frames held than the gate allows: take no new event."""
        return self._over_limit > 0

    def __len__(self) -> int:
        return len(self._held)

    def settle(self, outputs: Outputs | None, event: Any, *, seq: int, durable: int) -> None:
        """A turn ended after write ``seq`` was scheduled, with write ``durable`` on disk: send
        its frames now, or hold them until ``seq`` is durable."""
        if not self._held and durable == seq:
            for targets, frame in outputs or ():
                send_to(targets, frame)
            self._released(event)
            return
        self._held.append((seq, outputs or [], event))
        limit = self._max_held
        for targets, frame in outputs or ():
            size = len(frame)
            for session in targets:
                held = session.held_frames = session.held_frames + 1
                if held == limit + 1:
                    self._over_limit += 1
                held_bytes = session.held_bytes = session.held_bytes + size
                sink = session.sink
                if held_bytes + sink.pending_bytes > sink.max_pending_bytes:
                    sink.over_budget()

    def release(self, durable: int) -> None:
        """Write ``durable`` is on disk: send every held turn's frames up to it, in order."""
        held, limit = self._held, self._max_held
        ready = 0
        while ready < len(held) and held[ready][0] <= durable:
            ready += 1
        released = held[:ready]
        del held[:ready]
        for _, outputs, event in released:
            self._released(event)
            for targets, frame in outputs:
                size = len(frame)
                for session in targets:
                    left = session.held_frames = session.held_frames - 1
                    if left == limit:
                        self._over_limit -= 1
                    session.held_bytes -= size
                send_to(targets, frame)

    def abandon(self) -> list[Any]:
        """The room is gone before its writes were durable: drop every held frame (their sockets
        are being closed); returns the held turns' events, for their waiters to be told."""
        events = []
        for _, outputs, event in self._held:
            for targets, _ in outputs:
                for session in targets:
                    session.held_frames = session.held_bytes = 0
            events.append(event)
        self._held.clear()
        self._over_limit = 0
        return events
