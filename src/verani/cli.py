"""Internal: the ``verani`` command (``serve``, ``inspect``, ``hibernate``, ``emit``, ``listen``).

Commands parse options, call into the library and print. The project's errors are turned into
exit codes here only: 0 done, 1 the request failed (no server, no such room, a room could not
save), 2 bad usage or a server that cannot start.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import logging
import os
import platform
import re
import signal
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, Literal

import attrs
import click
import orjson
import trio

from .client import NotConnectedError, WebSocketURL
from .codec import make_codec
from .control import control_request
from .errors import (
    ControlError,
    CorruptDocumentError,
    RemoteError,
    RoomDefinitionError,
    RoomLoadError,
    StoreError,
    VeraniError,
)
from .inspection import inspect_instance, list_instances
from .loader import load_rooms
from .remote import RoomsClient
from .render import render
from .room import DEFAULT_IDLE_TIMEOUT, RoomDefinition
from .server import ServeError, Server, ServerConfig, open_server
from .shell_client import Ending, detach_stdout, run_session

LOG_LEVELS = ("debug", "info", "warning", "error")
_DEFAULTS = ServerConfig()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record: ``time`` (ISO, UTC), ``level``, ``logger``, ``message``,
    and ``exc`` (the traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _show_error(message: str, file: IO[Any] | None) -> None:
    click.echo(f"verani: error: {message}", file=file, err=file is None)


class VeraniCommandError(click.ClickException):
    """An error the ``verani`` command reports as ``verani: error: MESSAGE`` on standard error,
    exiting with the subclass's ``exit_code``."""

    def show(self, file: IO[Any] | None = None) -> None:
        """Write ``verani: error: MESSAGE`` to ``file`` (standard error by default)."""
        _show_error(self.format_message(), file)


class VeraniUsageError(click.UsageError):
    """Bad usage (exit status 2), shown in the same format as every other error, then the
    command's usage line and where to find help."""

    def show(self, file: IO[Any] | None = None) -> None:
        """Write ``verani: error: MESSAGE``, the usage line and the help hint to ``file``
        (standard error by default)."""
        _show_error(self.format_message(), file)
        if self.ctx is not None:
            hint = f"Try '{self.ctx.command_path} -h' for help."
            click.echo(f"{self.ctx.get_usage()}\n{hint}", file=file, err=file is None)


@contextlib.contextmanager
def _usage_errors_shown_as_verani_errors() -> Iterator[None]:
    try:
        yield
    except (VeraniUsageError, click.exceptions.NoArgsIsHelpError):
        raise  # already in verani's format; `verani` alone shows the help
    except click.UsageError as exc:
        raise VeraniUsageError(exc.format_message(), exc.ctx) from None


class VeraniGroup(click.Group):
    """The ``verani`` group. Click reports its own usage errors (a missing argument, a bad
    option value) as ``Usage: ... Error: ...``; here every one of them, whether raised while
    parsing or by a command, is shown as ``verani: error: ...`` like the command's other errors.
    """

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _usage_errors_shown_as_verani_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        # A subcommand's arguments are parsed here, in the group's invoke.
        with _usage_errors_shown_as_verani_errors():
            return super().invoke(ctx)


class CommandFailed(VeraniCommandError):
    """The request failed (no server, no such room, a room could not save): exit status 1."""

    exit_code = 1


class CannotStart(VeraniCommandError):
    """The server cannot start (a room file, the address, the store): exit status 2, the status
    of bad usage, since the command as given can never work."""

    exit_code = 2


@click.group(cls=VeraniGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="verani")
def main() -> None:
    """Realtime rooms with persisted state and hibernation, on Trio."""


@attrs.frozen
class ConfigOption:
    """One ``verani serve`` option that sets the :class:`ServerConfig` field of the same name
    (``--max-frame-size`` sets ``max_frame_size``); its default is always that field's."""

    field: str
    #: None: text (click's default).
    type: click.ParamType[Any, Any] | None
    help: str
    metavar: str | None = None
    #: Turns the text into the field's value, when ``type`` alone cannot.
    callback: Callable[[click.Context, click.Parameter, Any], Any] | None = None
    #: An environment variable that gives the value when the option is not typed (a secret is
    #: better there than on a command line every user of the machine can list).
    envvar: str | None = None

    @property
    def flag(self) -> str:
        """The option as typed: ``--`` and the field's name with dashes."""
        return "--" + self.field.replace("_", "-")


def _compile_pattern(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> re.Pattern[str] | None:
    if value is None:
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        raise click.BadParameter(f"{value!r} is not a regular expression: {exc}") from None


_POSITIVE_INT = click.IntRange(min=1)
_POSITIVE_SECONDS = click.FloatRange(min=0, min_open=True)

#: The limits ``verani serve`` takes, in the order ``--help`` lists them (cli.md explains each).
CONFIG_OPTIONS: tuple[ConfigOption, ...] = (
    ConfigOption(
        "max_frame_size",
        _POSITIVE_INT,
        "Largest client frame (characters); over it the socket is closed with 1009.",
    ),
    ConfigOption(
        "max_connections",
        _POSITIVE_INT,
        "Open WebSockets on the server; past it new ones get HTTP 503.",
    ),
    ConfigOption(
        "max_connections_per_room",
        _POSITIVE_INT,
        "Open WebSockets on one room instance; past it new ones get HTTP 503.",
    ),
    ConfigOption(
        "max_awake_rooms",
        _POSITIVE_INT,
        "Room instances awake at once; past it the least recently used hibernate.",
    ),
    ConfigOption(
        "outbound_queue",
        _POSITIVE_INT,
        "Frames queued for one socket; a client that reads slower is closed with 1008.",
    ),
    ConfigOption(
        "handshake_timeout",
        _POSITIVE_SECONDS,
        "Seconds a client gets to complete the HTTP upgrade.",
    ),
    ConfigOption(
        "max_instance_name",
        _POSITIVE_INT,
        "Longest room instance name (characters); longer ones get HTTP 400.",
    ),
    ConfigOption(
        "instance_pattern",
        None,
        "Instance names must match REGEX in full (e.g. '[a-z0-9-]+'); others get HTTP 400. "
        "A room's own instance_pattern wins.",
        metavar="REGEX",
        callback=_compile_pattern,
    ),
    ConfigOption(
        "max_outbound_bytes",
        _POSITIVE_INT,
        "Bytes pending for one socket (queued, being written, or held until a write is "
        "durable); a client that reads slower is closed with 1008.",
    ),
    ConfigOption(
        "max_fragments",
        _POSITIVE_INT,
        "Frames one client message may be cut into; past it, 1008.",
    ),
    ConfigOption(
        "max_control_frames",
        _POSITIVE_SECONDS,
        "Control frames (ping, pong, close) one socket may send per second; past it, 1008.",
    ),
    ConfigOption(
        "ping_interval",
        click.FloatRange(min=0),
        "Seconds a socket may stay quiet before the server pings it (0: no pings).",
    ),
    ConfigOption(
        "ping_timeout",
        _POSITIVE_SECONDS,
        "Seconds a pinged socket has to answer before it is closed with 1011.",
    ),
    ConfigOption(
        "max_handshakes",
        _POSITIVE_INT,
        "Sockets in their HTTP handshake at once; past it the oldest is dropped.",
    ),
    ConfigOption(
        "api_token",
        None,
        "Turn on the HTTP API under /_verani/api on the same port; requests must send "
        "'Authorization: Bearer TOKEN'. Off by default.",
        metavar="TOKEN",
        envvar="VERANI_API_TOKEN",
    ),
)


def _config_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add a click option for each of :data:`CONFIG_OPTIONS`, in the table's order."""
    # click lists options in the reverse order of decoration: the first applied is the last shown.
    for option in reversed(CONFIG_OPTIONS):
        default = getattr(_DEFAULTS, option.field)
        command = click.option(
            option.flag,
            option.field,
            default=default,
            show_default=default is not None,
            type=option.type,
            metavar=option.metavar,
            callback=option.callback,
            envvar=option.envvar,
            show_envvar=option.envvar is not None,
            help=option.help,
        )(command)
    return command


@attrs.frozen
class ClusterOptions:
    """``verani serve --cluster URL --node-id NAME --lease S``."""

    url: str
    node_id: str | None
    lease_seconds: float


def _redis_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise click.BadParameter(
            f"{value!r} is not a Redis URL (redis://HOST:PORT/DB, rediss://... or unix://PATH)",
            param_hint="'--cluster'",
        )
    return value


def config_from_options(values: Mapping[str, Any]) -> ServerConfig:
    """The :class:`ServerConfig` that the parsed :data:`CONFIG_OPTIONS` in ``values`` describe."""
    return ServerConfig(**{option.field: values[option.field] for option in CONFIG_OPTIONS})


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
    type=_POSITIVE_SECONDS,
    help="Seconds without events before a room hibernates (rooms may set their own).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS),
    help="Least severe log messages shown.",
)
@click.option(
    "--cluster",
    metavar="redis://HOST:PORT/DB",
    envvar="VERANI_CLUSTER",
    callback=lambda ctx, param, value: _redis_url(value),
    help="Run as one node of a cluster on this Redis: room state in Redis, each room instance "
    "owned by one node at a time (instead of --store). Env: VERANI_CLUSTER.",
)
@click.option(
    "--node-id",
    metavar="NAME",
    help="With --cluster: this node's name, unique in the cluster.  [default: HOST-PID]",
)
@click.option(
    "--lease",
    "lease_seconds",
    default=5.0,
    show_default=True,
    type=_POSITIVE_SECONDS,
    help="With --cluster: seconds a room's owner keeps it without renewing (failover time).",
)
@_config_options
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line (time, level, logger, message, exc), for log shippers.",
)
def serve(
    paths: tuple[str, ...],
    host: str,
    port: int,
    store: str,
    durability: Literal["fsync", "os"],
    idle_timeout: float,
    log_level: str,
    log_format: str,
    cluster: str | None,
    node_id: str | None,
    lease_seconds: float,
    **limits: Any,
) -> None:
    """Serve the rooms defined in FILE_OR_DIR... over WebSockets until Ctrl-C.

    \b
    Example:
      verani serve rooms/counter.py
      verani serve rooms/ --port 9000 --store /var/lib/verani --idle-timeout 10
      verani serve rooms/counter.py --durability os   # faster; for development
      verani serve rooms/ --cluster redis://127.0.0.1:6379/0 --node-id a --port 8001
    """
    context = click.get_current_context()
    if cluster is not None and context.get_parameter_source("store") not in (
        click.core.ParameterSource.DEFAULT,
        None,
    ):
        raise click.UsageError("--cluster keeps room state in Redis: give --store or --cluster")
    if cluster is None and node_id is not None:
        raise click.UsageError("--node-id names a node of a cluster: give --cluster too")
    if node_id is not None and ("#" in node_id or not node_id.strip()):
        raise click.BadParameter("must be non-empty and without '#'", param_hint="'--node-id'")
    _return_freed_memory()
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    if log_level != "debug":
        # coredis logs each retry of a lost connection at info; the cluster says it once.
        logging.getLogger("coredis").setLevel(logging.WARNING)
    try:
        rooms = load_rooms(paths)
    except (RoomLoadError, RoomDefinitionError) as exc:
        raise CannotStart(str(exc)) from None
    config = config_from_options(limits)
    stopped = trio.Event()
    try:
        node = ClusterOptions(cluster, node_id, lease_seconds) if cluster else None
        unsaved = trio.run(
            _serve, rooms, host, port, store, durability, idle_timeout, config, stopped, node
        )
    except (ServeError, StoreError) as exc:
        raise CannotStart(str(exc)) from None
    except KeyboardInterrupt:
        # A second Ctrl-C (or a supervisor repeating its signal) that lands after the rooms were
        # saved and the sockets closed is no reason to report a failure.
        if not stopped.is_set():
            raise
        return
    if unsaved:
        # A stop that lost state must not look like a clean one to a supervisor or a script.
        rooms_list = "; ".join(f"{room}/{instance}: {why}" for room, instance, why in unsaved)
        raise CommandFailed(f"stopped with {len(unsaved)} room(s) not saved: {rooms_list}")


#: glibc's mallopt() parameters (malloc.h) and the values pinned by _return_freed_memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_PINNED_THRESHOLD = 128 * 1024


def _return_freed_memory() -> None:
    """Keep glibc from holding on to the memory of big frames once they are freed.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MiB), so after one burst of 1 MB frames every later one comes from the heap, and the
    heap stays at its high-water mark: a server that once queued megabytes for a slow reader
    kept them as RSS after the socket was gone. Pinning the thresholds at glibc's own defaults
    turns that adaptation off: blocks of 128 KiB and more are mapped and unmapped, the heap's
    free top is trimmed. Nothing is done when the operator tuned malloc through the
    environment, or where the C library is not glibc.
    """
    tuned = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in tuned):
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(_M_MMAP_THRESHOLD, _PINNED_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _PINNED_THRESHOLD)


async def _serve(
    rooms: list[RoomDefinition[Any]],
    host: str,
    port: int,
    store: str,
    durability: Literal["fsync", "os"],
    idle_timeout: float,
    config: ServerConfig,
    stopped: trio.Event,
    node: ClusterOptions | None = None,
) -> list[tuple[str, str, str]]:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(
            rooms,
            host=host,
            port=port,
            store=None if node else store,
            durability=durability,
            idle_timeout=idle_timeout,
            config=config,
            cluster=node.url if node else None,
            node_id=node.node_id if node else None,
            lease_seconds=node.lease_seconds if node else None,
        ) as server:
            cluster = server.supervisor.cluster
            where = (
                f"cluster: {node.url}, node {cluster.node_id}"
                if node and cluster
                else f"store: {store}"
            )
            _print_routes(server, where)
            async for signum in signals:
                click.echo(f"{signal.Signals(signum).name}: saving every room and stopping")
                break
        stopped.set()  # still inside the receiver: a signal from here on is caught above
    click.echo("stopped")
    return server.unsaved


def _print_routes(server: Server, where: str) -> None:
    click.echo(f"verani serving on {server.url} ({where})")
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
@click.option(
    "--cluster",
    metavar="redis://HOST:PORT/DB",
    callback=lambda ctx, param, value: _redis_url(value),
    help="Ask the nodes of the cluster on this Redis instead (each room's owner).",
)
def hibernate(target: str | None, all_: bool, store: str, cluster: str | None) -> None:
    """Make the running server hibernate rooms now, and wait until their state is durable.

    ROOM hibernates every awake instance of ROOM, ROOM/INSTANCE just that one, --all every
    room. Exit status: 0 done (also when nothing was awake), 1 no server, no such room, or a
    room could not save its state.

    \b
    Example:
      verani hibernate counter/default --store .verani
      verani hibernate --all
      verani hibernate counter/default --cluster redis://127.0.0.1:6379/0
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
        if cluster is not None:
            from .cluster.tools import cluster_hibernate

            done = trio.run(cluster_hibernate, cluster, room, instance)
            results = [{"room": r, "instance": i, "error": e} for r, i, e in done]
            ok = all(e is None for _, _, e in done)
        else:
            reply = trio.run(
                control_request, store, {"op": "hibernate", "room": room, "instance": instance}
            )
            results = reply.get("hibernated", [])
            ok = bool(reply.get("ok"))
    except (ControlError, VeraniError) as exc:
        raise CommandFailed(str(exc)) from None
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
    if not ok:
        # Each failure is printed above, beside the rooms that did hibernate: nothing to add.
        raise click.exceptions.Exit(CommandFailed.exit_code)


def _split_target(target: str) -> tuple[str, str | None]:
    room, _, rest = target.partition("/")
    if not room:
        raise click.UsageError(f"{target!r} names no room; use ROOM or ROOM/INSTANCE")
    return room, rest or None


@main.command()
@click.argument("target", required=False, metavar="[ROOM[/INSTANCE]]")
@click.option(
    "--store",
    default=".verani",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Store to read (and whose server to ask, if one runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (see cli.md).")
@click.option(
    "--cluster",
    metavar="redis://HOST:PORT/DB",
    callback=lambda ctx, param, value: _redis_url(value),
    help="Read the cluster on this Redis instead: owner node, sessions per node, stored state.",
)
def inspect(target: str | None, store: str, as_json: bool, cluster: str | None) -> None:
    """Show stored room state, and what a running server knows of it.

    Without ROOM: one line per room instance. With ROOM: that room's instances. With
    ROOM/INSTANCE: its persisted state, storage and, from a running server, its sessions,
    ephemeral keys and when it will hibernate. Never writes the store. Exit status: 0 shown,
    1 no such room or instance, or the store cannot be read.

    \b
    Example:
      verani inspect
      verani inspect counter/default --store .verani
      verani inspect counter/default --json | jq .stored.state.count
      verani inspect --cluster redis://127.0.0.1:6379/0
    """
    room, instance = _split_target(target) if target else (None, None)
    if cluster is not None:
        try:
            _inspect_cluster(cluster, room, instance, as_json)
        except (VeraniError, ValueError, OSError) as exc:
            raise CommandFailed(f"cluster {cluster}: {exc}") from None
        return
    try:
        if instance is None:
            rows = trio.run(list_instances, store, room)
            _print_rows(rows, as_json, store)
        else:
            assert room is not None
            report = trio.run(inspect_instance, store, room, instance)
            if as_json:
                click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
            else:
                _print_report(report)
    except (VeraniError, ValueError) as exc:
        raise CommandFailed(str(exc)) from None


def _inspect_cluster(url: str, room: str | None, instance: str | None, as_json: bool) -> None:
    from .cluster.tools import cluster_report, cluster_rows

    if instance is None:
        rows = trio.run(cluster_rows, url, room)
        if as_json:
            click.echo(orjson.dumps({"instances": rows}, option=orjson.OPT_INDENT_2).decode())
            return
        if not rows:
            click.echo(f"no room instance in the cluster at {url}")
            return
        header = ("ROOM/INSTANCE", "OWNER", "EPOCH", "SESSIONS", "BYTES", "SAVED AT")
        table = [header] + [
            (
                f"{r['room']}/{r['instance']}",
                r["owner"]["node"] if r["owner"] else "- (asleep)",
                str(r["owner"]["epoch"]) if r["owner"] else "-",
                _per_node(r["sessions"]),
                "-" if r["bytes"] is None else str(r["bytes"]),
                r["saved_at"] or "-",
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return
    assert room is not None
    report = trio.run(cluster_report, url, room, instance)
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    owner = report["owner"]
    click.echo(
        f"{room}/{instance}  owner: "
        + (f"node {owner['node']} (epoch {owner['epoch']})" if owner else "none (asleep)")
    )
    click.echo(f"sessions: {_per_node(report['sessions'])}")
    stored = report["stored"]
    if stored is None:
        click.echo("stored: nothing")
    else:
        click.echo(f"stored: {stored['bytes']} bytes, saved {stored['saved_at']}")
        click.echo("persisted state:" if stored["state"] else "persisted state: (empty)")
        codec = make_codec()
        for key, value in stored["state"].items():
            click.echo(f"  {key}: {render(codec.decode(value, path=key), indent=2)}")
    if report["live"] is not None:
        ephemeral = report["live"].get("ephemeral") or {}
        click.echo(f"live on its owner: {len(report['live'].get('sessions', []))} session(s)")
        for key, value in ephemeral.items():
            click.echo(f"  {key}: {value}")
    elif report["live_error"]:
        click.echo(f"live: {report['live_error']}")


def _per_node(sessions: dict[str, int]) -> str:
    if not sessions:
        return "0"
    return f"{sum(sessions.values())} (" + ", ".join(f"{n}: {c}" for n, c in sessions.items()) + ")"


def _print_rows(rows: list[dict[str, Any]], as_json: bool, store: str) -> None:
    if as_json:
        click.echo(orjson.dumps({"instances": rows}, option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        click.echo(f"nothing stored in {store} and no room awake")
        return
    header = ("ROOM/INSTANCE", "STATUS", "BYTES", "SAVED AT", "SESSIONS")
    table = [header] + [
        (
            f"{r['room']}/{r['instance']}",
            _status_text(r),
            "-" if r["bytes"] is None else str(r["bytes"]),
            r["saved_at"] or "-",
            "-" if r["sessions"] is None else str(r["sessions"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _status_text(row: dict[str, Any]) -> str:
    """``stored (not served, unreadable)``: an instance's status and what qualifies it."""
    notes = [
        *(["not served"] if row["served"] is False else []),
        *(["unreadable"] if row["error"] else []),
    ]
    return f"{row['status']} ({', '.join(notes)})" if notes else str(row["status"])


def _print_report(report: dict[str, Any]) -> None:
    live, stored = report["live"], report["stored"]
    title = f"{report['room']}/{report['instance']}  ({report['status']}"
    if report["served"] is False:
        title += ", its room is not served by the running server"
    if live:
        title += f", {len(live['sessions'])} session(s)"
        if "hibernates_in" in live:
            title += f", hibernates in {live['hibernates_in']:.1f}s if idle"
    click.echo(title + ")")
    if report["error"]:
        click.echo(f"stored document unreadable: {report['error']}")
    if stored:
        where = (
            f"{stored['path']}, {stored['bytes']} bytes"
            if stored["bytes"]
            # Committed, not yet checkpointed: the document file comes with the next checkpoint.
            else f"in the journal (the document {stored['path']} is written at a checkpoint)"
        )
        click.echo(
            f"stored: {where}, saved {stored['saved_at']} (format {stored['format_version']})"
        )
        _print_values("persisted state", stored["state"])
        if stored["storage"]:
            _print_values("storage", stored["storage"])
    elif live and "state" in live:
        _print_values("persisted state (not stored yet)", live["state"])
    if live and "ephemeral" in live:
        _print_values("ephemeral state (in memory)", live["ephemeral"])
        for key, text in live["unencodable"].items():
            click.echo(f"  {key}: {text}  (not encodable)")
    schedules = (live or {}).get("schedules", (stored or {}).get("schedules"))
    if schedules:
        _print_schedules(schedules)
    if live and live.get("write_pending"):
        click.echo("a write of newer persisted values is in progress")
    if live:
        click.echo("sessions:" if live["sessions"] else "sessions: none")
        for s in live["sessions"]:
            extra = "".join(f", {k}={v!r}" for k, v in s["extra"].items())
            click.echo(
                f"  user {s['user_id']}  client {s['client_id']}  "
                f"channels {', '.join(s['channels']) or '-'}{extra}"
                + ("  (detached: waiting for its client to recover it)" if s["detached"] else "")
            )


def _print_schedules(schedules: dict[str, Any]) -> None:
    codec = make_codec()
    click.echo("schedules:")
    for key, raw in sorted(schedules.items(), key=lambda item: str(item[1].get("due"))):
        every = f", every {raw['every']:g}s" if raw.get("every") else ""
        try:
            data = render(codec.decode(raw.get("data"), path=key), indent=4)
        except CorruptDocumentError:
            data = orjson.dumps(raw.get("data")).decode()
        click.echo(f"  {key}: {raw.get('event')} due {raw.get('due')}{every}, data {data}")


def _print_values(title: str, values: dict[str, Any]) -> None:
    codec = make_codec()
    click.echo(f"{title}:" if values else f"{title}: (empty)")
    for key, raw in values.items():
        try:
            shown = render(codec.decode(raw, path=key), indent=2)
        except CorruptDocumentError:
            shown = orjson.dumps(raw).decode()  # not a value this verani reads: show it as is
        click.echo(f"  {key}: {shown}")


def _connection_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options of ``verani emit`` and ``verani listen`` that say how to connect."""
    command = click.option(
        "--cafile",
        type=click.Path(exists=True, dir_okay=False),
        help="Trust the CA certificates in this PEM file (instead of the system's) for wss://.",
    )(command)
    return click.option(
        "--timeout",
        default=10.0,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help="Seconds allowed to connect: TCP, TLS and the WebSocket handshake together.",
    )(command)


@main.command()
@click.argument("url")
@click.argument("event")
@click.argument("data", required=False, default=None, metavar="[JSON]")
@click.option(
    "--wait",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to print what comes back before disconnecting.",
)
@click.option(
    "--api",
    "api_url",
    metavar="URL",
    help="Emit through the HTTP API of the server at URL (http[s]://HOST:PORT) to ROOM/INSTANCE, "
    "as a turn of the room, instead of connecting to a room as a client.",
)
@click.option(
    "--token",
    envvar="VERANI_API_TOKEN",
    show_envvar=True,
    metavar="TOKEN",
    help="The server's --api-token (with --api).",
)
@click.option("--channel", help="With --api: emit on this channel.  [default: default]")
@click.option("--user-id", help="With --api: emit to every socket of this user instead.")
@_connection_options
def emit(
    url: str,
    event: str,
    data: str | None,
    wait: float,
    api_url: str | None,
    token: str | None,
    channel: str | None,
    user_id: str | None,
    timeout: float,
    cafile: str | None,
) -> None:
    """Connect to URL, send EVENT with DATA (JSON), print the frames that come back, disconnect.

    Each received frame is printed as one JSON line. A wss:// URL is TLS with certificate
    verification. With --api, EVENT goes to the sockets of ROOM/INSTANCE (INSTANCE defaults to
    "default") through the server's HTTP API, waking the room if it hibernates, and
    {"sent": N} is printed once it is durable. Exit status: 0 sent, 1 the connection failed,
    timed out or was refused (the HTTP status and body are printed), 2 bad usage, 130 Ctrl-C.

    \b
    Example:
      verani emit ws://127.0.0.1:8787/ws/counter?userId=alice counter:increment '{"amount": 2}'
      verani emit ws://127.0.0.1:8787/ws/counter counter:get --wait 0.5
      verani emit wss://rooms.example.com/ws/counter counter:get --cafile ca.pem --timeout 3
      verani emit --api http://127.0.0.1:8787 --token TOKEN chat/lobby notice '{"text": "hi"}'
    """
    try:
        payload = None if data is None else orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="JSON") from None
    if api_url is not None:
        _emit_api(api_url, token, url, event, payload, channel, user_id, timeout, cafile)
        return
    if channel is not None or user_id is not None:
        raise click.UsageError("--channel and --user-id go with --api")
    address, ssl_context = _address(url, cafile)
    ending = _session(address, timeout, ssl_context, send=(event, payload), seconds=wait)
    if ending.closed_by_server is not None:
        # The event was sent: what the server did next is only reported.
        click.echo(f"closed by the server: {ending.closed_by_server}", err=True)


def _emit_api(
    api_url: str,
    token: str | None,
    target: str,
    event: str,
    payload: Any,
    channel: str | None,
    user_id: str | None,
    timeout: float,
    cafile: str | None,
) -> None:
    """``verani emit --api``: one request to the server's HTTP API."""
    if not token:
        raise click.UsageError("--api needs --token TOKEN (or VERANI_API_TOKEN)")
    if not api_url.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--api")
    if channel is not None and user_id is not None:
        raise click.UsageError("give --channel or --user-id, not both")
    room, instance = _split_target(target)
    verify: ssl.SSLContext | bool = True
    if cafile is not None:
        try:
            verify = ssl.create_default_context(cafile=cafile)
        except ssl.SSLError as exc:
            raise click.BadParameter(
                f"no CA certificate could be read from {cafile}: {exc}", param_hint="--cafile"
            ) from None
    try:
        with RoomsClient(api_url, token, timeout=timeout, verify=verify) as rooms:
            sent = rooms.emit(room, instance or "default", event, payload, channel, user_id)
    except RemoteError as exc:
        raise CommandFailed(str(exc)) from None
    click.echo(orjson.dumps({"sent": sent}).decode())


@main.command()
@click.argument("url")
@click.option(
    "--for",
    "duration",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop after this many seconds, with exit status 0.  [default: until Ctrl-C]",
)
@_connection_options
def listen(url: str, duration: float | None, timeout: float, cafile: str | None) -> None:
    """Connect to URL and print every frame the room sends, until Ctrl-C or --for SECONDS.

    Each received frame is printed as one JSON line, as soon as it arrives: what another user of
    the room sees, without sending anything. Exit status: 0 the time was up (or the reader of
    the output went away), 1 the connection failed, was refused, or the server closed it,
    2 bad usage, 130 Ctrl-C.

    \b
    Example:
      verani listen ws://127.0.0.1:8787/ws/counter?userId=bob
      verani listen ws://127.0.0.1:8787/ws/chat --for 60 > chat.jsonl
      verani listen ws://127.0.0.1:8787/ws/counter | jq -c .data
    """
    address, ssl_context = _address(url, cafile)
    ending = _session(address, timeout, ssl_context, send=None, seconds=duration)
    if ending.closed_by_server is not None:
        raise CommandFailed(f"the server closed the connection ({ending.closed_by_server})")


def _address(url: str, cafile: str | None) -> tuple[WebSocketURL, ssl.SSLContext | None]:
    try:
        address = WebSocketURL.parse(url)
    except ValueError:
        raise click.BadParameter("must start with ws:// or wss://", param_hint="URL") from None
    if not address.secure:
        if cafile is not None:
            raise click.BadParameter("is for wss:// URLs only", param_hint="--cafile")
        return address, None
    try:
        return address, ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise click.BadParameter(
            f"no CA certificate could be read from {cafile}: {exc}", param_hint="--cafile"
        ) from None


def _session(
    address: WebSocketURL,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    *,
    send: tuple[str, Any] | None,
    seconds: float | None,
) -> Ending:
    """Run :func:`run_session`; the endings every command treats alike become exits here."""
    try:
        ending = trio.run(
            functools.partial(
                run_session,
                address,
                timeout=timeout,
                ssl_context=ssl_context,
                send=send,
                seconds=seconds,
            )
        )
    except NotConnectedError as exc:
        raise CommandFailed(str(exc)) from None
    if ending.output_closed:
        # As `cat` into `head`: a reader that has seen enough is not a failure.
        detach_stdout()
        raise click.exceptions.Exit(0)
    if ending.interrupted:
        raise click.exceptions.Exit(128 + signal.SIGINT)
    return ending
