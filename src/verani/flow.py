"""Internal: one socket's flow control — what it may still be sent, and what it may still send.

A :class:`Credit` belongs to one connection and is the only place its limits are kept. Three
parties spend or return it:

- the connection queues frames (``queue``) and its writer reports them written (``sent``);
- the room's output gate holds frames until the write they depend on is durable (``hold``,
  ``unhold``);
- the connection's reader waits for a slot before it reads (``wait_to_read``) and takes one for
  each message it hands to the room (``take_message``); the room gives it back once that
  message's turn has left the gate (``message_done``).

Blame follows the one outbound allowance (``max_frames`` frames, ``max_bytes`` bytes). Frames
queued for a peer that does not read use it up, and the next frame closes the socket (1008): the
peer is too slow. Frames held by the gate wait on the store, not on the peer, so they never
close a socket by their count: past half the allowance they pause the room instead (the gate's
``full``) until the store catches up, and the half kept free is where they go when released, so
a release never overflows a socket that reads. Bytes are one budget for queued and held frames
alike: a room that holds more for a socket than the socket may ever be sent has sent too much.
"""

from __future__ import annotations

import trio

__all__ = ["Credit"]


class Credit:
    """One socket's outbound allowance and inbound message slots."""

    __slots__ = (
        "_wake",
        "bytes",
        "frames",
        "held_bytes",
        "held_frames",
        "in_flight",
        "max_bytes",
        "max_frames",
        "max_in_flight",
    )

    def __init__(self, *, max_frames: int, max_bytes: int, max_in_flight: int) -> None:
        #: The allowance: frames (queued or being written) and bytes (queued, being written or
        #: held) owed to the peer at most.
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: Messages of this socket in its room, plus its frames unsent, at most.
        self.max_in_flight = max_in_flight
        #: Frames and bytes queued for the socket or being written.
        self.frames = 0
        self.bytes = 0
        #: Frames and bytes the room's output gate holds for the socket.
        self.held_frames = 0
        self.held_bytes = 0
        #: Messages of this socket handed to the room whose turns have not left the gate.
        self.in_flight = 0
        # Made only while the reader waits: an idle socket keeps no Event.
        self._wake: trio.Event | None = None

    # --- outbound ---------------------------------------------------------------------------

    def queue(self, size: int) -> bool:
        """A frame of ``size`` bytes goes to the socket's queue; False (and nothing counted)
        when the peer has not read enough of what it was sent for it to fit."""
        if self.frames >= self.max_frames or self.bytes + self.held_bytes + size > self.max_bytes:
            return False
        self.frames += 1
        self.bytes += size
        return True

    def sent(self, frames: int, size: int) -> None:
        """The writer wrote ``frames`` frames of ``size`` bytes in all."""
        self.frames -= frames
        self.bytes -= size
        self._notify()

    def drop_queued(self) -> None:
        """The socket is closing and its queue is dropped unsent."""
        self.frames = self.bytes = 0
        self._notify()

    @property
    def over_bytes(self) -> bool:
        """Whether the frames queued and held for the socket are past its byte allowance."""
        return self.bytes + self.held_bytes > self.max_bytes

    def hold(self, size: int) -> bool:
        """The output gate holds a frame of ``size`` bytes for the socket; True when that takes
        the held frames past their share of the allowance (the room should wait)."""
        self.held_bytes += size
        self.held_frames += 1
        return self.held_frames == self.max_frames // 2 + 1

    def unhold(self, size: int) -> bool:
        """A held frame leaves the gate (to :meth:`queue`, or dropped); True when that brings the
        held frames back within their share."""
        self.held_bytes -= size
        self.held_frames -= 1
        return self.held_frames == self.max_frames // 2

    def drop_held(self) -> None:
        """The room is gone: nothing is held for the socket any more."""
        self.held_frames = self.held_bytes = 0

    # --- inbound ----------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """The socket's messages in the room plus its frames unsent."""
        return self.in_flight + self.frames

    async def wait_to_read(self) -> None:
        """Wait until the socket may read its next frame.

        A peer that sends faster than it reads its replies waits here, at its own socket: its
        messages in the room and its frames unsent together stay under ``max_in_flight``. The
        wait comes before any frame is read, because pongs and error answers are queued too.
        """
        while self.backlog >= self.max_in_flight:
            self._wake = trio.Event()
            await self._wake.wait()

    def take_message(self) -> None:
        """A message of the socket goes to the room."""
        self.in_flight += 1

    def message_done(self) -> None:
        """One message of the socket has been handled and its turn's frames have left the gate
        (or it never reached the room)."""
        self.in_flight -= 1
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None
