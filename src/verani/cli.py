"""The ``verani`` command: ``serve``, ``hibernate``.

Commands parse options, call into the library and print. The project's errors are turned into
exit codes here only: 0 done, 1 the request failed (no server, no such room, a room could not
save), 2 bad usage or a server that cannot start.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Literal, NoReturn

import click
import trio

from .control import control_request
from .errors import ControlError, RoomDefinitionError, RoomLoadError, StoreError, VeraniError
from .loader import load_rooms
from .room import DEFAULT_IDLE_TIMEOUT, RoomDefinition
from .server import ServeError, Server, open_server

LOG_LEVELS = ("debug", "info", "warning", "error")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"verani: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="verani")
def main() -> None:
    """Realtime rooms with persisted state and hibernation, on Trio."""


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="FILE_OR_DIR...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port",
    default=8787,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0 picks a free one).",
)
@click.option(
    "--store",
    default=".verani",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory of the file store (one server per store).",
)
@click.option(
    "--durability",
    default="fsync",
    show_default=True,
    type=click.Choice(["fsync", "os"]),
    help="fsync: saved state survives a power loss; os: no fsync, faster, survives only a "
    "crash of the server process (tests, development).",
)
@click.option(
    "--idle-timeout",
    default=DEFAULT_IDLE_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds without events before a room hibernates (rooms may set their own).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS),
    help="Least severe log messages shown.",
)
def serve(
    paths: tuple[str, ...],
    host: str,
    port: int,
    store: str,
    durability: Literal["fsync", "os"],
    idle_timeout: float,
    log_level: str,
) -> None:
    """Serve the rooms defined in FILE_OR_DIR... over WebSockets until Ctrl-C.

    \b
    Example:
      verani serve rooms/counter.py
      verani serve rooms/ --port 9000 --store /var/lib/verani --idle-timeout 10
      verani serve rooms/counter.py --durability os   # faster; for development
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        rooms = load_rooms(paths)
    except (RoomLoadError, RoomDefinitionError) as exc:
        _fail(str(exc), 2)
    try:
        trio.run(_serve, rooms, host, port, store, durability, idle_timeout)
    except (ServeError, StoreError) as exc:
        _fail(str(exc), 2)


async def _serve(
    rooms: list[RoomDefinition[Any]],
    host: str,
    port: int,
    store: str,
    durability: Literal["fsync", "os"],
    idle_timeout: float,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(
            rooms,
            host=host,
            port=port,
            store=store,
            durability=durability,
            idle_timeout=idle_timeout,
        ) as server:
            _print_routes(server, store)
            async for signum in signals:
                click.echo(f"{signal.Signals(signum).name}: saving every room and stopping")
                break
    click.echo("stopped")


def _print_routes(server: Server, store: str) -> None:
    click.echo(f"verani serving on {server.url} (store: {store})")
    for room in server.router.rooms:
        path = room.websocket_path
        click.echo(f"  {server.url}{path}  room {room.name!r} (instances: {path}/NAME)")
    click.echo("Press Ctrl-C to stop.")


@main.command()
@click.argument("target", required=False, metavar="[ROOM[/INSTANCE]]")
@click.option("--all", "all_", is_flag=True, help="Hibernate every awake room instance.")
@click.option(
    "--store",
    default=".verani",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Store of the server to ask.",
)
def hibernate(target: str | None, all_: bool, store: str) -> None:
    """Make the running server hibernate rooms now, and wait until their state is durable.

    ROOM hibernates every awake instance of ROOM, ROOM/INSTANCE just that one, --all every
    room. Exit status: 0 done (also when nothing was awake), 1 no server, no such room, or a
    room could not save its state.

    \b
    Example:
      verani hibernate counter/default --store .verani
      verani hibernate --all
    """
    if (target is None) == (not all_):
        raise click.UsageError("give either ROOM[/INSTANCE] or --all")
    room = instance = None
    if target is not None:
        room, _, rest = target.partition("/")
        instance = rest or None
        if not room:
            raise click.UsageError(f"{target!r} names no room; use ROOM or ROOM/INSTANCE")
    try:
        reply = trio.run(
            control_request, store, {"op": "hibernate", "room": room, "instance": instance}
        )
    except (ControlError, VeraniError) as exc:
        _fail(str(exc), 1)
    results = reply.get("hibernated", [])
    if not results:
        click.echo(
            "nothing to hibernate: " + (f"{target} is not awake" if target else "no room is awake")
        )
    for item in results:
        name = f"{item['room']}/{item['instance']}"
        if item.get("error"):
            click.echo(f"failed: {name}: {item['error']}", err=True)
        else:
            click.echo(f"hibernated {name}")
    if not reply.get("ok"):
        sys.exit(1)
