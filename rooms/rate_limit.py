"""Rate limit: a chat where each user may send a burst of 5 messages, then 1 a second.

Every user has a token bucket: it holds up to ``CAPACITY`` tokens, refills ``REFILL_PER_SECOND``
tokens a second, and each ``chat:message {text}`` takes one. With a token, the message goes to
everyone as ``chat:message {from, text}``; without, it is dropped and the sender alone gets
``rate_limited {retryAfter}`` (seconds until its next message will pass). Each user has their own
bucket, so one flooding user never slows the others down; the bucket is per user, not per
socket, so opening more tabs buys no more messages. New sockets get ``chat:welcome`` with the
limits.

The buckets are ephemeral room state: after hibernation they start full again, which changes
nothing, since the room only sleeps after far longer idle than a bucket takes to refill. Here the
user id is the client's own ``?userId=`` claim, so a flooder could switch ids; combine with the
``extract_meta`` of rooms/auth.py to key the buckets on verified users.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import trio

from verani import RoomContext, define_room

CAPACITY = 5
REFILL_PER_SECOND = 1.0
MAX_TEXT = 2000


@attrs.define
class Bucket:
    tokens: float
    updated: float  # trio.current_time() of the last refill

    def refill(self, now: float) -> None:
        self.tokens = min(CAPACITY, self.tokens + (now - self.updated) * REFILL_PER_SECOND)
        self.updated = now


@attrs.define
class RateLimitState:
    # Not persisted: a missing bucket is a full one, which is also what a bucket becomes if the
    # room sleeps long enough to hibernate.
    buckets: dict[str, Bucket] = attrs.Factory(dict)


rate_limit_room = define_room(
    name="rate_limit", websocket_path="/ws/rate_limit", state=RateLimitState
)

Ctx = RoomContext[RateLimitState]


def take_token(buckets: dict[str, Bucket], user_id: str, now: float) -> float | None:
    """Take one of ``user_id``'s tokens: None if there was one, else seconds until there is."""
    bucket = buckets.setdefault(user_id, Bucket(tokens=CAPACITY, updated=now))
    bucket.refill(now)
    if bucket.tokens >= 1:
        bucket.tokens -= 1
        return None
    # Rounded up to the millisecond, plus one, so a client that waits exactly this long finds a
    # whole token whatever the float rounding of the clock.
    return math.ceil((1 - bucket.tokens) / REFILL_PER_SECOND * 1000 + 1) / 1000


@rate_limit_room.on_connect
def welcome(ctx: Ctx) -> None:
    ctx.emit.emit("chat:welcome", {"capacity": CAPACITY, "refillPerSecond": REFILL_PER_SECOND})


@rate_limit_room.on("chat:message")
def chat_message(ctx: Ctx, data: Any) -> None:
    # trio.current_time(), not time.time(): Trio's clock, which tests can replace with a mock.
    # A token is taken before the text is checked, so junk frames are rate limited as well.
    retry_after = take_token(ctx.actor.room_state.buckets, ctx.meta.user_id, trio.current_time())
    if retry_after is not None:
        ctx.emit.emit("rate_limited", {"retryAfter": retry_after})
        return
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text or len(text) > MAX_TEXT:
        ctx.emit.emit("error", {"code": "invalid_text"})
        return
    ctx.actor.emit.emit("chat:message", {"from": ctx.meta.user_id, "text": text})


@rate_limit_room.on_disconnect
def forget_full_buckets(ctx: Ctx) -> None:
    # A full bucket is the same as none, so dropping them keeps memory to the users who sent
    # lately. Partly empty buckets stay, even of users who left: reconnecting must not refill.
    now = trio.current_time()
    buckets = ctx.actor.room_state.buckets
    for user_id, bucket in list(buckets.items()):
        bucket.refill(now)
        if bucket.tokens >= CAPACITY:
            del buckets[user_id]
