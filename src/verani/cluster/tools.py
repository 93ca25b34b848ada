"""Internal: ``verani inspect --cluster`` and ``verani hibernate --cluster`` — what Redis says of
a cluster's rooms (owner node, epoch, sessions per node, stored state), and calls to owners."""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Any

import coredis
import orjson

from ..errors import StoreError
from ..store.base import StoredDocument
from . import keys, lease
from .node import _FORWARD, INBOX_MAXLEN, wait_reply
from .redis_store import RedisStore

#: Seconds a tool waits for an owner's answer.
ANSWER_TIMEOUT = 8.0


async def _instances(client: coredis.Redis[Any], room: str | None) -> list[tuple[str, str]]:
    """Every instance stored, owned or with sessions, of ``room`` if given, sorted."""
    found: set[tuple[str, str]] = set()
    for raw in await client.smembers(keys.INSTANCES):
        parsed = keys.parse_member(raw.decode())
        if parsed is not None:
            found.add(parsed)
    for suffix in (":lease", ":sessions"):
        async for raw in client.scan_iter(match=f"{keys.PREFIX}:{{*}}{suffix}"):
            name = raw.decode()
            tag = name[len(keys.PREFIX) + 2 : name.rindex("}")]
            parsed = keys.parse_member(tag)
            if parsed is not None:
                found.add(parsed)
    return sorted(key for key in found if room is None or key[0] == room)


async def _sessions(client: coredis.Redis[Any], room: str, instance: str) -> dict[str, int]:
    """Sessions of ``room``/``instance`` per node (only nodes that are alive)."""
    per_node: Counter[str] = Counter()
    alive: dict[str, bytes | None] = {}
    for raw in (await client.hgetall(keys.sessions_key(room, instance))).values():
        try:
            entry = orjson.loads(raw)
            node, conn = str(entry["n"]), str(entry["x"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if node not in alive:
            alive[node] = await client.get(keys.node_key(node))
        incarnation = alive[node]
        if incarnation is not None and conn.split(".")[0] == incarnation.decode():
            per_node[node] += 1
    return dict(sorted(per_node.items()))


def _owner(held: tuple[str, int] | None) -> dict[str, Any] | None:
    if held is None:
        return None
    return {"node": held[0].rpartition("#")[0], "holder": held[0], "epoch": held[1]}


async def cluster_rows(url: str, room: str | None) -> list[dict[str, Any]]:
    """One row per instance: owner, epoch, sessions per node, stored size and time."""
    async with _client(url) as client:
        store = RedisStore(client)
        rows = []
        for r, i in await _instances(client, room):
            peeked = await store.peek(r, i)
            rows.append(
                {
                    "room": r,
                    "instance": i,
                    "owner": _owner(await lease.owner(client, r, i)),
                    "sessions": await _sessions(client, r, i),
                    "bytes": peeked[1] if peeked else None,
                    "saved_at": peeked[0].saved_at.isoformat() if peeked else None,
                }
            )
        return rows


async def cluster_report(url: str, room: str, instance: str) -> dict[str, Any]:
    """One instance: owner, sessions per node, the stored document, and what its owner knows
    (``live``; None when no node owns it or the owner did not answer in time)."""
    async with _client(url) as client:
        store = RedisStore(client)
        peeked = await store.peek(room, instance)
        held = await lease.owner(client, room, instance)
        live = None
        live_error = None
        if held is not None:
            try:
                live = await call_owner(client, room, instance, ["inspect"])
            except StoreError as exc:
                live_error = str(exc)
        return {
            "room": room,
            "instance": instance,
            "owner": _owner(held),
            "sessions": await _sessions(client, room, instance),
            "stored": _stored(peeked[0], peeked[1]) if peeked else None,
            "live": live,
            "live_error": live_error,
        }


async def cluster_hibernate(
    url: str, room: str | None, instance: str | None
) -> list[tuple[str, str, str | None]]:
    """Ask the owner of each owned instance (of ``room``, or just ``room``/``instance``) to
    hibernate it; returns ``(room, instance, error)`` for each one asked."""
    async with _client(url) as client:
        if room is not None and instance is not None:
            targets = [(room, instance)]
        else:
            targets = await _instances(client, room)
        results = []
        for r, i in targets:
            if await lease.owner(client, r, i) is None:
                continue  # asleep: nothing to hibernate
            error = await call_owner(client, r, i, ["hibernate"])
            results.append((r, i, error if isinstance(error, str) else None))
        return results


async def call_owner(client: coredis.Redis[Any], room: str, instance: str, op: list[Any]) -> Any:
    """Run ``op`` on the node that owns ``room``/``instance`` and return its answer; raises
    :class:`StoreError` when no node owns it or it does not answer."""
    reply = keys.reply_key(secrets.token_hex(12))
    script = client.register_script(_FORWARD)
    message = orjson.dumps([["o", room, instance, reply, op]])
    holder: Any = await script(
        keys=[keys.lease_key(room, instance)],
        args=[message, keys.inbox_key(""), INBOX_MAXLEN],
    )
    if holder is None:
        raise StoreError(f"room {room}/{instance} is not awake on any node")
    try:
        return await wait_reply(client, reply, f"room {room}/{instance}", ANSWER_TIMEOUT)
    except Exception as exc:
        raise StoreError(str(exc)) from None


def _stored(doc: StoredDocument, size: int) -> dict[str, Any]:
    return {
        "state": doc.state,
        "storage": doc.storage,
        "schedules": doc.schedules,
        "saved_at": doc.saved_at.isoformat(),
        "format_version": doc.format_version,
        "bytes": size,
    }


def _client(url: str) -> coredis.Redis[Any]:
    return coredis.Redis.from_url(
        url, decode_responses=False, connect_timeout=2.0, stream_timeout=ANSWER_TIMEOUT + 2
    )
