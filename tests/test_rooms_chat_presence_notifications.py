"""The chat, presence and notifications example rooms end to end: real server on port 0, real
sockets, a file store in tmp_path, rooms loaded from rooms/*.py as `verani serve` loads them."""

from __future__ import annotations

import datetime
import pathlib
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from verani import Recovery, RoomDefinition, Server, open_server
from verani.loader import load_rooms
from verani.store import FileStore

from helpers import ROOMS, Client, connect


def room(name: str) -> list[RoomDefinition[Any]]:
    return load_rooms([ROOMS / f"{name}.py"])


def stored_state(store: pathlib.Path, room_name: str) -> dict[str, Any]:
    doc = orjson.loads(FileStore(store).path_for(room_name, "default").read_bytes())
    state: dict[str, Any] = doc["state"]
    return state


async def sessions_settle(server: Server, room_name: str, count: int) -> None:
    """Wait until the room's connect and disconnect turns have run: ``count`` sockets in it."""
    while sum(s.sessions for s in server.supervisor.status() if s.room == room_name) != count:
        await trio.sleep(0.01)


async def assert_quiet(*clients: Client, seconds: float = 0.3) -> None:
    """Nothing at all arrives on any of ``clients`` for ``seconds``."""
    received: list[dict[str, Any]] = []

    async def listen(client: Client) -> None:
        received.append(await client.recv())

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(listen, client)
    assert received == []


async def serve_until(
    stop: trio.Event,
    rooms: list[RoomDefinition[Any]],
    store: pathlib.Path,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A server that stops when told, while its clients are still connected (a restart)."""
    async with open_server(rooms, store=str(store)) as server:
        task_status.started(server)
        await stop.wait()


# --- chat -----------------------------------------------------------------------------------


async def test_chat_join_message_typing_and_leave(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(15):
        async with open_server(room("chat"), store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/chat", user_id="ann") as ann:
                assert await ann.next_event() == (
                    "chat:welcome",
                    {"type": "chat:welcome", "users": ["ann"], "typing": [], "history": []},
                )
                async with connect(server.url, "/ws/chat", user_id="bob") as bob:
                    _, welcome = await bob.next_event()
                    assert welcome["type"] == "chat:welcome"
                    assert welcome["users"] == ["ann", "bob"]
                    # The others hear of the newcomer; the newcomer only gets its welcome.
                    assert await ann.next_event() == (
                        "chat:joined",
                        {"type": "chat:joined", "userId": "bob"},
                    )
                    async with connect(server.url, "/ws/chat", user_id="cat") as cat:
                        assert (await cat.next_event())[1]["users"] == ["ann", "bob", "cat"]
                        for client in (ann, bob):
                            assert (await client.next_event()) == (
                                "chat:joined",
                                {"type": "chat:joined", "userId": "cat"},
                            )

                        await ann.emit("chat:message", {"text": "hello all"})
                        for client in (ann, bob, cat):
                            name, data = await client.next_event()
                            assert name == "chat:message"
                            assert (data["from"], data["text"]) == ("ann", "hello all")
                            at = datetime.datetime.fromisoformat(data["at"])
                            assert at.utcoffset() == datetime.timedelta(0)
                            now = datetime.datetime.now(datetime.UTC)
                            assert abs(now - at) < datetime.timedelta(minutes=1)

                        # Typing goes to the others, not back to the typist.
                        await bob.emit("chat:typing", {"typing": True})
                        for client in (ann, cat):
                            assert await client.next_event() == (
                                "chat:typing",
                                {"type": "chat:typing", "userId": "bob", "typing": True},
                            )
                        await assert_quiet(bob)

                    # cat left: the two others are told, nothing else came first.
                    for client in (ann, bob):
                        assert await client.next_event() == (
                            "chat:left",
                            {"type": "chat:left", "userId": "cat"},
                        )


async def test_chat_second_device_is_not_a_new_join(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(15):
        async with open_server(room("chat"), store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/chat", user_id="ann") as ann:
                await ann.next_event("chat:welcome")
                async with connect(server.url, "/ws/chat", user_id="bob") as bob_phone:
                    await bob_phone.next_event("chat:welcome")
                    assert (await ann.next_event())[1]["userId"] == "bob"
                    async with connect(server.url, "/ws/chat", user_id="bob") as bob_laptop:
                        # Listed once, and nobody is told bob joined again.
                        assert (await bob_laptop.next_event())[1]["users"] == ["ann", "bob"]
                        await assert_quiet(ann, bob_phone)
                    await sessions_settle(server, "chat", 2)
                    await assert_quiet(ann, bob_phone)  # bob is still here on his phone
                # His last device left: now he has left.
                assert await ann.next_event() == (
                    "chat:left",
                    {"type": "chat:left", "userId": "bob"},
                )


async def test_chat_bad_messages_are_refused_to_the_sender_only(tmp_path: pathlib.Path) -> None:
    bad: list[Any] = [
        {"text": ""},
        {"text": "   \n"},
        {"text": "x" * 2001},
        {},
        {"text": 42},
        "not an object",
    ]
    with trio.fail_after(15):
        async with open_server(room("chat"), store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/chat", user_id="ann") as ann,
                connect(server.url, "/ws/chat", user_id="bob") as bob,
            ):
                await ann.next_event("chat:welcome")
                await bob.next_event("chat:welcome")
                await ann.next_event("chat:joined")
                for data in bad:
                    await ann.emit("chat:message", data)
                codes = [(await ann.next_event())[1] for _ in bad]
                assert [(d["type"], d["code"]) for d in codes] == [
                    ("error", "empty_message"),
                    ("error", "empty_message"),
                    ("error", "message_too_long"),
                    ("error", "empty_message"),
                    ("error", "empty_message"),
                    ("error", "empty_message"),
                ]
                await ann.emit("chat:message", {"text": "x" * 2000})  # the limit itself is fine
                # bob's very next frame is that message: none of the errors reached him.
                frame = await bob.recv()
                assert frame["data"]["type"] == "chat:message"
                assert len(frame["data"]["text"]) == 2000
            # Refused messages were not kept.
            assert await server.hibernate("chat") == [("chat", "default", None)]
            assert [m["text"] for m in stored_state(tmp_path, "chat")["history"]] == ["x" * 2000]


async def test_chat_history_survives_hibernation_and_restart_typing_does_not(
    tmp_path: pathlib.Path,
) -> None:
    with trio.fail_after(15):
        async with open_server(room("chat"), store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/chat", user_id="ann") as ann,
                connect(server.url, "/ws/chat", user_id="cat") as cat,
            ):
                await ann.next_event("chat:welcome")
                await cat.next_event("chat:welcome")
                for text in ("one", "two"):
                    await ann.emit("chat:message", {"text": text})
                    await cat.next_event("chat:message")
                await ann.emit("chat:typing", {"typing": True})
                assert (await cat.next_event("chat:typing"))[1]["typing"] is True
                # Hibernate with ann's socket open; bob's connection revives the room.
                assert await server.hibernate("chat") == [("chat", "default", None)]
                state = stored_state(tmp_path, "chat")
                assert set(state) == {"history"}  # no typing key in the store
                assert [m["text"] for m in state["history"]] == ["one", "two"]
                async with connect(server.url, "/ws/chat", user_id="bob") as bob:
                    _, welcome = await bob.next_event("chat:welcome")
                    assert [(m["from"], m["text"]) for m in welcome["history"]] == [
                        ("ann", "one"),
                        ("ann", "two"),
                    ]
                    assert welcome["users"] == ["ann", "cat", "bob"]
                    # ann was typing before the room slept; that was ephemeral.
                    assert welcome["typing"] == []

        async with open_server(room("chat"), store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/chat", user_id="dan") as dan:
                _, welcome = await dan.next_event("chat:welcome")
                assert [m["text"] for m in welcome["history"]] == ["one", "two"]
                assert welcome["users"] == ["dan"]
                assert all(datetime.datetime.fromisoformat(m["at"]) for m in welcome["history"])


async def test_chat_history_keeps_the_last_50(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(15):
        async with open_server(room("chat"), store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/chat", user_id="ann") as ann:
                await ann.next_event("chat:welcome")
                for i in range(55):
                    await ann.emit("chat:message", {"text": str(i)})
                for _ in range(55):
                    await ann.next_event("chat:message")
            async with connect(server.url, "/ws/chat", user_id="bob") as bob:
                _, welcome = await bob.next_event("chat:welcome")
                assert [m["text"] for m in welcome["history"]] == [str(i) for i in range(5, 55)]


# --- presence -------------------------------------------------------------------------------


async def presence(client: Client) -> tuple[str, dict[str, Any]]:
    """The next ``presence:update`` (the room's ``verani:session`` comes first: it has recovery)."""
    return await client.next_event("presence:update")


async def test_presence_counts_users_not_devices(tmp_path: pathlib.Path) -> None:
    def update(*online: str) -> tuple[str, dict[str, Any]]:
        return "presence:update", {"type": "presence:update", "online": list(online)}

    with trio.fail_after(15):
        async with open_server(room("presence"), store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/presence", user_id="alice") as alice_phone:
                assert await presence(alice_phone) == update("alice")
                async with connect(server.url, "/ws/presence", user_id="bob") as bob:
                    assert await presence(bob) == update("alice", "bob")
                    assert await presence(alice_phone) == update("alice", "bob")

                    async with connect(server.url, "/ws/presence", user_id="alice") as laptop:
                        # The newcomer gets the list; the others get nothing: alice was online.
                        assert await presence(laptop) == update("alice", "bob")
                        await assert_quiet(alice_phone, bob)

                        async with connect(server.url, "/ws/presence", user_id="zed") as zed:
                            assert await presence(zed) == update("alice", "bob", "zed")
                            for client in (alice_phone, laptop, bob):
                                assert await presence(client) == update("alice", "bob", "zed")
                        for client in (alice_phone, laptop, bob):
                            assert await presence(client) == update("alice", "bob")

                    # One of alice's devices left: she is still online, nobody is told.
                    await sessions_settle(server, "presence", 2)
                    await assert_quiet(alice_phone, bob)
                # bob left.
                assert await presence(alice_phone) == update("alice")
            await sessions_settle(server, "presence", 0)
            assert await server.hibernate("presence") == [("presence", "default", None)]
            assert stored_state(tmp_path, "presence") == {"online": []}


async def test_presence_restart_drops_users_whose_sockets_are_gone(
    tmp_path: pathlib.Path,
) -> None:
    rooms = room("presence")
    # The room keeps a dropped session 30 s for its client to come back; a second here.
    rooms[0].recovery = Recovery(max_disconnect=1.0)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            server = await nursery.start(serve_until, stop, rooms, tmp_path)
            async with (
                connect(server.url, "/ws/presence", user_id="alice") as alice,
                connect(server.url, "/ws/presence", user_id="bob") as bob,
            ):
                await presence(bob)
                assert (await presence(alice))[1]["online"] == ["alice"]
                assert (await presence(alice))[1]["online"] == ["alice", "bob"]
                # The server stops while both are connected, as a restart or a crash would.
                stop.set()
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await alice.recv()
        # The room saved its list on the way down; those sockets are gone now.
        assert stored_state(tmp_path, "presence") == {"online": ["alice", "bob"]}

        async with open_server(rooms, store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/presence", user_id="carol") as carol:
                # alice and bob were connected when the server stopped: their sessions wait
                # for them (the room's recovery), then they leave.
                update = await presence(carol)
                assert update[1]["online"] == ["alice", "bob", "carol"]
                between = []  # each leaves in a turn of its own
                while (update := await presence(carol))[1]["online"] != ["carol"]:
                    between.append(update[1]["online"])
                assert between in ([], [["alice", "carol"]], [["bob", "carol"]])
                assert await server.hibernate("presence") == [("presence", "default", None)]
                assert stored_state(tmp_path, "presence") == {"online": ["carol"]}


async def test_presence_revival_reconciles_a_stale_stored_list(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(15):
        async with open_server(room("presence"), store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/presence", user_id="alice") as alice:
                assert (await presence(alice))[1]["online"] == ["alice"]
                assert await server.hibernate("presence") == [("presence", "default", None)]
                # While the room sleeps with alice's socket open, make its stored list wrong (as
                # if a save had been lost): it names a user with no socket.
                await FileStore(tmp_path).save("presence", "default", {"online": ["alice", "gus"]})
                async with connect(server.url, "/ws/presence", user_id="bob") as bob:
                    # Revival with a socket runs on_hibernation_restore first: gus is dropped.
                    assert (await presence(alice))[1]["online"] == ["alice"]
                    assert (await presence(alice))[1]["online"] == ["alice", "bob"]
                    assert (await presence(bob))[1]["online"] == ["alice", "bob"]


# --- notifications --------------------------------------------------------------------------


async def test_notify_reaches_every_device_of_the_user_and_no_one_else(
    tmp_path: pathlib.Path,
) -> None:
    with trio.fail_after(15):
        async with open_server(room("notifications"), store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/notifications", user_id="alice") as alice_phone,
                connect(server.url, "/ws/notifications", user_id="alice") as alice_laptop,
                connect(server.url, "/ws/notifications", user_id="bob") as bob,
            ):
                for client in (alice_phone, alice_laptop, bob):
                    assert await client.next_event() == (
                        "notifications:unread",
                        {"type": "notifications:unread", "count": 0},
                    )
                await bob.emit("notify", {"to": "alice", "title": "Hi", "body": "lunch?"})
                for client in (alice_phone, alice_laptop):
                    assert await client.next_event() == (
                        "notification",
                        {
                            "type": "notification",
                            "from": "bob",
                            "title": "Hi",
                            "body": "lunch?",
                            "unread": 1,
                        },
                    )
                # bob's next frame is the receipt: the notification itself did not reach him.
                assert await bob.next_event() == (
                    "notify:sent",
                    {"type": "notify:sent", "to": "alice", "delivered": 2},
                )

                # Offline users are counted as 0 deliveries (and get it as unread later).
                await alice_phone.emit("notify", {"to": "carol", "title": "Hey"})
                assert (await alice_phone.next_event())[1] == {
                    "type": "notify:sent",
                    "to": "carol",
                    "delivered": 0,
                }
                await alice_phone.emit("notify", {"title": "to nobody"})
                assert (await alice_phone.next_event())[1]["type"] == "error"
                await assert_quiet(alice_laptop, bob)


async def test_unread_count_persists_across_restart_and_resets(tmp_path: pathlib.Path) -> None:
    rooms = room("notifications")
    with trio.fail_after(15):
        async with open_server(rooms, store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/notifications", user_id="bob") as bob:
                await bob.next_event("notifications:unread")
                for title in ("one", "two"):
                    await bob.emit("notify", {"to": "alice", "title": title, "body": ""})
                    assert (await bob.next_event())[1]["delivered"] == 0

        async with open_server(rooms, store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/notifications", user_id="alice") as phone,
                connect(server.url, "/ws/notifications", user_id="alice") as laptop,
            ):
                for client in (phone, laptop):
                    assert (await client.next_event())[1] == {
                        "type": "notifications:unread",
                        "count": 2,
                    }
                await phone.emit("notifications:read")
                # Read on one device: the badge clears on both.
                for client in (phone, laptop):
                    assert (await client.next_event())[1] == {
                        "type": "notifications:unread",
                        "count": 0,
                    }
        assert stored_state(tmp_path, "notifications") == {"unread": {}}

        async with open_server(rooms, store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/notifications", user_id="alice") as alice:
                assert (await alice.next_event())[1]["count"] == 0
