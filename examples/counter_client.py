"""The client of Verani's State Persistence example, in Python.

Start the counter room, then run this script against it::

    verani serve rooms/counter.py
    python examples/counter_client.py [ws://127.0.0.1:8787/ws/counter?userId=alice]

It prints the count it is sent on connecting, increments the counter by 1, decrements it by 2,
resets it, asks for it again, and exits once the answer is in. The count is persisted: run it
twice, or restart the server in between, and the first line shows the count the last run left.
"""

from __future__ import annotations

import sys
from typing import Any

import trio

from verani.client import ClientError, open_client

DEFAULT_URL = "ws://127.0.0.1:8787/ws/counter?userId=alice"
REPLY_TIMEOUT = 5.0


async def main(url: str) -> int:
    async with open_client(url) as client:
        # Listen for counter updates.
        def on_sync(data: dict[str, Any]) -> None:
            print(f"Current count: {data['count']}")

        def on_update(data: dict[str, Any]) -> None:
            print(f"Count updated to {data['count']}")

        client.on("counter:sync", on_sync)
        client.on("counter:update", on_update)

        try:
            await client.wait_for_connection()
        except ClientError as exc:
            print(f"counter_client: {exc}", file=sys.stderr)
            return 1

        client.emit("counter:increment", {"amount": 1})
        client.emit("counter:decrement", {"amount": 2})
        client.emit("counter:reset", {})
        client.emit("counter:get", {})

        # The room answers in order; the answer to counter:get is the first counter:sync after
        # the reset's broadcast (the one before it was sent on connecting).
        with trio.move_on_after(REPLY_TIMEOUT):
            reset = False
            async for event, _ in client.events():
                reset = reset or event == "counter:reset"
                if reset and event == "counter:sync":
                    return 0
        print(f"counter_client: no answer to counter:get in {REPLY_TIMEOUT:g}s", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1] if len(sys.argv) > 1 else DEFAULT_URL))
