"""Internal: the one WebSocket behind ``verani emit`` and ``verani listen``.

Connect (TCP, TLS for ``wss://``, the upgrade: all within one deadline), send one event if
asked, then print every frame received as one line until the time is up, the server closes the
connection, standard output is closed (its reader, ``head`` say, went away) or Ctrl-C. How it
ended is returned; turning that into an exit status is the CLI's job.
"""

from __future__ import annotations

import math
import os
import signal
import ssl
import sys
from typing import Any

import attrs
import trio
import trio_websocket

from .client import Stream, WebSocketURL, describe_connect_error, open_stream, websocket_over
from .errors import NotConnectedError, leaf_exceptions
from .protocol import encode_client_event


@attrs.define
class Ending:
    """How a session ended; all unset: its time was up."""

    #: The server closed the connection: its close code and reason, as text.
    closed_by_server: str | None = None
    #: Standard output was closed, so nothing more could be shown.
    output_closed: bool = False
    #: Ctrl-C (SIGINT) stopped it.
    interrupted: bool = False


async def run_session(
    address: WebSocketURL,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    send: tuple[str, Any] | None = None,
    seconds: float | None = None,
) -> Ending:
    """Connect to ``address``, send ``send`` (an event and its data) if given, and print what
    arrives for ``seconds`` (None: until something else ends it).

    Raises :class:`NotConnectedError` naming the cause when connecting fails, the server refuses the
    upgrade (with its HTTP status and body), or the connection breaks.
    """
    ending = Ending()
    failure: NotConnectedError | None = None
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:

            async def stop_on_interrupt() -> None:
                async for _ in interrupts:
                    ending.interrupted = True
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_interrupt)
            failure = await _connect_and_print(address, timeout, ssl_context, send, seconds, ending)
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return ending


async def _connect_and_print(
    address: WebSocketURL,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    send: tuple[str, Any] | None,
    seconds: float | None,
    ending: Ending,
) -> NotConnectedError | None:
    # The failure is returned, not raised: raised here it would reach run_session's caller
    # wrapped in the exception group of run_session's own nursery.
    stream: Stream | None = None
    connected = False
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(timeout):
                stream = await open_stream(address, ssl_context)
                ws = await websocket_over(nursery, stream, address)
            connected = True
            await _converse(ws, send, seconds, ending)
            nursery.cancel_scope.cancel()
    except* (OSError, trio.TooSlowError, trio_websocket.HandshakeError, NotConnectedError) as group:
        failure = group.exceptions[0]
    finally:
        if stream is not None:
            # trio-websocket leaves the socket open when the server refuses the handshake.
            await trio.aclose_forcefully(stream)
    if failure is None:
        return None
    if isinstance(failure, trio_websocket.ConnectionRejected):
        return NotConnectedError(
            f"{address.url} refused the connection: {describe_connect_error(failure)}"
        )
    cause = describe_connect_error(failure, timeout)
    if connected:
        return NotConnectedError(f"the connection to {address.url} broke: {cause}")
    if _refused(failure):
        cause += f" (is a verani server running on {address.host}:{address.port}?)"
    return NotConnectedError(f"cannot connect to {address.url}: {cause}")


def _refused(exc: BaseException) -> bool:
    """Whether every attempt to connect was refused: nothing listens on that port."""
    if isinstance(exc, OSError) and isinstance(exc.__cause__, BaseExceptionGroup):
        exc = exc.__cause__  # trio.open_tcp_stream: one OSError per address tried
    leaves = list(leaf_exceptions(exc)) if isinstance(exc, BaseExceptionGroup) else [exc]
    return all(isinstance(leaf, ConnectionRefusedError) for leaf in leaves)


async def _converse(
    ws: trio_websocket.WebSocketConnection,
    send: tuple[str, Any] | None,
    seconds: float | None,
    ending: Ending,
) -> None:
    try:
        if send is not None:
            await ws.send_message(encode_client_event(*send))
        with trio.move_on_after(math.inf if seconds is None else seconds):
            while True:
                if not _print_line(await ws.get_message()):
                    ending.output_closed = True
                    break
    except trio_websocket.ConnectionClosed as closed:
        reason = closed.reason
        ending.closed_by_server = (
            "without a close code"
            if reason is None
            else f"code {reason.code}" + (f": {reason.reason}" if reason.reason else "")
        )
        return
    with trio.move_on_after(1):  # a polite close; the stream is closed regardless
        await ws.aclose()


def _print_line(message: str | bytes) -> bool:
    """Print one frame as a line; False when standard output is closed."""
    try:
        print(message if isinstance(message, str) else repr(message), flush=True)
    except BrokenPipeError:
        return False
    return True


def detach_stdout() -> None:
    """Point standard output at the null device, after its reader went away.

    What could not be written is still in the buffer, and the interpreter flushes it on exit:
    into the closed pipe that would print a BrokenPipeError and exit 120.
    """
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
