"""Internal: the local control endpoint the CLI uses to reach a running server, and the store lock.

One server per store: the server holds an exclusive ``flock`` on ``STORE/server.lock`` for its
lifetime. It listens for control requests on a Unix socket (mode 0600) in a private temporary
directory (mode 0700) — the store path can be longer than the ~107 bytes a Unix socket path may
have — and records that socket's path and its pid in ``STORE/server.json``. Nothing is reachable
from the network. Requests and answers are one JSON object per line.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pathlib
import shutil
import socket
import tempfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from .errors import ControlError, NoServerError, RoomNotFoundError, StoreLockedError

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("verani.control")

LOCK_FILE = "server.lock"
INFO_FILE = "server.json"
_MAX_REQUEST = 64 * 1024
# A reply lists every room instance a request touched: tens of thousands may be awake.
_MAX_REPLY = 256 * 1024 * 1024


class StoreLock:
    """An exclusive, process-lifetime lock on a store directory."""

    def __init__(
        self, directory: pathlib.Path, fd: int, created: tuple[pathlib.Path, ...] = ()
    ) -> None:
        self.directory = directory
        self._fd = fd
        #: What taking the lock created (the lock file, directories), newest first.
        self._created = created

    @classmethod
    def acquire(cls, directory: pathlib.Path) -> StoreLock:
        """Take the lock, or raise :class:`StoreLockedError` naming the server that holds it."""
        lock_file = directory / LOCK_FILE
        missing = [d for d in (directory, *directory.parents) if not d.exists()]
        created = ([] if lock_file.exists() else [lock_file]) + missing
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            _remove(missing)
            raise StoreLockedError(
                f"cannot use store directory {directory}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"store {directory} is already served by another verani server (pid {holder}); "
                f"stop it or pass a different --store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd, tuple(created))

    @staticmethod
    def is_held(directory: pathlib.Path) -> bool:
        """Whether some process holds the lock of ``directory`` now."""
        try:
            fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self, *, undo: bool = False) -> None:
        """Give the lock up (closing the file releases it).

        ``undo``: the server never started, so remove what taking the lock created — the lock
        file, and each directory it made that is still empty — leaving the disk as it was.
        """
        if self._fd < 0:
            return
        if undo:
            # Still locked while removing: no other server can take this lock file meanwhile.
            _remove(self._created)
        os.close(self._fd)
        self._fd = -1


def _remove(paths: Iterable[pathlib.Path]) -> None:
    """Remove each file, and each directory if empty, in order; what cannot go stays."""
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


async def serve_control(
    server: Server,
    store_dir: pathlib.Path,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests for ``server`` until cancelled; starts with the socket's path."""
    private = pathlib.Path(await trio.to_thread.run_sync(tempfile.mkdtemp, "", "verani-"))
    path = private / "control.sock"
    info = store_dir / INFO_FILE
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        record = {"pid": os.getpid(), "control": str(path), "url": server.url}
        await trio.to_thread.run_sync(_write_info, info, record)
        listener = trio.SocketListener(sock)
        task_status.started(str(path))
        await trio.serve_listeners(functools.partial(_handle, server), [listener])
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            info.unlink()
        shutil.rmtree(private, ignore_errors=True)


def _write_info(path: pathlib.Path, info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


async def _handle(server: Server, stream: trio.abc.Stream) -> None:
    async with stream:
        try:
            with trio.fail_after(5):
                request = await _read_line(stream)
            reply = await dispatch(server, request)
        except trio.BrokenResourceError:
            return
        except Exception as exc:
            # No control client may reach the server's nursery, whatever it sends.
            if not isinstance(exc, ControlError | ValueError | trio.TooSlowError):
                log.error("control request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            reply = {
                "ok": False,
                "error": str(exc) or type(exc).__name__,
                "kind": "not_found" if isinstance(exc, RoomNotFoundError) else "bad_request",
            }
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(orjson.dumps(reply) + b"\n")


async def _read_line(stream: trio.abc.ReceiveStream, limit: int = _MAX_REQUEST) -> dict[str, Any]:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"control message over {limit} bytes")
    try:
        obj = orjson.loads(bytes(data).split(b"\n", 1)[0])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"control request is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("control request must be a JSON object")  # noqa: TRY004 - bad input
    return obj


async def dispatch(server: Server, request: dict[str, Any]) -> dict[str, Any]:
    """Answer one control request (``status``, ``inspect``, ``hibernate``) in process: what the
    control socket sends back, and what the HTTP API reports from."""
    op = request.get("op")
    if op == "status":
        return {
            "ok": True,
            "pid": os.getpid(),
            "url": server.url,
            "rooms": {r.name: r.websocket_path for r in server.router.rooms},
            "stats": attrs.asdict(server.stats),
            "store_saves": server.supervisor.store.saves,
            "store_writes": server.supervisor.store.writes,
            "revive_ms": list(server.supervisor.revive_ms),
            "instances": [
                {"room": s.room, "instance": s.instance, "awake": s.awake, "sessions": s.sessions}
                for s in server.supervisor.status()
            ],
        }
    if op == "inspect":
        room, instance = request.get("room"), request.get("instance")
        if not isinstance(room, str) or not isinstance(instance, str):
            raise ValueError("inspect: room and instance must be strings")
        return {
            "ok": True,
            "served": room in server.supervisor.rooms,
            "live": server.supervisor.inspect(room, instance),
        }
    if op == "hibernate":
        room, instance = request.get("room"), request.get("instance")
        if not (room is None or isinstance(room, str)) or not (
            instance is None or isinstance(instance, str)
        ):
            raise ValueError("hibernate: room and instance must be strings")
        results = await server.hibernate(room, instance)
        return {
            "ok": all(error is None for _, _, error in results),
            "hibernated": [{"room": r, "instance": i, "error": e} for r, i, e in results],
        }
    raise ValueError(f"unknown control operation {op!r}; known: status, inspect, hibernate")


async def control_request(
    store_dir: str | os.PathLike[str], request: dict[str, Any], *, timeout: float = 60.0
) -> dict[str, Any]:
    """Send one request to the server serving ``store_dir`` and return its answer.

    Raises :class:`NoServerError` when no server serves that store, :class:`RoomNotFoundError`
    when the server names no such room, :class:`ControlError` for any other failure.
    """
    directory = pathlib.Path(os.path.abspath(store_dir))  # noqa: ASYNC240 - no I/O
    hint = f"start one with: verani serve ROOMS --store {store_dir}"
    try:
        info = orjson.loads(await trio.Path(directory / INFO_FILE).read_bytes())
        path = str(info["control"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        raise NoServerError(f"no verani server is running for store {store_dir} ({hint})") from None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(orjson.dumps(request) + b"\n")
                reply = await _read_line(stream, _MAX_REPLY)
    except OSError:
        if StoreLock.is_held(directory):
            raise ControlError(
                f"the verani server of store {store_dir} (pid {info.get('pid')}) does not answer "
                f"on {path}"
            ) from None
        raise NoServerError(
            f"no verani server is running for store {store_dir} (pid {info.get('pid')} left a "
            f"stale {INFO_FILE}; {hint})"
        ) from None
    except trio.BrokenResourceError as exc:
        raise ControlError(
            f"the verani server of store {store_dir} went away before answering: {exc}"
        ) from None
    except trio.TooSlowError:
        raise ControlError(
            f"the verani server of store {store_dir} did not answer within {timeout}s"
        ) from None
    except ValueError as exc:
        raise ControlError(
            f"the verani server of store {store_dir} answered badly: {exc}"
        ) from None
    if not reply.get("ok") and reply.get("kind") == "not_found":
        raise RoomNotFoundError(str(reply.get("error")))
    if not reply.get("ok") and reply.get("kind") == "bad_request":
        raise ControlError(str(reply.get("error")))
    return reply
