"""The channels, auth and rate_limit example rooms end to end: real server, sockets and store.

To show that a socket did *not* get a frame, a test makes it ask for something afterwards and
checks that the answer is its very next frame: frames reach a socket in turn order, so a frame
from an earlier turn would have come first.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Any

import pytest
import trio

from verani import RoomDefinition, open_server
from verani.loader import load_rooms

from helpers import ROOMS, Client, connect, http_request, upgrade_request

SECRET = "test-secret"


@pytest.fixture
def channels_rooms() -> list[RoomDefinition[Any]]:
    return load_rooms([ROOMS / "channels.py"])


@pytest.fixture
def rate_limit_rooms() -> list[RoomDefinition[Any]]:
    return load_rooms([ROOMS / "rate_limit.py"])


@pytest.fixture
def auth(monkeypatch: pytest.MonkeyPatch) -> tuple[list[RoomDefinition[Any]], Any]:
    """rooms/auth.py's rooms and the module itself (for make_token), with a test secret."""
    monkeypatch.setenv("VERANI_AUTH_SECRET", SECRET)
    rooms = load_rooms([ROOMS / "auth.py"])
    return rooms, inspect.getmodule(rooms[0].hooks.extract_meta)


async def next_frame(client: Client) -> tuple[str, dict[str, Any]]:
    """The very next frame, which must be an event: ``(channel, data)``."""
    frame = await client.recv()
    assert frame["type"] == "event", frame
    return frame["channel"], frame["data"]


async def join(client: Client, channel: str) -> list[str]:
    await client.emit("channels:join", {"channel": channel})
    _, data = await next_frame(client)
    assert (data["type"], data["channel"]) == ("channels:joined", channel), data
    channels: list[str] = data["channels"]
    return channels


# --- channels ---------------------------------------------------------------------------------


async def test_channel_messages_reach_its_members_only(
    tmp_path: Any, channels_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(10):
        async with open_server(channels_rooms, store=str(tmp_path)) as server:
            url = server.url
            async with (
                connect(url, "/ws/channels", user_id="ann") as ann,
                connect(url, "/ws/channels", user_id="bob") as bob,
                connect(url, "/ws/channels", user_id="carol") as carol,
            ):
                assert await join(ann, "news") == ["news"]
                assert await join(ann, "news") == ["news"]  # twice is harmless
                assert await join(bob, "news") == ["news"]
                assert await join(carol, "sports") == ["sports"]

                await ann.emit("channels:message", {"channel": "news", "text": "hi"})
                for client in (ann, bob):  # the sender included
                    channel, data = await next_frame(client)
                    assert channel == "news"
                    assert data == {
                        "type": "channels:message",
                        "channel": "news",
                        "from": "ann",
                        "text": "hi",
                    }

                # Carol is not on "news": she did not get "hi" (her next frame is the error), and
                # her own message to it went nowhere.
                await carol.emit("channels:message", {"channel": "news", "text": "let me in"})
                _, data = await next_frame(carol)
                assert data == {"type": "error", "code": "not_a_member", "channel": "news"}
                await bob.emit("channels:message", {"channel": "news", "text": "after"})
                for client in (ann, bob):
                    _, data = await next_frame(client)
                    assert (data["from"], data["text"]) == ("bob", "after")


async def test_leave_stops_delivery_and_bad_channels_are_refused(
    tmp_path: Any, channels_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(10):
        async with open_server(channels_rooms, store=str(tmp_path)) as server:
            url = server.url
            async with (
                connect(url, "/ws/channels", user_id="ann") as ann,
                connect(url, "/ws/channels", user_id="bob") as bob,
            ):
                await join(ann, "news")
                assert await join(bob, "news") == ["news"]
                assert await join(bob, "music") == ["news", "music"]
                await bob.emit("channels:leave", {"channel": "news"})
                _, data = await next_frame(bob)
                assert data == {"type": "channels:left", "channel": "news", "channels": ["music"]}

                await ann.emit("channels:message", {"channel": "news", "text": "hi"})
                assert (await next_frame(ann))[1]["text"] == "hi"
                await bob.emit("channels:message", {"channel": "news", "text": "me too"})
                _, data = await next_frame(bob)
                assert (data["type"], data["code"]) == ("error", "not_a_member")

                for bad in ["", "x" * 33, "two words", 7, None, "default"]:
                    for event in ("channels:join", "channels:leave"):
                        await bob.emit(event, {"channel": bad})
                        _, data = await next_frame(bob)
                        assert (data["type"], data["code"]) == ("error", "invalid_channel"), bad
                await bob.emit("channels:join", "not an object")
                assert (await next_frame(bob))[1]["code"] == "invalid_channel"
                for i in range(15):
                    await join(bob, f"c{i}")
                await bob.emit("channels:join", {"channel": "one-too-many"})
                assert (await next_frame(bob))[1]["code"] == "too_many_channels"
                assert len(await join(bob, "music")) == 16  # already on it: still fine
                await bob.emit("channels:message", {"channel": "music", "text": ""})
                assert (await next_frame(bob))[1]["code"] == "invalid_text"

                # "default" cannot be left, so it stays the room-wide channel everyone is on.
                await bob.emit("channels:message", {"channel": "default", "text": "all"})
                for client in (ann, bob):
                    channel, data = await next_frame(client)
                    assert (channel, data["from"], data["text"]) == ("default", "bob", "all")


async def test_memberships_survive_hibernation(
    tmp_path: Any, channels_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(10):
        async with open_server(channels_rooms, store=str(tmp_path)) as server:
            url = server.url
            async with (
                connect(url, "/ws/channels", user_id="ann") as ann,
                connect(url, "/ws/channels", user_id="bob") as bob,
                connect(url, "/ws/channels", user_id="carol") as carol,
            ):
                await join(ann, "news")
                await join(bob, "news")
                await join(carol, "sports")

                assert await server.hibernate("channels") == [("channels", "default", None)]
                [status] = server.supervisor.status()
                assert (status.awake, status.sessions) == (False, 3)

                # The message wakes the room, which finds the memberships on the sockets.
                await ann.emit("channels:message", {"channel": "news", "text": "still here"})
                for client in (ann, bob):
                    channel, data = await next_frame(client)
                    assert (channel, data["text"]) == ("news", "still here")
                await carol.emit("channels:message", {"channel": "sports", "text": "goal"})
                assert (await next_frame(carol))[1]["text"] == "goal"
                await carol.emit("channels:message", {"channel": "news", "text": "?"})
                assert (await next_frame(carol))[1]["code"] == "not_a_member"


# --- auth -------------------------------------------------------------------------------------


async def test_missing_or_forged_tokens_are_refused_before_the_upgrade(
    tmp_path: Any, auth: tuple[list[RoomDefinition[Any]], Any]
) -> None:
    rooms, module = auth
    valid = module.make_token("ann")
    user, role, signature = valid.split(".")
    with trio.fail_after(10):
        async with open_server(rooms, store=str(tmp_path)) as server:
            for query in ["", "?userId=ann", "?token="]:
                answer = await http_request(server.port, upgrade_request("/ws/auth" + query))
                assert (answer[0], answer[2]) == (401, b"missing token"), query
            for token in [
                module.make_token("ann", secret="not-the-secret"),
                f"mallory.{role}.{signature}",  # someone else's signature
                f"{user}.admin.{signature}",  # a role the token did not grant
                f"{user}.{role}.",
                f"{user}.{signature}",
                "garbage",
                valid + ".extra",
            ]:
                answer = await http_request(server.port, upgrade_request(f"/ws/auth?token={token}"))
                assert (answer[0], answer[2]) == (401, b"invalid token"), token
            # No room code ran for any of them.
            assert server.supervisor.status() == []


async def test_the_user_id_is_the_tokens_not_the_clients_claim(
    tmp_path: Any, auth: tuple[list[RoomDefinition[Any]], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rooms, module = auth
    ann, boss = module.make_token("ann"), module.make_token("boss", "admin")
    with trio.fail_after(10):
        async with open_server(rooms, store=str(tmp_path)) as server:
            async with (
                connect(server.url, f"/ws/auth?token={ann}&userId=mallory") as client,
                connect(server.url, f"/ws/auth?userId=mallory&token={boss}") as admin,
            ):
                await client.emit("whoami")
                assert await client.next_event() == (
                    "whoami",
                    {"type": "whoami", "userId": "ann", "role": "user"},
                )
                await admin.emit("whoami")
                _, data = await admin.next_event()
                assert (data["userId"], data["role"]) == ("boss", "admin")

            # The secret is read at every handshake: a new secret makes old tokens worthless.
            monkeypatch.setenv("VERANI_AUTH_SECRET", "rotated")
            status, _, _ = await http_request(server.port, upgrade_request(f"/ws/auth?token={ann}"))
            assert status == 401


def test_the_token_script_prints_a_token_or_the_error_with_exit_2(
    auth: tuple[list[RoomDefinition[Any]], Any],
) -> None:
    def script(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(ROOMS / "auth.py"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    _, module = auth  # the fixture gave this process and the script's the same secret
    made = script("ann", "admin")
    assert made.returncode == 0 and made.stderr == "", made.stderr
    assert module.verify_token(made.stdout.strip()) == ("ann", "admin")

    dotted = script("a.b")
    assert (dotted.returncode, dotted.stdout, dotted.stderr) == (
        2,
        "",
        "rooms/auth.py: error: user id 'a.b' cannot be in a token: use 1 to 64 letters, digits, "
        "'_' or '-' (no '.': it separates the token's parts)\n",
    )
    bare = script()
    assert (bare.returncode, bare.stderr) == (2, "usage: python rooms/auth.py USER_ID [ROLE]\n")


# --- rate_limit -------------------------------------------------------------------------------


async def welcomed(client: Client) -> int:
    """Wait for the welcome (the socket is in the room once it comes); returns the capacity."""
    _, data = await client.next_event()
    assert data["type"] == "chat:welcome", data
    capacity: int = data["capacity"]
    return capacity


async def burst(client: Client, count: int) -> list[dict[str, Any]]:
    """Send ``count`` messages at once and return the answers the sender gets, in order."""
    for i in range(count):
        await client.emit("chat:message", {"text": f"m{i}"})
    return [(await client.next_event())[1] for _ in range(count)]


async def test_a_burst_over_capacity_limits_the_sender_only(
    tmp_path: Any, rate_limit_rooms: list[RoomDefinition[Any]]
) -> None:
    # Real clock: the burst takes milliseconds, far less than the second a token takes to refill.
    with trio.fail_after(10):
        async with open_server(rate_limit_rooms, store=str(tmp_path)) as server:
            url = server.url
            async with connect(url, "/ws/rate_limit", user_id="bob") as bob:
                async with connect(url, "/ws/rate_limit", user_id="ann") as ann:
                    capacity = await welcomed(ann)
                    await welcomed(bob)

                    answers = await burst(ann, capacity + 1)
                    assert [a["text"] for a in answers[:capacity]] == [
                        f"m{i}" for i in range(capacity)
                    ]
                    assert answers[capacity]["type"] == "rate_limited"
                    assert 0 < answers[capacity]["retryAfter"] <= 1.01
                    for i in range(capacity):  # bob got those, and not the limit
                        _, data = await bob.next_event()
                        assert (data["type"], data["from"], data["text"]) == (
                            "chat:message",
                            "ann",
                            f"m{i}",
                        )

                    # Bob has his own bucket; ann's dropped message never reached anyone.
                    await bob.emit("chat:message", {"text": "hello"})
                    for client in (bob, ann):
                        _, data = await client.next_event()
                        assert (data["type"], data["from"]) == ("chat:message", "bob")

                # Reconnecting does not refill ann's bucket.
                async with connect(url, "/ws/rate_limit", user_id="ann") as ann:
                    await welcomed(ann)
                    await ann.emit("chat:message", {"text": "again"})
                    assert (await ann.next_event())[0] == "rate_limited"


async def test_after_retry_after_the_sender_can_send_again(
    tmp_path: Any, rate_limit_rooms: list[RoomDefinition[Any]], autojump_clock: Any
) -> None:
    # Trio's clock is a MockClock that jumps ahead whenever every task waits (no deadline here,
    # see tests/test_runtime.py); sockets on localhost never leave every task waiting for long.
    async with open_server(rate_limit_rooms, store=str(tmp_path)) as server:
        async with connect(server.url, "/ws/rate_limit", user_id="ann") as ann:
            capacity = await welcomed(ann)
            answers = await burst(ann, capacity + 2)
            assert [a["type"] for a in answers] == ["chat:message"] * capacity + [
                "rate_limited"
            ] * 2
            retry_after = answers[-1]["retryAfter"]
            assert retry_after > 0

            await trio.sleep(retry_after)
            # One token came back in that time, no more.
            answers = await burst(ann, 2)
            assert [a["type"] for a in answers] == ["chat:message", "rate_limited"]
            assert answers[0]["text"] == "m0"
