"""Internal: a room instance's schedules — when each is due, what it carries — and the wall clock.

A schedule is saved with its room (the ``schedules`` section of the stored document, written by
the same commit as the turn that made it) and the store keeps an index of every instance's next
due time, so a server knows after a restart which hibernated rooms to wake without reading their
documents. Pure bookkeeping; the actor runs due schedules as turns, the supervisor wakes rooms.

Due times are aware datetimes (UTC). The server reads the wall clock through :class:`WallClock`,
which follows Trio's clock from the moment the server started: under
``MockClock(autojump_threshold=0)`` an hour ahead takes no wall time, and across restarts the
real time is used.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .codec import Codec, JSONValue
from .errors import RoomDefinitionError

__all__ = ["RoomSchedules", "Schedule", "WallClock", "parse_due", "stored_schedule"]

UTC = dt.UTC


@attrs.frozen
class Schedule:
    """One schedule of a room instance (``ctx.actor.list_schedules()``, ``ctx.schedule``).

    ``due`` is when it runs next (aware, UTC); ``every`` the seconds between runs of a recurring
    one (None: runs once). ``late_by``: in a scheduled handler, how many seconds after ``due``
    it ran (0 elsewhere).
    """

    id: str
    event: str
    data: Any
    due: dt.datetime
    every: float | None = None
    late_by: float = 0.0


#: The wall time and Trio time a run's wall clock starts from: one per ``trio.run``, so every
#: server started in one run (a test restarting its server) shares one clock.
_ANCHOR: trio.lowlevel.RunVar[tuple[dt.datetime, float]] = trio.lowlevel.RunVar("verani_wall")


class WallClock:
    """The wall clock as the server sees it: real time when the Trio run first asked, then
    Trio's clock."""

    def __init__(self) -> None:
        try:
            self._start_wall, self._start_trio = _ANCHOR.get()
        except LookupError:
            self._start_wall, self._start_trio = dt.datetime.now(UTC), trio.current_time()
            _ANCHOR.set((self._start_wall, self._start_trio))

    def now(self) -> dt.datetime:
        """The current time (aware, UTC)."""
        return self._start_wall + dt.timedelta(seconds=trio.current_time() - self._start_trio)

    def deadline(self, due: dt.datetime) -> float:
        """The Trio deadline of ``due``."""
        return self._start_trio + (due - self._start_wall).total_seconds()


def parse_due(when: Any, now: dt.datetime) -> dt.datetime:
    """``when`` — seconds from now, a ``timedelta`` or an aware ``datetime`` — as a due time."""
    if isinstance(when, dt.datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(
                f"schedule time {when!r} has no time zone: use an aware datetime "
                "(datetime.now(UTC) + ...), seconds or a timedelta"
            )
        return when.astimezone(UTC)
    if isinstance(when, dt.timedelta):
        return now + when
    if isinstance(when, int | float) and not isinstance(when, bool):
        if not math.isfinite(when):
            raise ValueError(f"schedule delay must be a finite number of seconds, not {when!r}")
        return now + dt.timedelta(seconds=when)
    raise TypeError(
        f"schedule time must be seconds, a timedelta or an aware datetime, not {when!r}"
    )


def _interval(interval: Any) -> float:
    if isinstance(interval, dt.timedelta):
        seconds = interval.total_seconds()
    elif isinstance(interval, int | float) and not isinstance(interval, bool):
        seconds = float(interval)
    else:
        raise TypeError(f"schedule interval must be seconds or a timedelta, not {interval!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"schedule interval must be a positive number of seconds, not {interval!r}"
        )
    return seconds


class RoomSchedules:
    """The schedules of one awake room instance, kept encoded as the store holds them.

    ``on_change`` is called whenever they change (the actor commits them with the turn).
    """

    def __init__(
        self,
        *,
        where: str,
        codec: Codec,
        stored: dict[str, JSONValue],
        has_handler: Callable[[str], bool],
        clock: Callable[[], dt.datetime],
        on_change: Callable[[], None],
    ) -> None:
        self._where = where
        self._codec = codec
        self._has_handler = has_handler
        self._clock = clock
        self._on_change = on_change
        self._entries: dict[str, Schedule] = {}
        for key, raw in stored.items():
            self._entries[key] = self._decode(key, raw)

    def __len__(self) -> int:
        return len(self._entries)

    def encoded(self) -> dict[str, JSONValue]:
        """Every schedule as the store holds it."""
        return {key: self._encode(entry) for key, entry in self._entries.items()}

    def next_due(self) -> dt.datetime | None:
        """When the earliest schedule is due (None: none)."""
        return min((e.due for e in self._entries.values()), default=None)

    def due(self, now: dt.datetime) -> list[Schedule]:
        """The schedules due at ``now``, earliest first (ties by id)."""
        return sorted(
            (e for e in self._entries.values() if e.due <= now), key=lambda e: (e.due, e.id)
        )

    def add(self, when: Any, event: str, data: Any, *, id: str | None, every: Any = None) -> str:
        """See :meth:`verani.RoomActor.schedule`."""
        if not isinstance(event, str) or not event:
            raise ValueError(f"{self._where}: a schedule's event must be a non-empty string")
        if not self._has_handler(event):
            raise RoomDefinitionError(
                f"{self._where}: no on_schedule handler for {event!r}; register one with "
                f"@room.on_schedule({event!r}) before scheduling it"
            )
        if id is not None and (not isinstance(id, str) or not id):
            raise ValueError(f"{self._where}: a schedule id must be a non-empty string, not {id!r}")
        key = id if id is not None else uuid.uuid4().hex
        period = None if every is None else _interval(every)
        due = parse_due(when, self._clock())
        entry = Schedule(key, event, data, due, period)
        self._encode(entry)  # refused here, with the path, if the data cannot be stored
        self._entries[key] = entry
        self._on_change()
        return key

    def cancel(self, key: str) -> bool:
        """Remove a schedule; returns whether it was there."""
        if self._entries.pop(key, None) is None:
            return False
        self._on_change()
        return True

    def list(self) -> list[Schedule]:
        """Every schedule, earliest due first."""
        return sorted(self._entries.values(), key=lambda e: (e.due, e.id))

    def ran(self, entry: Schedule, now: dt.datetime) -> None:
        """``entry`` ran: a one-off is removed; a recurring one moves to its next due time after
        ``now``, counted from its due time (no drift; missed runs are not run again)."""
        current = self._entries.get(entry.id)
        if current is None or current.due != entry.due or current.event != entry.event:
            return  # replaced or cancelled by its own handler: keep what the handler left
        if entry.every is None:
            del self._entries[entry.id]
        else:
            step = dt.timedelta(seconds=entry.every)
            missed = max(0, math.floor((now - entry.due) / step))
            self._entries[entry.id] = attrs.evolve(entry, due=entry.due + step * (missed + 1))
        self._on_change()

    def _encode(self, entry: Schedule) -> JSONValue:
        data = self._codec.encode(entry.data, Any, path=f"schedule[{entry.id!r}].data")
        return {
            "event": entry.event,
            "data": data,
            "due": entry.due.isoformat(),
            "every": entry.every,
        }

    def _decode(self, key: str, raw: JSONValue) -> Schedule:
        entry = stored_schedule(key, raw)
        data = self._codec.decode(entry.data, Any, path=f"schedule[{key!r}].data")
        return attrs.evolve(entry, data=data)


def stored_schedule(key: str, raw: JSONValue) -> Schedule:
    """A schedule as stored, its ``data`` left encoded (tools that must not decode it)."""
    if not isinstance(raw, dict):
        raise TypeError(f"schedule {key!r} is not an object")
    every = raw.get("every")
    due = dt.datetime.fromisoformat(str(raw["due"]))
    if due.tzinfo is None:
        raise ValueError(f"schedule {key!r} has a due time without a time zone")
    if every is not None and not isinstance(every, int | float):
        raise TypeError(f"schedule {key!r} has an interval that is not a number")
    return Schedule(
        key,
        str(raw["event"]),
        raw.get("data"),
        due.astimezone(UTC),
        None if every is None else float(every),
    )
