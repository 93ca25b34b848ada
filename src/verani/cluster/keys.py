"""Internal: the names of everything a cluster keeps in Redis.

Every key of one room instance carries the hash tag ``{ROOM/INSTANCE}`` (the instance name
encoded as the file store encodes it), so that on a Redis Cluster they live in one slot and one
script may touch them together.
"""

from __future__ import annotations

from ..store.base import decode_instance_name, encode_instance_name

PREFIX = "verani"

#: A set of ``ROOM/ENCODED_INSTANCE``: every instance with a stored document.
INSTANCES = f"{PREFIX}:instances"
#: A sorted set: member ``ROOM/ENCODED_INSTANCE``, score its earliest due schedule (epoch s).
DUE = f"{PREFIX}:due"
#: A hash: node id → what the node says of itself (JSON), for ``verani inspect --cluster``.
NODES = f"{PREFIX}:nodes"


def member(room: str, instance: str) -> str:
    """``ROOM/ENCODED_INSTANCE``: an instance in :data:`INSTANCES` and :data:`DUE`."""
    return f"{room}/{encode_instance_name(instance)}"


def parse_member(value: str) -> tuple[str, str] | None:
    """The ``(room, instance)`` of a :func:`member` string (None when it is not one)."""
    room, sep, stem = value.partition("/")
    if not sep:
        return None
    instance = decode_instance_name(stem)
    return None if instance is None else (room, instance)


def _tag(room: str, instance: str) -> str:
    return "{" + member(room, instance) + "}"


def doc_key(room: str, instance: str) -> str:
    """A hash: the instance's stored document, one field per section entry."""
    return f"{PREFIX}:{_tag(room, instance)}:doc"


def lease_key(room: str, instance: str) -> str:
    """A string ``HOLDER EPOCH`` with an expiry: who owns the instance now."""
    return f"{PREFIX}:{_tag(room, instance)}:lease"


def epoch_key(room: str, instance: str) -> str:
    """An integer that only grows: the fencing token of the instance's latest owner."""
    return f"{PREFIX}:{_tag(room, instance)}:epoch"


def sessions_key(room: str, instance: str) -> str:
    """A hash: client id → the session (its node, connection and meta, JSON), on every node."""
    return f"{PREFIX}:{_tag(room, instance)}:sessions"


def node_key(node: str) -> str:
    """A string with an expiry: the node is alive while it exists."""
    return f"{PREFIX}:node:{node}"


def inbox_key(node: str) -> str:
    """A stream: what other nodes send this node (frames for its sockets, events for its rooms)."""
    return f"{PREFIX}:inbox:{node}"


def reply_key(token: str) -> str:
    """A list: the answer to one call made across nodes (it expires unread)."""
    return f"{PREFIX}:reply:{token}"


def corrupt_key(room: str, instance: str, stamp: str) -> str:
    """A hash: a copy of the instance's document kept aside (``stamp``: UTC time, made unique
    by the caller), same slot as the document so one script copies it."""
    return f"{PREFIX}:{_tag(room, instance)}:corrupt:{stamp}"


def member_doc_key(value: str) -> str:
    """:func:`doc_key` of a :func:`member` string, for members whose instance name cannot be
    decoded from them (long names are hashed): the document's meta holds the real name."""
    return f"{PREFIX}:{{{value}}}:doc"
