"""Internal: single activation with fencing, as Lua scripts Redis runs atomically.

One node at a time owns a room instance: the one whose holder string (``NODE_ID#INCARNATION``)
is in the instance's lease key (:func:`verani.cluster.keys.lease_key`, value ``"HOLDER EPOCH"``,
with an expiry). Each new owner takes a new epoch from the instance's epoch key, which only
grows; the store refuses a write whose epoch is not the newest
(:class:`~verani.errors.FencedError`), so a node that lost its lease without noticing (a long
pause, a partition) cannot overwrite what the next owner wrote. The incarnation is random per
process: a node restarted with the same id is a new holder and never reuses its old epoch.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, cast

import anyio
import attrs
import coredis
import coredis.exceptions
from coredis.commands import Script

from ..errors import StoreError, StoreUnavailableError
from . import keys

__all__ = [
    "UNREACHABLE",
    "Acquired",
    "acquire",
    "holder_for",
    "owner",
    "redis_errors",
    "release",
    "renew",
    "where",
]

#: What a lost or refused connection looks like from coredis and the anyio streams under it.
UNREACHABLE: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


@contextlib.contextmanager
def redis_errors(what: str, client: coredis.Redis[Any] | str) -> Iterator[None]:
    """At Redis' edge: an unreachable Redis becomes
    :class:`~verani.errors.StoreUnavailableError`, an error reply
    :class:`~verani.errors.StoreError`, each saying ``what`` could not be done and where
    (``client``, or the location to name)."""
    location = client if isinstance(client, str) else where(client)
    try:
        yield
    except UNREACHABLE as exc:
        raise StoreUnavailableError(
            f"{what}: Redis at {location} is unreachable: {exc or type(exc).__name__}"
        ) from exc
    except coredis.exceptions.RedisError as exc:
        raise StoreError(f"{what}: Redis at {location} answered: {exc}") from exc


def where(client: coredis.Redis[Any]) -> str:
    """Where ``client`` connects to, for messages."""
    location = getattr(client.connection_pool, "location", None)
    return str(location) if location is not None else repr(client)


#: ``KEYS[1]`` lease, ``KEYS[2]`` epoch; ``ARGV[1]`` holder, ``ARGV[2]`` ttl (ms).
#: Returns ``{ok, holder, epoch}``; ``ok`` is 1 when the caller holds the lease now.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
    local sep = string.find(current, ' [^ ]*$')
    local holder = string.sub(current, 1, sep - 1)
    local epoch = string.sub(current, sep + 1)
    if holder == ARGV[1] then
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
        return {1, holder, epoch}
    end
    return {0, holder, epoch}
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. epoch, 'PX', ARGV[2])
return {1, ARGV[1], tostring(epoch)}
"""

#: ``KEYS`` leases; ``ARGV[1]`` ttl (ms), then one ``"HOLDER EPOCH"`` per key.
#: Returns one 1 (renewed) or 0 (lost) per key.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[i + 1] then
        redis.call('PEXPIRE', key, ARGV[1])
        out[i] = 1
    else
        out[i] = 0
    end
end
return out
"""

#: ``KEYS[1]`` lease; ``ARGV[1]`` ``"HOLDER EPOCH"``. Returns 1 when it was released.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Scripts bound to no client: each call names its client. EVALSHA, loaded on first use.
_ACQUIRE_SCRIPT: Script[Any] = Script(script=_ACQUIRE)
_RENEW_SCRIPT: Script[Any] = Script(script=_RENEW)
_RELEASE_SCRIPT: Script[Any] = Script(script=_RELEASE)


@attrs.frozen
class Acquired:
    """What :func:`acquire` found: ``ok`` when the caller owns the instance now; ``holder``
    and ``epoch`` of the owner (the caller, or the node that holds it; None and 0: nobody)."""

    ok: bool
    holder: str | None
    epoch: int


def holder_for(node: str) -> str:
    """``NODE_ID#INCARNATION`` for this process: the incarnation is random, so a restarted node
    never presents an old holder string (and never reuses an old epoch)."""
    if not node or " " in node or "#" in node:
        raise ValueError(f"node id {node!r} must be non-empty, without spaces or '#'")
    return f"{node}#{secrets.token_hex(8)}"


def _value(holder: str, epoch: int) -> str:
    return f"{holder} {epoch}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def acquire(
    client: coredis.Redis[Any], room: str, instance: str, holder: str, ttl_ms: int
) -> Acquired:
    """Take (or extend) the lease of ``room``/``instance`` for ``holder`` for ``ttl_ms``.

    Free: a new epoch is taken and ``ok``. Held by ``holder``: extended, ``ok``, same epoch.
    Held by another node: not ``ok``, with that holder and its epoch.
    """
    if " " in holder:
        raise ValueError(f"holder {holder!r} must not contain spaces")
    with redis_errors(f"cannot take the lease of room {room}/{instance}", client):
        reply: Any = await _ACQUIRE_SCRIPT(
            keys=[keys.lease_key(room, instance), keys.epoch_key(room, instance)],
            args=[holder, ttl_ms],
            client=client,
        )
    ok, found, epoch = cast(list[Any], reply)
    return Acquired(ok == 1, _text(found), int(_text(epoch)))


async def renew(
    client: coredis.Redis[Any],
    leases: Sequence[tuple[str, str, int]],
    holder: str,
    ttl_ms: int,
) -> list[bool]:
    """Extend many leases of ``holder``, given as ``(room, instance, epoch)``, in one round
    trip; False for each one that is no longer exactly ``holder`` at ``epoch`` (lost).

    One script over all the keys: fine on a single Redis; on a Redis Cluster the keys of
    different instances live in different slots, so the caller groups them by slot (or calls
    once per instance).
    """
    if not leases:
        return []
    with redis_errors(f"cannot renew {len(leases)} leases", client):
        found: Any = await _RENEW_SCRIPT(
            keys=[keys.lease_key(room, instance) for room, instance, _ in leases],
            args=[ttl_ms, *(_value(holder, epoch) for _, _, epoch in leases)],
            client=client,
        )
    return [flag == 1 for flag in cast(list[Any], found)]


async def release(
    client: coredis.Redis[Any], room: str, instance: str, holder: str, epoch: int
) -> bool:
    """Give up the lease if ``holder`` at ``epoch`` still holds it; returns whether it did.
    The epoch key stays: the next owner takes a newer epoch."""
    with redis_errors(f"cannot release the lease of room {room}/{instance}", client):
        done: Any = await _RELEASE_SCRIPT(
            keys=[keys.lease_key(room, instance)], args=[_value(holder, epoch)], client=client
        )
    return bool(done == 1)


async def owner(client: coredis.Redis[Any], room: str, instance: str) -> tuple[str, int] | None:
    """The current holder and epoch of ``room``/``instance`` (None: nobody holds it)."""
    with redis_errors(f"cannot read the lease of room {room}/{instance}", client):
        value = await client.get(keys.lease_key(room, instance))
    if value is None:
        return None
    holder, _, epoch = _text(value).rpartition(" ")
    return holder, int(epoch)
