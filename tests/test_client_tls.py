"""Connecting over TLS and reporting why a connection failed, in the client and `verani emit`.

Real components only: the verani server on 127.0.0.1, behind a TLS-terminating proxy whose
certificate comes from a trustme CA; `verani emit` runs as a subprocess. Real clock, and a
`fail_after` on every test.
"""

from __future__ import annotations

import functools
import pathlib
import re
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
import pytest
import trio
import trustme

from verani.client import NotConnectedError, ReconnectOptions, open_client
from verani.testing import open_test_server

from helpers import ROOMS, VERANI

COUNTER = ROOMS / "counter.py"
TLS_RECORD = b"\x16\x03"  # content type handshake, protocol major version 3


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def listening(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """A plain TCP listener on 127.0.0.1 running ``handler`` per connection; yields its port."""
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        yield listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tls_proxy(ca: trustme.CA, backend_port: int) -> AsyncIterator[tuple[int, bytearray]]:
    """TLS for localhost/127.0.0.1 in front of 127.0.0.1:``backend_port``.

    Yields the proxy's port and every byte it decrypted from clients (what the server saw).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    forwarded = bytearray()

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, record: bool) -> None:
        async for chunk in source:
            if record:
                forwarded.extend(chunk)
            await sink.send_all(chunk)

    async def handle(client: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await client.do_handshake()
            async with await trio.open_tcp_stream("127.0.0.1", backend_port) as backend:
                async with trio.open_nursery() as nursery:

                    async def both_ways() -> None:
                        async with trio.open_nursery() as inner:
                            inner.start_soon(pump, client, backend, True)
                            inner.start_soon(pump, backend, client, False)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(both_ways)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client refused our certificate, or one side went away

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_ssl_over_tcp,
                handle,
                0,
                context,
                host="127.0.0.1",
                https_compatible=True,
            )
        )
        yield listeners[0].transport_listener.socket.getsockname()[1], forwarded
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def counter_behind_tls(ca: trustme.CA) -> AsyncIterator[tuple[int, bytearray]]:
    async with open_test_server(COUNTER) as server:
        async with tls_proxy(ca, server.server.port) as proxy:
            yield proxy


async def verani(*args: str, limit: float = 30) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(limit):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [*VERANI, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    return result


# --- the client --------------------------------------------------------------------------------


async def test_wss_with_the_ca_trusted_connects_through_tls(ca: trustme.CA) -> None:
    with trio.fail_after(20):
        async with counter_behind_tls(ca) as (port, forwarded):
            url = f"wss://localhost:{port}/ws/counter?token=SECRET"
            async with open_client(url, ssl_context=trusting(ca)) as client:
                await client.wait_for_connection()
                assert (await client.receive("counter:sync"))["count"] == 0
                client.emit("counter:increment")
                assert (await client.receive("counter:update"))["count"] == 1
    # The proxy did see the request, once decrypted: what the next test checks is meaningful.
    assert b"GET /ws/counter?token=SECRET HTTP/1.1" in forwarded


async def test_wss_with_an_untrusted_certificate_fails_before_sending_anything(
    ca: trustme.CA,
) -> None:
    with trio.fail_after(20):
        async with counter_behind_tls(ca) as (port, forwarded):
            url = f"wss://localhost:{port}/ws/counter?token=SECRET"
            once = ReconnectOptions(enabled=False)
            async with open_client(url, reconnection=once) as client:  # the system's CAs
                errors: list[BaseException] = []
                client.on_error = errors.append
                with pytest.raises(NotConnectedError, match="gave up"):
                    await client.wait_for_connection()
    assert len(errors) == 1 and isinstance(errors[0], NotConnectedError)
    assert re.search(
        rf"cannot connect to wss://localhost:{port}/\S+: TLS handshake with localhost:{port} "
        r"failed: certificate verify failed: \S",
        str(errors[0]),
    ), errors[0]
    assert b"SECRET" not in forwarded


async def test_wss_sends_a_tls_client_hello_first_and_never_the_request_in_the_clear() -> None:
    received = bytearray()

    async def record(stream: trio.SocketStream) -> None:
        try:
            async for chunk in stream:  # never answers; reads until the client gives up
                received.extend(chunk)
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(10):
        async with listening(record) as port:
            url = f"wss://127.0.0.1:{port}/ws/counter?token=SECRET"
            once = ReconnectOptions(enabled=False)
            async with open_client(url, reconnection=once, connection_timeout=1) as client:
                errors: list[BaseException] = []
                client.on_error = errors.append
                with pytest.raises(NotConnectedError, match="gave up"):
                    await client.wait_for_connection()
    assert received[:2] == TLS_RECORD, bytes(received[:40])
    assert b"GET" not in received and b"SECRET" not in received
    assert "timed out after 1s" in str(errors[0])


def test_an_ssl_context_with_a_ws_url_is_refused() -> None:
    async def main() -> None:
        async with open_client("ws://127.0.0.1:1/ws", ssl_context=ssl.create_default_context()):
            pass  # pragma: no cover - never entered

    with pytest.raises(ValueError, match=r"ssl_context is for wss:// URLs; 'ws://127\.0\.0\.1"):
        trio.run(main)


# --- verani emit -------------------------------------------------------------------------------


async def test_emit_over_wss_with_cafile_prints_the_frames(
    ca: trustme.CA, cafile: pathlib.Path
) -> None:
    async with counter_behind_tls(ca) as (port, _):
        url = f"wss://localhost:{port}/ws/counter"
        sent = await verani("emit", url, "counter:get", "--cafile", str(cafile), "--wait", "0.5")
        assert sent.returncode == 0, sent.stderr
        frames = [orjson.loads(line) for line in sent.stdout.splitlines()]
        assert frames and {f["data"]["type"] for f in frames} == {"counter:sync"}
        untrusted = await verani("emit", url, "counter:get")  # the system's CAs
    assert untrusted.returncode == 1
    assert b"certificate verify failed" in untrusted.stderr, untrusted.stderr


async def test_emit_fails_promptly_when_the_peer_hangs_up_on_the_client_hello() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.aclose()

    async with listening(hang_up) as port:
        start = trio.current_time()
        result = await verani("emit", f"wss://localhost:{port}/ws/counter", "x", limit=8)
        elapsed = trio.current_time() - start
    assert result.returncode == 1
    assert elapsed < 5  # the default --timeout is 10: this is the TLS failure, not the deadline
    stderr = result.stderr.decode()
    assert re.match(
        rf"verani: error: cannot connect to wss://localhost:{port}/ws/counter: \S", stderr
    )
    assert "during the TLS handshake" in stderr


async def test_emit_times_out_against_a_peer_that_never_answers() -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with listening(mute) as port:
        for scheme in ("ws", "wss"):
            url = f"{scheme}://127.0.0.1:{port}/ws/counter"
            result = await verani("emit", url, "x", "--timeout", "1", limit=8)
            assert result.returncode == 1
            assert result.stderr.decode() == (
                f"verani: error: cannot connect to {url}: timed out after 1s\n"
            )


async def test_emit_usage_errors_for_the_connection_options(cafile: pathlib.Path) -> None:
    ws = await verani("emit", "ws://127.0.0.1:1/ws", "x", "--cafile", str(cafile))
    assert ws.returncode == 2 and b"--cafile: is for wss:// URLs only" in ws.stderr
    zero = await verani("emit", "wss://127.0.0.1:1/ws", "x", "--timeout", "0")
    assert zero.returncode == 2 and b"0.0 is not in the range x>0" in zero.stderr
