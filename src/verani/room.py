"""Internal: ``define_room``: a room's options, hooks and event handlers. Pure.

A room definition is data: the runtime reads it to route connections, build state and dispatch
events. Hooks can be passed to :func:`define_room` or attached with decorators::

    @counter_room.on("counter:increment")
    def increment(ctx, data): ...

Handlers and hooks may be plain functions or ``async def``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import attrs

from .errors import NotPersistableError, RoomDefinitionError
from .recovery import Recovery
from .state import StateSpec, build_state_spec

if TYPE_CHECKING:
    from .context import RoomActor, RoomContext
    from .protocol import ClientFrame
    from .sessions import ConnectionMeta, HandshakeRequest

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])

MaybeAwaitable = Any  # a handler returns None or an awaitable of None
EventHandler = Callable[["RoomContext[S]", Any], MaybeAwaitable]
Hook = Callable[["RoomContext[S]"], MaybeAwaitable]
MessageHook = Callable[["RoomContext[S]", "ClientFrame"], MaybeAwaitable]
ErrorHook = Callable[[BaseException, "RoomContext[S] | None"], MaybeAwaitable]
RestoreHook = Callable[["RoomActor[S]"], MaybeAwaitable]
ActorHook = Callable[["RoomActor[S]"], MaybeAwaitable]
PersistErrorHook = Callable[[str, BaseException], MaybeAwaitable]
ExtractMeta = Callable[["HandshakeRequest"], "ConnectionMeta | Awaitable[ConnectionMeta]"]

#: Matches every event; wildcard handlers run after the event's own handlers.
WILDCARD = "*"

#: Seconds without a turn before an awake room hibernates, unless the server or room says otherwise.
DEFAULT_IDLE_TIMEOUT = 30.0

_ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")


@attrs.frozen
class PersistOptions:
    """How persisted keys are tracked and how a failed save is treated.

    ``shallow=False`` (default; Verani's deep proxy): assignments to persisted keys and changes
    made in place inside their values (``state.items.append(x)``, ``state.todos[0]["done"] =
    True``, ``state.tags.add(t)``, ``state.players[0].score += 1``) are saved after the turn.
    The state keeps tracking copies of the lists, dicts, sets and attrs/dataclass values put
    under a persisted key, so change them through the state, not through a variable that held
    them before they were put in. ``shallow=True`` (Verani's own default): only assignments are
    noticed, the values are kept as they are, and an in-place change is saved with the key's next
    assignment or at hibernation. ``throw_on_error`` (default): a key that cannot be saved is an
    error of the turn (``on_error`` sees it); otherwise it is only reported to
    ``on_persist_error`` and the log.
    """

    shallow: bool = False
    throw_on_error: bool = True


@attrs.define
class RoomHooks(Generic[S]):
    """The lifecycle hooks of a room; each is optional."""

    on_connect: Hook[S] | None = None
    on_disconnect: Hook[S] | None = None
    on_message: MessageHook[S] | None = None
    on_error: ErrorHook[S] | None = None
    on_hibernation_restore: RestoreHook[S] | None = None
    on_start: ActorHook[S] | None = None
    on_hibernate: ActorHook[S] | None = None
    on_persist_error: PersistErrorHook | None = None
    extract_meta: ExtractMeta | None = None


class RoomDefinition(Generic[S]):
    """A room: what :func:`define_room` returns. Serve it with ``verani serve FILE``."""

    def __init__(
        self,
        *,
        name: str,
        websocket_path: str,
        state_spec: StateSpec,
        persisted_keys: tuple[str, ...],
        persist_options: PersistOptions,
        idle_timeout: float | None,
        hooks: RoomHooks[S],
        allowed_origins: frozenset[str] | None = None,
        max_frame_size: int | None = None,
        max_connections: int | None = None,
        max_instance_name: int | None = None,
        instance_pattern: re.Pattern[str] | None = None,
        recovery: Recovery | None = None,
    ) -> None:
        self.name = name
        #: Connection-state recovery, when the room has it.
        self.recovery = recovery
        self.max_instance_name = max_instance_name
        self.instance_pattern = instance_pattern
        self.max_frame_size = max_frame_size
        self.max_connections = max_connections
        self.allowed_origins = allowed_origins
        self.websocket_path = websocket_path
        self.state_spec = state_spec
        self.persisted_keys = persisted_keys
        self.persist_options = persist_options
        self.idle_timeout = idle_timeout
        self.hooks = hooks
        self._handlers: dict[str, list[EventHandler[S]]] = {}
        self._schedule_handlers: dict[str, Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"<RoomDefinition {self.name!r} at {self.websocket_path!r}>"

    def on_schedule(self, event: str) -> Callable[[F], F]:
        """Decorator: ``fn(ctx, data)`` runs when a schedule of ``event`` comes due
        (``ctx.actor.schedule(...)``); ``ctx.schedule`` is the schedule that ran. One handler
        per event."""
        if not isinstance(event, str) or not event:
            raise RoomDefinitionError(
                f"room {self.name!r}: a schedule event must be a non-empty string"
            )

        def register(fn: F) -> F:
            if not callable(fn):
                raise RoomDefinitionError(
                    f"room {self.name!r}: on_schedule handler for {event!r} must be callable"
                )
            self._schedule_handlers[event] = fn
            return fn

        return register

    def schedule_handler(self, event: str) -> Callable[..., Any] | None:
        """The ``on_schedule`` handler of ``event``, if any."""
        return self._schedule_handlers.get(event)

    # --- event handlers ---------------------------------------------------------------------

    @overload
    def on(self, event: str) -> Callable[[F], F]: ...
    @overload
    def on(self, event: str, handler: F) -> F: ...
    def on(self, event: str, handler: F | None = None) -> F | Callable[[F], F]:
        """Register ``handler(ctx, data)`` for ``event`` (``"*"`` for every event).

        Use as a decorator (``@room.on("chat:message")``) or call with the handler. Several
        handlers of one event run in registration order.
        """
        if not isinstance(event, str) or not event:
            raise RoomDefinitionError(f"room {self.name!r}: event name must be a non-empty string")

        def register(fn: F) -> F:
            if not callable(fn):
                raise RoomDefinitionError(
                    f"room {self.name!r}: handler for {event!r} must be callable, not {fn!r}"
                )
            self._handlers.setdefault(event, []).append(fn)
            return fn

        return register if handler is None else register(handler)

    def off(self, event: str, handler: Callable[..., Any] | None = None) -> None:
        """Remove ``handler`` from ``event``, or every handler of ``event`` when none is given."""
        if handler is None:
            self._handlers.pop(event, None)
            return
        handlers = self._handlers.get(event, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self._handlers.pop(event, None)

    def handlers_for(self, event: str) -> list[EventHandler[S]]:
        """The handlers a frame of ``event`` runs: the event's own, then the wildcard ones."""
        return [*self._handlers.get(event, ()), *self._handlers.get(WILDCARD, ())]

    @property
    def events(self) -> list[str]:
        """The event names with handlers, in registration order."""
        return list(self._handlers)

    # --- hook decorators --------------------------------------------------------------------

    def on_connect(self, fn: F) -> F:
        """Decorator: ``fn(ctx)`` runs when a socket joins, before any of its messages."""
        self.hooks.on_connect = fn
        return fn

    def on_disconnect(self, fn: F) -> F:
        """Decorator: ``fn(ctx)`` runs when a socket leaves; ``ctx.close_code`` says how."""
        self.hooks.on_disconnect = fn
        return fn

    def on_message(self, fn: F) -> F:
        """Decorator: ``fn(ctx, frame)`` runs for frames no event handler matched."""
        self.hooks.on_message = fn
        return fn

    def on_error(self, fn: F) -> F:
        """Decorator: ``fn(error, ctx)`` runs when a handler or a persist fails."""
        self.hooks.on_error = fn
        return fn

    def on_hibernation_restore(self, fn: F) -> F:
        """Decorator: ``fn(actor)`` runs when a room wakes with sockets that outlived its sleep."""
        self.hooks.on_hibernation_restore = fn
        return fn

    def on_start(self, fn: F) -> F:
        """Decorator: ``fn(actor)`` runs each time the instance is created or revived, before
        its first event (and before ``on_hibernation_restore``), as a turn: what it changes in
        persisted state is saved and what it emits is gated like any turn's."""
        self.hooks.on_start = fn
        return fn

    def on_hibernate(self, fn: F) -> F:
        """Decorator: ``fn(actor)`` runs before the final flush of a hibernation (idle,
        ``verani hibernate``, shutdown), as a turn: what it changes is in that flush. If it
        raises, the error is logged (and goes to ``on_error``) and the room hibernates anyway."""
        self.hooks.on_hibernate = fn
        return fn

    def on_persist_error(self, fn: F) -> F:
        """Decorator: ``fn(key, error)`` runs for every persisted key that failed to save."""
        self.hooks.on_persist_error = fn
        return fn

    def extract_meta(self, fn: F) -> F:
        """Decorator: ``fn(request)`` returns the socket's ``ConnectionMeta`` or refuses it."""
        self.hooks.extract_meta = fn
        return fn


@overload
def define_room(
    *,
    name: str,
    websocket_path: str | None = ...,
    state: type[S],
    persisted_keys: Iterable[str] = ...,
    persist_options: PersistOptions | Mapping[str, bool] | None = ...,
    on_persist_error: PersistErrorHook | None = ...,
    idle_timeout: float | None = ...,
    allowed_origins: Iterable[str] | None = ...,
    max_frame_size: int | None = ...,
    max_connections: int | None = ...,
    max_instance_name: int | None = ...,
    instance_pattern: str | re.Pattern[str] | None = ...,
    extract_meta: ExtractMeta | None = ...,
    on_connect: Hook[S] | None = ...,
    on_message: MessageHook[S] | None = ...,
    on_disconnect: Hook[S] | None = ...,
    on_error: ErrorHook[S] | None = ...,
    on_hibernation_restore: RestoreHook[S] | None = ...,
    on_start: ActorHook[S] | None = ...,
    on_hibernate: ActorHook[S] | None = ...,
    recovery: Recovery | None = ...,
) -> RoomDefinition[S]: ...
@overload
def define_room(
    *,
    name: str,
    websocket_path: str | None = ...,
    state: Mapping[str, Any] | None = ...,
    persisted_keys: Iterable[str] = ...,
    persist_options: PersistOptions | Mapping[str, bool] | None = ...,
    on_persist_error: PersistErrorHook | None = ...,
    idle_timeout: float | None = ...,
    allowed_origins: Iterable[str] | None = ...,
    max_frame_size: int | None = ...,
    max_connections: int | None = ...,
    max_instance_name: int | None = ...,
    instance_pattern: str | re.Pattern[str] | None = ...,
    extract_meta: ExtractMeta | None = ...,
    on_connect: Hook[Any] | None = ...,
    on_message: MessageHook[Any] | None = ...,
    on_disconnect: Hook[Any] | None = ...,
    on_error: ErrorHook[Any] | None = ...,
    on_hibernation_restore: RestoreHook[Any] | None = ...,
    on_start: ActorHook[Any] | None = ...,
    on_hibernate: ActorHook[Any] | None = ...,
    recovery: Recovery | None = ...,
) -> RoomDefinition[Any]: ...
def define_room(
    *,
    name: str,
    websocket_path: str | None = None,
    state: type[Any] | Mapping[str, Any] | None = None,
    persisted_keys: Iterable[str] = (),
    persist_options: PersistOptions | Mapping[str, bool] | None = None,
    on_persist_error: PersistErrorHook | None = None,
    idle_timeout: float | None = None,
    allowed_origins: Iterable[str] | None = None,
    max_frame_size: int | None = None,
    max_connections: int | None = None,
    max_instance_name: int | None = None,
    instance_pattern: str | re.Pattern[str] | None = None,
    extract_meta: ExtractMeta | None = None,
    on_connect: Hook[Any] | None = None,
    on_message: MessageHook[Any] | None = None,
    on_disconnect: Hook[Any] | None = None,
    on_error: ErrorHook[Any] | None = None,
    on_hibernation_restore: RestoreHook[Any] | None = None,
    on_start: ActorHook[Any] | None = None,
    on_hibernate: ActorHook[Any] | None = None,
    recovery: Recovery | None = None,
) -> RoomDefinition[Any]:
    """Define a room: Verani's ``defineRoom`` with its options in snake_case.

    ``state`` is an attrs class or dataclass with defaults (``ctx.actor.room_state`` is then typed
    by it) or a dict of initial values. ``persisted_keys`` name the state keys that survive
    hibernation and restarts; the others start from their initial values on every revival.
    ``websocket_path`` defaults to ``/ws/NAME``; ``/PATH/INSTANCE`` reaches instance ``INSTANCE``.
    ``idle_timeout`` (seconds) overrides the server's ``--idle-timeout`` for this room.
    ``allowed_origins`` (e.g. ``["https://app.example"]``) refuses, with 403 before the upgrade,
    a browser whose page comes from any other origin (cross-site WebSocket hijacking).
    ``max_frame_size`` (characters) and ``max_connections`` (per instance) override the server's
    limits for this room, as do ``max_instance_name`` (characters) and ``instance_pattern`` (a
    regular expression a whole instance name must match, e.g. ``r"[a-z0-9-]+"``); other names
    get HTTP 400 before the upgrade. ``recovery=Recovery(...)`` turns on connection-state
    recovery (a reconnect within ``max_disconnect`` seconds gets its session and missed frames
    back).

    Hooks (each also a decorator, ``@room.on_connect``): ``on_connect(ctx)``, ``on_message(ctx,
    frame)``, ``on_disconnect(ctx)``, ``on_error(error, ctx)``, ``on_persist_error(key,
    error)``, ``on_hibernation_restore(actor)`` (revived with sockets), ``on_start(actor)``
    (every creation or revival, before the first event) and ``on_hibernate(actor)`` (before the
    final flush of a hibernation or shutdown; its changes are in that flush).

    Raises :class:`RoomDefinitionError` naming the culprit when an option is invalid.
    """
    if not isinstance(name, str) or not _ROOM_NAME.fullmatch(name):
        raise RoomDefinitionError(
            f"room name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    path = f"/ws/{name}" if websocket_path is None else websocket_path
    _check_path(name, path)
    spec = build_state_spec(name, state)
    if isinstance(persisted_keys, str):
        raise RoomDefinitionError(
            f"room {name!r}: persisted_keys must be a list of key names, not the string "
            f"{persisted_keys!r}"
        )
    keys = tuple(dict.fromkeys(persisted_keys))
    for key in keys:
        if key not in spec.key_types:
            known = ", ".join(spec.key_types) or "(none)"
            raise RoomDefinitionError(
                f"room {name!r}: persisted key {key!r} is not a state key (state keys: {known})"
            )
    options = _persist_options(name, persist_options)
    if idle_timeout is not None and not idle_timeout > 0:
        raise RoomDefinitionError(f"room {name!r}: idle_timeout must be > 0, not {idle_timeout!r}")
    _check_initial_values_persist(name, spec, keys)
    hooks: RoomHooks[Any] = RoomHooks(
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        on_message=on_message,
        on_error=on_error,
        on_hibernation_restore=on_hibernation_restore,
        on_start=on_start,
        on_hibernate=on_hibernate,
        on_persist_error=on_persist_error,
        extract_meta=extract_meta,
    )
    return RoomDefinition(
        name=name,
        websocket_path=path,
        state_spec=spec,
        persisted_keys=keys,
        persist_options=options,
        idle_timeout=idle_timeout,
        hooks=hooks,
        allowed_origins=_origins(name, allowed_origins),
        max_frame_size=_positive(name, "max_frame_size", max_frame_size),
        max_connections=_positive(name, "max_connections", max_connections),
        max_instance_name=_positive(name, "max_instance_name", max_instance_name),
        instance_pattern=_pattern(name, instance_pattern),
        recovery=_recovery(name, recovery),
    )


def _recovery(name: str, recovery: object) -> Recovery | None:
    if recovery is None or isinstance(recovery, Recovery):
        return recovery
    raise RoomDefinitionError(
        f"room {name!r}: recovery must be a verani.Recovery, not {type(recovery).__name__}"
    )


def _pattern(name: str, pattern: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise RoomDefinitionError(
            f"room {name!r}: instance_pattern must be a regular expression, not {pattern!r}"
        )
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RoomDefinitionError(
            f"room {name!r}: instance_pattern {pattern!r} is not a regular expression: {exc}"
        ) from None


def _positive(name: str, option: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise RoomDefinitionError(f"room {name!r}: {option} must be a positive int, not {value!r}")
    return value


def _origins(name: str, origins: Iterable[str] | None) -> frozenset[str] | None:
    if origins is None:
        return None
    if isinstance(origins, str):
        raise RoomDefinitionError(
            f"room {name!r}: allowed_origins must be a list of origins, not the string {origins!r}"
        )
    checked = set()
    for origin in origins:
        normal = normalize_origin(origin)
        if normal is None:
            raise RoomDefinitionError(
                f"room {name!r}: allowed origin {origin!r} must look like 'https://host[:port]'"
                f" (scheme and host, no path)"
            )
        checked.add(normal)
    return frozenset(checked)


def normalize_origin(origin: str) -> str | None:
    """An origin as browsers send it (lower case, no default port), or None if it is not one.

    ``"https://App.Example:443"`` → ``"https://app.example"``.
    """
    match = re.fullmatch(
        r"(https?)://([^/\s:]+|\[[0-9A-Fa-f:.]+\])(?::(\d+))?/?", origin.strip(), re.IGNORECASE
    )
    if match is None:
        return None
    scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
    if port is None or (scheme, port) in (("http", "80"), ("https", "443")):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


def _check_path(name: str, path: object) -> None:
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        raise RoomDefinitionError(
            f"room {name!r}: websocket_path {path!r} must start with '/' and name a path, "
            f"e.g. '/ws/{name}'"
        )
    segments = path[1:].split("/")
    if not all(_PATH_SEGMENT.fullmatch(seg) for seg in segments):
        raise RoomDefinitionError(
            f"room {name!r}: websocket_path {path!r} is invalid: no empty segments, no trailing "
            f"'/', no '?', '#', '%' or spaces"
        )


def _persist_options(
    name: str, value: PersistOptions | Mapping[str, bool] | None
) -> PersistOptions:
    if value is None:
        return PersistOptions()
    if isinstance(value, PersistOptions):
        return value
    unknown = set(value) - {"shallow", "throw_on_error"}
    if unknown:
        raise RoomDefinitionError(
            f"room {name!r}: unknown persist_options {sorted(unknown)}; "
            f"known: shallow, throw_on_error"
        )
    return PersistOptions(**value)


def _check_initial_values_persist(name: str, spec: StateSpec, keys: tuple[str, ...]) -> None:
    # Imported here: the codec is heavier than the rest of this module and only this check needs it.
    from .codec import make_codec

    codec = make_codec()
    state = spec.new_untracked()
    for key in keys:
        try:
            codec.encode(getattr(state, key), spec.key_types[key], path=key)
        except NotPersistableError as exc:
            raise RoomDefinitionError(
                f"room {name!r}: the initial value of persisted key {key!r} cannot be stored: {exc}"
            ) from None
