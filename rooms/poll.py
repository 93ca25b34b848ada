"""A poll that closes itself: a schedule wakes the room at the closing time, even if it sleeps.

→ ``poll:open {question, options, seconds}`` (a new poll; closes ``seconds`` later),
``poll:vote {option}`` (one vote per user; voting again changes it).
← ``poll:state {question, options, tally, closesAt, closed}`` (on connecting, and to everyone
after each change), ``poll:closed {question, tally, winner}`` (to everyone connected when it
closes), ``error {code, message}`` (to the sender only).

The votes, the closing time and the results are persisted; the schedule is saved with them, so
a restart or a hibernation does not lose the close.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs

from verani import ClientError, RoomContext, ScheduleContext, define_room

MAX_OPTIONS = 10


@attrs.define
class PollState:
    question: str = ""
    options: list[str] = attrs.Factory(list)
    votes: dict[str, str] = attrs.Factory(dict)  # user id -> option
    closes_at: dt.datetime | None = None
    closed: bool = False


poll_room = define_room(
    name="poll",
    websocket_path="/ws/poll",
    state=PollState,
    persisted_keys=["question", "options", "votes", "closes_at", "closed"],
)

Ctx = RoomContext[PollState]


def _tally(state: PollState) -> dict[str, int]:
    tally = dict.fromkeys(state.options, 0)
    for option in state.votes.values():
        tally[option] = tally.get(option, 0) + 1
    return tally


def _view(state: PollState) -> dict[str, Any]:
    return {
        "question": state.question,
        "options": list(state.options),
        "tally": _tally(state),
        "closesAt": state.closes_at.isoformat() if state.closes_at else None,
        "closed": state.closed,
    }


@poll_room.on_connect
def on_connect(ctx: Ctx) -> None:
    ctx.emit.emit("poll:state", _view(ctx.actor.room_state))


@poll_room.on("poll:open")
def open_poll(ctx: Ctx, data: Any) -> None:
    question = data.get("question") if isinstance(data, dict) else None
    options = data.get("options") if isinstance(data, dict) else None
    seconds = data.get("seconds", 60) if isinstance(data, dict) else None
    if not isinstance(question, str) or not question.strip():
        raise ClientError("a poll needs a question", code="bad_poll")
    if (
        not isinstance(options, list)
        or not 2 <= len(options) <= MAX_OPTIONS
        or not all(isinstance(o, str) and o for o in options)
        or len(set(options)) != len(options)
    ):
        raise ClientError(f"a poll needs 2 to {MAX_OPTIONS} distinct options", code="bad_poll")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
        raise ClientError("seconds must be a positive number", code="bad_poll")
    state = ctx.actor.room_state
    state.question, state.options, state.votes, state.closed = question, options, {}, False
    # One close per poll: the id replaces the previous poll's close, if it had one pending.
    ctx.actor.schedule(seconds, "poll:close", None, id="close")
    state.closes_at = next(s.due for s in ctx.actor.list_schedules() if s.id == "close")
    ctx.actor.emit.emit("poll:state", _view(state))


@poll_room.on("poll:vote")
def vote(ctx: Ctx, data: Any) -> None:
    state = ctx.actor.room_state
    option = data.get("option") if isinstance(data, dict) else None
    if state.closed or not state.options:
        raise ClientError("there is no open poll", code="closed")
    if option not in state.options:
        raise ClientError(f"no option {option!r}; options: {state.options}", code="bad_option")
    state.votes[ctx.meta.user_id] = option
    ctx.actor.emit.emit("poll:state", _view(state))


@poll_room.on_schedule("poll:close")
def close(ctx: ScheduleContext[PollState], data: Any) -> None:
    state = ctx.actor.room_state
    state.closed = True
    tally = _tally(state)
    top = max(tally.values(), default=0)
    winners = [option for option, n in tally.items() if n == top and top > 0]
    ctx.actor.emit.emit(
        "poll:closed",
        {
            "question": state.question,
            "tally": tally,
            "winner": winners[0] if len(winners) == 1 else None,
        },
    )
