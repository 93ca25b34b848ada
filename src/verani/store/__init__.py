"""Where room instances keep their persisted keys: the store interface and the file store."""

from verani.store.base import (
    FORMAT_VERSION,
    MIGRATIONS,
    JSONValue,
    Migration,
    Store,
    StoredDocument,
    decode_instance_name,
    encode_instance_name,
    validate_room_name,
)
from verani.store.file import FileStore
from verani.store.memory import MemoryStore

__all__ = [
    "FORMAT_VERSION",
    "MIGRATIONS",
    "FileStore",
    "JSONValue",
    "MemoryStore",
    "Migration",
    "Store",
    "StoredDocument",
    "decode_instance_name",
    "encode_instance_name",
    "validate_room_name",
]
