"""Reach the rooms of a running server from another process, through its HTTP API.

For scripts and web apps (a Django view, a FastAPI endpoint, a cron job) that must notify a
user or a room: the server runs with ``verani serve --api-token TOKEN`` and this module speaks
to it over HTTP::

    from verani.remote import RoomsClient

    with RoomsClient("http://127.0.0.1:8787", token) as rooms:
        rooms.emit("chat", "lobby", "chat:message", {"text": "deploy done"}, channel="default")
        rooms.emit("notifications", "default", "notify", {"n": 1}, user_id="alice")

:class:`AsyncRoomsClient` is the same for async code (asyncio or Trio). Every failure raises
:class:`~verani.errors.RemoteError` with the HTTP status and the server's message.
"""

from __future__ import annotations

import ssl
import urllib.parse
from types import TracebackType
from typing import Any, Self

import httpx

from .errors import RemoteError

__all__ = ["AsyncRoomsClient", "RemoteError", "RoomsClient"]

_PREFIX = "/_verani/api/rooms"


def _instance_path(room: str, instance: str, action: str = "") -> str:
    # Every character quoted: an instance name may hold '/', '?' or '%', which must reach the
    # server as part of the name (it refuses the ones it cannot use, with 400).
    path = f"{_PREFIX}/{urllib.parse.quote(room, safe='')}/{urllib.parse.quote(instance, safe='')}"
    return f"{path}/{action}" if action else path


def _emit_body(event: str, data: Any, channel: str | None, user_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"event": event, "data": data}
    if channel is not None:
        body["channel"] = channel
    if user_id is not None:
        body["user_id"] = user_id
    return body


def _result(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise RemoteError(
            response.status_code,
            f"the answer is not a JSON object: {response.text[:200]!r}",
        )
    if response.status_code >= 400:
        raise RemoteError(response.status_code, str(body.get("error", "")), body)
    return body


def _options(
    base_url: str, token: str, timeout: float, verify: ssl.SSLContext | bool
) -> dict[str, Any]:
    if not token:
        raise ValueError("the API token is empty")
    return {
        "base_url": base_url.rstrip("/"),
        "headers": {"Authorization": f"Bearer {token}"},
        "timeout": timeout,
        "verify": verify,
    }


class RoomsClient:
    """A synchronous client of a server's HTTP API at ``base_url`` (``http://HOST:PORT``).

    ``token`` is the server's ``--api-token``; ``timeout`` bounds each request in seconds (an
    emit waits for the room to wake and for durability); ``verify`` is an
    :class:`ssl.SSLContext` for https with a private CA, or False to skip verification. Use it
    in a ``with`` block, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._http = httpx.Client(**_options(base_url, token, timeout, verify))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections kept open."""
        self._http.close()

    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise RemoteError(None, f"cannot reach {self._http.base_url}: {exc}") from None
        return _result(response)

    def emit(
        self,
        room: str,
        instance: str,
        event: str,
        data: Any = None,
        channel: str | None = None,
        user_id: str | None = None,
    ) -> int:
        """Send ``event`` with ``data`` to the sockets of ``user_id`` or on ``channel``
        (``"default"`` when neither is given) in ``room``/``instance``, waking it if it
        hibernates; returns how many sockets it was sent to."""
        body = _emit_body(event, data, channel, user_id)
        return int(self._request("POST", _instance_path(room, instance, "emit"), body)["sent"])

    def rooms(self) -> list[dict[str, Any]]:
        """Every room instance, stored or awake, with its status (as ``verani inspect --json``)."""
        instances: list[dict[str, Any]] = self._request("GET", _PREFIX)["instances"]
        return instances

    def inspect(self, room: str, instance: str) -> dict[str, Any]:
        """Everything known of ``room``/``instance``, as ``verani inspect ROOM/INSTANCE --json``
        prints it."""
        return self._request("GET", _instance_path(room, instance))

    def hibernate(self, room: str, instance: str) -> dict[str, Any]:
        """Hibernate ``room``/``instance`` now, once its state is durable:
        ``{"ok": True, "hibernated": [{"room", "instance", "error"}]}`` (empty when asleep)."""
        return self._request("POST", _instance_path(room, instance, "hibernate"))

    def disconnect(
        self, room: str, instance: str, client_id: str | None = None, user_id: str | None = None
    ) -> int:
        """Close the socket of ``client_id``, or every socket of ``user_id`` (give one), with
        4000; returns how many sockets are being closed."""
        body = _disconnect_body(client_id, user_id)
        reply = self._request("POST", _instance_path(room, instance, "disconnect"), body)
        return int(reply["disconnected"])


class AsyncRoomsClient:
    """:class:`RoomsClient` for async code (asyncio or Trio): the same methods, awaited. Use it
    in an ``async with`` block, or await :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._http = httpx.AsyncClient(**_options(base_url, token, timeout, verify))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections kept open."""
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise RemoteError(None, f"cannot reach {self._http.base_url}: {exc}") from None
        return _result(response)

    async def emit(
        self,
        room: str,
        instance: str,
        event: str,
        data: Any = None,
        channel: str | None = None,
        user_id: str | None = None,
    ) -> int:
        """See :meth:`RoomsClient.emit`."""
        body = _emit_body(event, data, channel, user_id)
        reply = await self._request("POST", _instance_path(room, instance, "emit"), body)
        return int(reply["sent"])

    async def rooms(self) -> list[dict[str, Any]]:
        """See :meth:`RoomsClient.rooms`."""
        instances: list[dict[str, Any]] = (await self._request("GET", _PREFIX))["instances"]
        return instances

    async def inspect(self, room: str, instance: str) -> dict[str, Any]:
        """See :meth:`RoomsClient.inspect`."""
        return await self._request("GET", _instance_path(room, instance))

    async def hibernate(self, room: str, instance: str) -> dict[str, Any]:
        """See :meth:`RoomsClient.hibernate`."""
        return await self._request("POST", _instance_path(room, instance, "hibernate"))

    async def disconnect(
        self, room: str, instance: str, client_id: str | None = None, user_id: str | None = None
    ) -> int:
        """See :meth:`RoomsClient.disconnect`."""
        body = _disconnect_body(client_id, user_id)
        reply = await self._request("POST", _instance_path(room, instance, "disconnect"), body)
        return int(reply["disconnected"])


def _disconnect_body(client_id: str | None, user_id: str | None) -> dict[str, Any]:
    if (client_id is None) == (user_id is None):
        raise TypeError("disconnect() takes a client_id or a user_id= (exactly one)")
    return {"client_id": client_id} if client_id is not None else {"user_id": user_id}
