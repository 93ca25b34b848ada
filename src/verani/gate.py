"""Internal: group commit and the output gate — writes coalesced, frames held until durable.

:class:`GroupCommit` writes a room instance's changed state whenever it is ahead of the store:
the changes of every turn made while one write is on its way go out together in the next
(group commit), so a busy room does not pay one write per event. A failed write is retried with
backoff, reported once per run of failures.

Durable Objects' output gate, for one room instance: the frames a turn emits go to the sockets
only once every write the room made up to that turn is on disk, so no client ever sees a change
that a crash could take back. Turns that changed nothing persisted pass straight through when
nothing is held; otherwise their frames queue behind the held ones, in emission order.

Frames held for a socket spend its :class:`~verani.flow.Credit`: their bytes count toward the
socket's byte allowance, and once they pass their share of its frames :attr:`OutputGate.full`
tells the room to take no new event until writes catch up (so a burst of releases never
overflows a socket's queue, and a failing store cannot make held frames grow without bound).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .errors import StoreError
from .sessions import Output, Session, coalesced, send_to

log = logging.getLogger("verani.actor")

#: Seconds before retrying a failed write; doubled on each failure up to RETRY_MAX.
RETRY_FIRST = 0.05
RETRY_MAX = 5.0

#: A turn's outputs: each frame (or close) with the sessions it goes to.
Outputs = list[tuple[Sequence[Session], Output]]


class OutputGate:
    """The held outputs of one awake room instance. ``released(event)`` is called for each
    turn's event once its frames have left (a socket's flow control, a caller waiting)."""

    def __init__(self, *, released: Callable[[Any], None]) -> None:
        # A list, released in slices: an awake room's empty deque would cost 600+ bytes.
        self._held: list[tuple[int, Outputs, Any]] = []
        self._released = released
        # Sessions past their held share: counted as they cross it, no scan on release.
        self._over_limit = 0

    @property
    def full(self) -> bool:
        """Some socket has more frames held than its credit allows: take no new event."""
        return self._over_limit > 0

    def __len__(self) -> int:
        return len(self._held)

    def settle(self, outputs: Outputs | None, event: Any, *, seq: int, durable: int) -> None:
        """A turn ended after write ``seq`` was scheduled, with write ``durable`` on disk: send
        its frames now, or hold them until ``seq`` is durable."""
        if not self._held and durable == seq:
            if outputs and len(outputs) > 1:
                # The turn's frames to one socket go out in one write.
                with coalesced():
                    for targets, frame in outputs:
                        send_to(targets, frame)
            elif outputs:
                send_to(*outputs[0])
            self._released(event)
            return
        self._held.append((seq, outputs or [], event))
        for targets, frame in outputs or ():
            size = len(frame)
            for session in targets:
                credit = session.credit
                if credit.hold(size):
                    self._over_limit += 1
                if credit.over_bytes:
                    session.sink.over_budget()

    def release(self, durable: int) -> None:
        """Write ``durable`` is on disk: send every held turn's frames up to it, in order."""
        held = self._held
        ready = 0
        while ready < len(held) and held[ready][0] <= durable:
            ready += 1
        released = held[:ready]
        del held[:ready]
        # Every frame released to one socket goes out in one write, not one per turn.
        with coalesced():
            for _, outputs, event in released:
                self._released(event)
                for targets, frame in outputs:
                    size = len(frame)
                    for session in targets:
                        if session.credit.unhold(size):
                            self._over_limit -= 1
                    send_to(targets, frame)

    def abandon(self) -> list[Any]:
        """The room is gone before its writes were durable: drop every held frame (their sockets
        are being closed); returns the held turns' events, for their waiters to be told."""
        events = []
        for _, outputs, event in self._held:
            for targets, _ in outputs:
                for session in targets:
                    session.credit.drop_held()
            events.append(event)
        self._held.clear()
        self._over_limit = 0
        return events


class GroupCommit:
    """The writes of one room instance, numbered: :meth:`changed` asks for write ``seq + 1``;
    :meth:`run` performs ``save()`` whenever the written state is behind, one write covering
    every change asked for since the last; ``durable(seq)`` is called once write ``seq`` is on
    disk. ``failed(error, first)`` reports a failed write (``first``: the first of a run of
    failures) before the retry."""

    def __init__(
        self,
        *,
        where: str,
        save: Callable[[], Awaitable[None]],
        durable: Callable[[int], None],
        failed: Callable[[StoreError, bool], Awaitable[None]],
    ) -> None:
        self._where = where
        self._save = save
        self._durable = durable
        self._failed = failed
        #: The last write asked for, and the last one on disk.
        self.seq = 0
        self.durable_seq = 0
        self._failures = 0
        self._needed = trio.Event()
        self._progress = trio.Event()

    @property
    def pending(self) -> bool:
        """Whether a change is not yet on disk."""
        return self.durable_seq < self.seq

    def changed(self) -> None:
        """The state changed: write it (together with whatever else changes meanwhile)."""
        self.seq += 1
        self._needed.set()

    async def wait_progress(self) -> None:
        """Until a write ends, well or not."""
        await self._progress.wait()

    async def wait_durable(self) -> bool:
        """Until every change asked for so far is on disk (True), or a write fails (False)."""
        target, failures = self.seq, self._failures
        while self.durable_seq < target:
            if self._failures != failures:
                return False
            await self._progress.wait()
        return True

    async def run(self) -> None:
        """Write whenever the store is behind; coalesce; retry failures with backoff."""
        delay = RETRY_FIRST
        while True:
            if self.durable_seq >= self.seq:
                await self._needed.wait()
                self._needed = trio.Event()
                continue
            seq = self.seq
            try:
                await self._save()
            except StoreError as exc:
                self._failures += 1
                log.error(
                    "%s: saving state failed (retrying in %.2fs): %s", self._where, delay, exc
                )
                self._notify()
                await self._failed(exc, delay == RETRY_FIRST)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.durable_seq = seq
            self._durable(seq)
            self._notify()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()
