"""Testing rooms the way ``trio.testing`` tests Trio code: a real server in the test's process.

::

    from verani.testing import open_test_server

    async def test_counter_survives_hibernation(autojump_clock):
        async with open_test_server("rooms/counter.py") as server:
            ann = await server.connect("/ws/counter", user_id="ann")
            assert (await ann.receive("counter:sync"))["count"] == 0
            await ann.emit("counter:increment", {"amount": 2})
            assert (await ann.receive("counter:update"))["count"] == 2
            await server.hibernate("counter")
            await server.restart()                      # same store, new runtime
            assert (await server.state("counter"))["count"] == 2

The server listens on 127.0.0.1, port 0, with an in-memory store by default (no worker threads,
so idle timeouts on ``MockClock(autojump_threshold=0)`` take no wall-clock time and nothing jumps
the clock behind the test's back). Clients speak the wire protocol over real WebSockets.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson
import trio
import trio_websocket

from .errors import AckError, ClientClosed, RoomLoadError, VeraniError, single_error
from .loader import load_rooms
from .protocol import AckAnswer, ack_answer, decode_server_frame, encode_client_event, event_data
from .room import DEFAULT_IDLE_TIMEOUT, RoomDefinition
from .runtime import RoomHandle
from .schedules import Schedule, stored_schedule
from .server import Server, ServerConfig, open_server
from .store import MemoryStore, Store

__all__ = ["AckError", "ClientClosed", "TestClient", "TestServer", "open_test_server"]


class TestClient:
    """One WebSocket connection to a test server, speaking Verani's wire protocol."""

    __test__ = False  # not a pytest test class

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._pending: list[dict[str, Any]] = []
        self._answers: dict[int | str, AckAnswer] = {}
        self._next_id = 0

    async def emit(self, event: str, data: Any = None) -> None:
        """Send ``{"type": event, "data": data}``."""
        await self.send(encode_client_event(event, data))

    async def call(self, event: str, data: Any = None) -> Any:
        """Send ``event`` with a fresh ``"id"`` and return the room's answer (what its handler
        returned), once the server acknowledges it; raise :class:`AckError` (with its ``code``)
        when the answer is an error. Events that arrive meanwhile are kept for :meth:`receive`.
        """
        self._next_id += 1
        ack_id = self._next_id
        await self.send(encode_client_event(event, data, ack_id=ack_id))
        while ack_id not in self._answers:
            payload = await self._next_event()
            if payload is not None:
                self._pending.append(payload)
        answer = self._answers.pop(ack_id)
        if answer.error is not None:
            raise AckError(str(answer.error.get("code")), str(answer.error.get("message")))
        return answer.data

    async def send(self, frame: Any) -> None:
        """Send a raw frame: a str or bytes as is, anything else as JSON."""
        message = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
        try:
            await self.ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self, event: str | None = None) -> dict[str, Any]:
        """The payload (``data``, with its ``type``) of the next event, or of the next ``event``.

        Frames of other events that arrive first are kept for later calls, so the order of
        ``receive`` calls need not match the order of arrival. Raises :class:`ClientClosed`
        when the server closes the socket first.
        """
        for i, pending in enumerate(self._pending):
            if event is None or pending.get("type") == event:
                return self._pending.pop(i)
        while True:
            data = await self._next_event()
            if data is None:
                continue
            if event is None or data.get("type") == event:
                return data
            self._pending.append(data)

    async def _next_event(self) -> dict[str, Any] | None:
        """The payload of the next frame if it is an event; an ack is kept for the call()
        awaiting it (None then, as for any other frame)."""
        frame = await self.recv()
        answer = ack_answer(frame)
        if answer is not None:
            self._answers[answer.id] = answer
            return None
        return event_data(frame)

    async def recv(self) -> dict[str, Any]:
        """The next raw frame, decoded (events, pongs), bypassing :meth:`receive`'s buffer.

        Raises :class:`~verani.ProtocolError` if the server sent something that is not a JSON
        object.
        """
        try:
            message = await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None
        return decode_server_frame(message)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the socket (the room's ``on_disconnect`` sees ``code`` and ``reason``)."""
        await self.ws.aclose(code, reason)
        await trio.aclose_forcefully(self.ws._stream)


def _closed(exc: trio_websocket.ConnectionClosed) -> ClientClosed:
    reason = exc.reason
    return ClientClosed(reason.code if reason else None, reason.reason if reason else None)


class TestServer:
    """A running test server: connect clients, hibernate rooms, restart, read stored state."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        rooms: Sequence[RoomDefinition[Any]],
        store: Store,
        idle_timeout: float,
        config: ServerConfig | None,
        nursery: trio.Nursery,
    ) -> None:
        self.rooms = list(rooms)
        self.store = store
        self._idle_timeout = idle_timeout
        self._config = config
        self._nursery = nursery
        self._server: Server | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._clients: list[TestClient] = []

    async def _start(self, port: int = 0) -> None:
        # The server lives in a task of the test server's own nursery, so restart() can stop and
        # start it from any task and any depth of nurseries or cancel scopes in the test.
        self._stopped = trio.Event()
        self._server = await self._nursery.start(self._serve, port, self._stopped)

    async def _serve(
        self, port: int, stopped: trio.Event, *, task_status: trio.TaskStatus[Server]
    ) -> None:
        self._stop = trio.Event()
        try:
            async with open_server(
                self.rooms,
                port=port,
                store=self.store,
                idle_timeout=self._idle_timeout,
                config=self._config,
                control=False,
            ) as server:
                task_status.started(server)
                await self._stop.wait()
        finally:
            stopped.set()

    async def _stop_server(self) -> None:
        if self._server is not None:
            self._stop.set()
            await self._stopped.wait()
            self._server = None

    @property
    def server(self) -> Server:
        """The running :class:`~verani.Server`."""
        if self._server is None:
            raise VeraniError("the test server is not running")
        return self._server

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT``."""
        return self.server.url

    async def connect(
        self, path: str, *, user_id: str | None = None, query: str = ""
    ) -> TestClient:
        """Open a WebSocket to ``path`` (``?userId=`` added when given); closed with the server."""
        params = "&".join(p for p in (f"userId={user_id}" if user_id else "", query) if p)
        url = f"{self.url}{path}{'?' + params if params else ''}"
        ws = await trio_websocket.connect_websocket_url(self._nursery, url, message_queue_size=64)
        client = TestClient(ws)
        self._clients.append(client)
        return client

    async def hibernate(
        self, room: str | None = None, instance: str | None = None
    ) -> list[tuple[str, str, str | None]]:
        """Hibernate awake rooms now and wait until their state is stored (as the CLI does)."""
        return await self.server.hibernate(room, instance)

    async def restart(self) -> None:
        """Stop the server (every room saves and hibernates, sockets close with 1001) and start
        a new one on the same store and port, as after a deploy. Test clients must connect
        again; a :func:`verani.client.open_client` client reconnects by itself."""
        port = self.server.port
        await self._stop_server()
        await self._start(port)

    async def state(self, room: str, instance: str = "default") -> dict[str, Any]:
        """The persisted state of ``room``/``instance`` as stored, decoded to Python values."""
        definition = next((r for r in self.rooms if r.name == room), None)
        if definition is None:
            raise VeraniError(f"no room named {room!r} in this test server")
        doc = await self.store.load(room, instance)
        if doc is None:
            return {}
        codec = self.server.supervisor.codec
        types = definition.state_spec.key_types
        return {k: codec.decode(v, types.get(k, Any), path=k) for k, v in doc.state.items()}

    async def advance_to_next_schedule(self) -> tuple[str, str, Schedule] | None:
        """Sleep until the next schedule of any room comes due and wait until it has run;
        returns ``(room, instance, schedule)``, or None when nothing is scheduled. Meant for
        ``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``): an hour ahead
        takes no wall time."""
        supervisor = self.server.supervisor
        assert supervisor.clock is not None
        upcoming: list[tuple[Any, str, str, Schedule]] = []
        for (room, instance), inst in supervisor.instances.items():
            actor = inst.actor
            if actor is not None and actor.schedules is not None:
                upcoming += [(e.due, room, instance, e) for e in actor.schedules.list()]
        awake = {(r, i) for _, r, i, _ in upcoming}
        for room, instance in self.store.due_times():
            if (room, instance) not in awake:
                doc = await self.store.load(room, instance)
                for key, raw in (doc.schedules if doc is not None else {}).items():
                    entry = stored_schedule(key, raw)
                    upcoming.append((entry.due, room, instance, entry))
        if not upcoming:
            return None
        due, room, instance, entry = min(upcoming, key=lambda item: (item[0], item[3].id))
        await trio.sleep_until(supervisor.clock.deadline(due))
        # The run happens in the room's own task (woken first if it sleeps), which tells no one.
        while self._pending(room, instance, entry.id, due):  # noqa: ASYNC110
            await trio.sleep(0.001)
        return room, instance, entry

    def _pending(self, room: str, instance: str, key: str, due: Any) -> bool:
        inst = self.server.supervisor.instances.get((room, instance))
        actor = inst.actor if inst is not None else None
        if actor is None or actor.schedules is None:
            return True  # being woken
        return any(e.id == key and e.due == due for e in actor.schedules.list())

    def room(self, name: str, instance: str = "default") -> RoomHandle:
        """A handle to reach a room instance from the test, as other code would."""
        return self.server.room(name, instance)

    async def _close(self) -> None:
        for client in self._clients:
            await trio.aclose_forcefully(client.ws)
            await trio.aclose_forcefully(client.ws._stream)
        await self._stop_server()


def open_test_server(
    *rooms: RoomDefinition[Any] | str | os.PathLike[str],
    store: Store | None = None,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    config: ServerConfig | None = None,
    relative_to: str | os.PathLike[str] | None = None,
) -> AbstractAsyncContextManager[TestServer]:
    """Serve ``rooms`` (definitions, or paths of room files) on 127.0.0.1 for a test.

    ``store`` defaults to a fresh :class:`~verani.store.MemoryStore`; pass a
    :class:`~verani.store.FileStore` on ``tmp_path`` to test against files.

    A relative room path is looked up in the working directory first; if it is not there, in
    the directory of ``relative_to`` (a file or a directory; default: the file that calls
    ``open_test_server``, the test) and then in each directory above it. So
    ``"rooms/counter.py"`` is found whether pytest runs from the project's root or from
    ``tests/``. A path found nowhere raises :class:`~verani.RoomLoadError` saying where it looked.
    """
    if relative_to is None:
        relative_to = sys._getframe(1).f_code.co_filename
    near = pathlib.Path(relative_to).absolute()
    definitions = [
        room if isinstance(room, RoomDefinition) else _find_room_file(room, near) for room in rooms
    ]
    return _serve_for_test(definitions, store, idle_timeout, config)


def _find_room_file(path: str | os.PathLike[str], near: pathlib.Path) -> pathlib.Path:
    relative = pathlib.Path(path)
    if relative.is_absolute() or relative.exists():
        return relative
    start = near if near.is_dir() else near.parent
    for directory in (start, *start.parents):
        if (directory / relative).exists():
            return directory / relative
    raise RoomLoadError(
        f"room file {relative} does not exist: looked in the working directory "
        f"({pathlib.Path.cwd()}), then in {start} and every directory above it"
    )


@asynccontextmanager
async def _serve_for_test(
    rooms: list[RoomDefinition[Any] | pathlib.Path],
    store: Store | None,
    idle_timeout: float,
    config: ServerConfig | None,
) -> AsyncIterator[TestServer]:
    definitions: list[RoomDefinition[Any]] = []
    paths = [r for r in rooms if not isinstance(r, RoomDefinition)]
    definitions.extend(r for r in rooms if isinstance(r, RoomDefinition))
    if paths:
        definitions.extend(load_rooms(paths))
    with single_error():
        async with trio.open_nursery() as nursery:
            server = TestServer(definitions, store or MemoryStore(), idle_timeout, config, nursery)
            await server._start()
            try:
                yield server
            finally:
                await server._close()
                nursery.cancel_scope.cancel()
