"""The public surface: what users may import, pinned so that a change to it is a decision.

``verani`` is the API; ``verani.client``, ``verani.remote``, ``verani.testing``, ``verani.store``
and ``verani.pytest_plugin`` are the public submodules (README.md tells users to import the first
three, ``verani.testing`` hands out stores, pytest loads the plugin). Every other module is internal
and says so in the first line of its docstring; tests may import internals to test them, users may
not rely on them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pathlib
import pkgutil
from typing import Any

import pytest

import verani

#: Every name of ``verani.__all__``: adding or removing one means editing this list on purpose.
API = {
    "CallCycleError",
    "ClientError",
    "ClientFrame",
    "CloseCodeError",
    "ConnectionMeta",
    "ControlError",
    "CorruptDocumentError",
    "FrameEncodeError",
    "FrameTooLargeError",
    "HandshakeRefused",
    "HandshakeRequest",
    "NoServerError",
    "NotPersistableError",
    "PersistOptions",
    "PersistenceError",
    "ProtocolError",
    "Recovery",
    "RemoteError",
    "RoomActor",
    "RoomContext",
    "RoomCrashedError",
    "RoomDefinition",
    "RoomDefinitionError",
    "RoomHandle",
    "RoomLoadError",
    "RoomNotFoundError",
    "Runtime",
    "Schedule",
    "ScheduleContext",
    "ServeError",
    "Server",
    "ServerConfig",
    "StoreError",
    "StoreLockedError",
    "VeraniError",
    "define_room",
    "open_server",
}

#: The public submodules and the ``__all__`` of each.
SUBMODULES = {
    "verani.client": {
        "AckError",
        "NotConnectedError",
        "ReconnectOptions",
        "VeraniClient",
        "open_client",
    },
    "verani.remote": {"AsyncRoomsClient", "RemoteError", "RoomsClient"},
    "verani.testing": {"AckError", "ClientClosed", "TestClient", "TestServer", "open_test_server"},
    "verani.store": {
        "FORMAT_VERSION",
        "MIGRATIONS",
        "FileStore",
        "JSONValue",
        "MemoryStore",
        "Migration",
        "Store",
        "StoredDocument",
        "decode_instance_name",
        "encode_instance_name",
        "validate_room_name",
    },
}

#: The pytest plugin's public names are its fixtures (pytest finds it by its entry point).
PLUGIN_FIXTURES = {"verani_rooms", "verani_server"}

PUBLIC_MODULES = {"verani", *SUBMODULES, "verani.pytest_plugin"}


def _all_modules() -> list[str]:
    found = ["verani"]
    found += (info.name for info in pkgutil.walk_packages(verani.__path__, "verani."))
    return sorted(found)


def test_the_api_is_exported_once_sorted_and_as_pinned() -> None:
    assert len(verani.__all__) == len(set(verani.__all__))
    assert sorted(verani.__all__) == list(verani.__all__)
    assert set(verani.__all__) == API


@pytest.mark.parametrize("module", sorted(SUBMODULES))
def test_each_public_submodule_exports_what_is_pinned(module: str) -> None:
    exported = importlib.import_module(module).__all__
    assert len(exported) == len(set(exported))
    assert set(exported) == SUBMODULES[module]


def test_every_exported_name_is_importable() -> None:
    for module, names in {"verani": API, **SUBMODULES}.items():
        namespace: dict[str, Any] = {}
        exec(f"from {module} import *", namespace)  # what a user's star import gets
        assert names <= set(namespace), module
        for name in names:
            assert getattr(importlib.import_module(module), name) is not None, (module, name)


def _own_doc(obj: Any) -> str | None:
    # A class without a docstring of its own would show its base's; inspect.getdoc() would too.
    if isinstance(obj, type):
        doc = vars(obj).get("__doc__")
        return doc if isinstance(doc, str) else None
    return getattr(obj, "__doc__", None)


def _documentable(obj: Any) -> bool:
    # Constants and type aliases carry no docstring of their own: their modules comment them.
    return isinstance(obj, type) or inspect.isroutine(obj)


def test_every_public_class_and_function_has_a_docstring() -> None:
    missing = []
    for module, names in {"verani": API, **SUBMODULES}.items():
        namespace = importlib.import_module(module)
        for name in names:
            obj = getattr(namespace, name)
            if _documentable(obj) and not (_own_doc(obj) or "").strip():
                missing.append(f"{module}.{name}")
    plugin = importlib.import_module("verani.pytest_plugin")
    for name in PLUGIN_FIXTURES:
        # pytest wraps a fixture function; its docstring is what `pytest --fixtures` shows.
        fixture = getattr(plugin, name)
        if not (getattr(fixture, "__doc__", None) or "").strip():
            missing.append(f"verani.pytest_plugin.{name}")
    assert missing == []


def _module_doc(name: str) -> str | None:
    # Read, not imported: importing verani.__main__ would run the command line.
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    return ast.get_docstring(tree)


def test_every_module_is_public_or_says_it_is_internal() -> None:
    modules = _all_modules()
    assert set(modules) >= PUBLIC_MODULES
    for name in modules:
        doc = _module_doc(name)
        assert doc, f"{name} has no docstring"
        first = doc.strip().splitlines()[0]
        if name in PUBLIC_MODULES:
            assert not first.startswith("Internal"), name
        else:
            assert first.startswith("Internal: "), f"{name}: {first!r}"
