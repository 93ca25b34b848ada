"""Where room instances keep their persisted keys: the store interface and the file store."""

from verani.store.base import (
    FORMAT_VERSION,
    JSONValue,
    Store,
    StoredDocument,
    decode_instance_name,
    encode_instance_name,
    validate_room_name,
)
from verani.store.file import FileStore

__all__ = [
    "FORMAT_VERSION",
    "FileStore",
    "JSONValue",
    "Store",
    "StoredDocument",
    "decode_instance_name",
    "encode_instance_name",
    "validate_room_name",
]
