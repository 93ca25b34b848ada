"""The client of Verani's State Persistence example, in Python: the seed's "Testing Persistence".

Start the counter room, then, in a second terminal (with the virtual environment activated), run
this script against it::

    verani serve rooms/counter.py
    python examples/counter_client.py [URL] [--wait SECONDS]

It prints the count the room sends on connecting, increments the counter three times, prints
the count it ends at, and disconnects, leaving the count as it is. Then hibernate the room
(``verani hibernate counter``, or wait for its idle timeout, or restart the server) and run the
script again: its first line shows the count the last run left, and it goes on from there.

The seed's client also decrements by 2 and then resets the count to 0; this one does not,
since a reset would wipe out the very count whose survival the walk-through shows. To reset it
by hand: ``verani emit ws://127.0.0.1:8787/ws/counter counter:reset``.

URL defaults to ws://127.0.0.1:8787/ws/counter?userId=alice. A failed attempt to connect is
reported at once, and the script retries for ``--wait`` seconds (default 10) before giving up
with the cause (say, connection refused: no server runs there).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import trio

from verani.client import NotConnectedError, open_client

DEFAULT_URL = "ws://127.0.0.1:8787/ws/counter?userId=alice"
INCREMENTS = 3
REPLY_TIMEOUT = 5.0


async def main(url: str, wait: float) -> int:
    async with open_client(url) as client:

        def retrying(error: BaseException) -> None:
            print(f"counter_client: {error}; retrying", file=sys.stderr)

        def on_update(data: dict[str, Any]) -> None:
            print(f"Count updated to {data['count']} by {data['updatedBy']}")

        client.on_error = retrying
        client.on("counter:update", on_update)
        try:
            await client.wait_for_connection(timeout=wait)
        except NotConnectedError as exc:
            print(f"counter_client: {exc}", file=sys.stderr)
            return 1

        with trio.move_on_after(REPLY_TIMEOUT):
            sync = await client.receive("counter:sync")  # sent to every socket on connecting
            by = sync["lastUpdatedBy"]
            print(f"Current count: {sync['count']}" + (f" (last updated by {by})" if by else ""))
            for _ in range(INCREMENTS):
                client.emit("counter:increment", {"amount": 1})
            # Answered after the increments (the room handles one event at a time, in order).
            client.emit("counter:get", {})
            final = await client.receive("counter:sync")
            print(
                f"Disconnecting with the count at {final['count']}. Now hibernate the room "
                f"(verani hibernate counter) or restart the server, and run this again: "
                f"it starts from {final['count']}."
            )
            return 0
        print(f"counter_client: no answer from the room in {REPLY_TIMEOUT:g}s", file=sys.stderr)
        return 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python examples/counter_client.py",
        description="Increment the counter room three times, leaving the count for next time.",
    )
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default: {DEFAULT_URL}")
    parser.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to keep trying to connect (default: 10)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    # As `cat` does: when the reader of the output goes away (`... | head -1`), stop quietly.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parse_args(sys.argv[1:])
    sys.exit(trio.run(main, args.url, args.wait))
