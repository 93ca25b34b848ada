"""verani: Socket.IO-like realtime rooms with persisted state and hibernation, on Trio.

Define a room in a Python file with :func:`define_room`, serve it with ``verani serve FILE``.
"""

from .context import RoomActor, RoomContext, ScheduleContext
from .errors import (
    ClientError,
    CloseCodeError,
    ControlError,
    CorruptDocumentError,
    FrameEncodeError,
    FrameTooLargeError,
    HandshakeRefused,
    NoServerError,
    NotPersistableError,
    PersistenceError,
    ProtocolError,
    RemoteError,
    RoomCrashedError,
    RoomDefinitionError,
    RoomLoadError,
    RoomNotFoundError,
    StoreError,
    StoreLockedError,
    VeraniError,
)
from .protocol import ClientFrame
from .recovery import Recovery
from .room import PersistOptions, RoomDefinition, define_room
from .runtime import CallCycleError, RoomHandle, Runtime
from .schedules import Schedule
from .server import HandshakeRequest, ServeError, Server, ServerConfig, open_server
from .sessions import ConnectionMeta

__all__ = [
    "CallCycleError",
    "ClientError",
    "ClientFrame",
    "CloseCodeError",
    "ConnectionMeta",
    "ControlError",
    "CorruptDocumentError",
    "FrameEncodeError",
    "FrameTooLargeError",
    "HandshakeRefused",
    "HandshakeRequest",
    "NoServerError",
    "NotPersistableError",
    "PersistOptions",
    "PersistenceError",
    "ProtocolError",
    "Recovery",
    "RemoteError",
    "RoomActor",
    "RoomContext",
    "RoomCrashedError",
    "RoomDefinition",
    "RoomDefinitionError",
    "RoomHandle",
    "RoomLoadError",
    "RoomNotFoundError",
    "Runtime",
    "Schedule",
    "ScheduleContext",
    "ServeError",
    "Server",
    "ServerConfig",
    "StoreError",
    "StoreLockedError",
    "VeraniError",
    "define_room",
    "open_server",
]
