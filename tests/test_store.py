"""The file store on real files: layout, atomic saves, corrupt documents, instance names."""

from __future__ import annotations

import datetime
import errno
import logging
import os
import pathlib
import random
import stat
import tempfile
import time
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from faults import FaultyStore
from verani.errors import CorruptDocumentError, StoreError
from verani.store import (
    FORMAT_VERSION,
    FileStore,
    Store,
    decode_instance_name,
    encode_instance_name,
)
from verani.store.base import Changes

STATE: dict[str, Any] = {
    "count": 3,
    "big": 2**62,
    "ratio": 0.25,
    "name": "zoë ✓",
    "flags": [True, False, None],
    "nested": {"items": [{"id": 1}, {"id": 2}], "empty": {}},
}

TRAVERSAL_NAMES = [
    "..",
    ".",
    "../x",
    "../../etc/passwd",
    "a/../../b",
    "%2e%2e",
    "%2F",
    "%",
    "a/b",
    "a\\b",
    "\x00",
    "nul\x00byte",
    " spaced name ",
    "~",
    ".hidden",
    "x.json",
    "x.json.corrupt-20250101T000000Z",
    "x" * 10_000,
    "é" * 5_000,
    "部屋🚪",
    "A",
    "a",
]


@pytest.fixture
def store(tmp_path: pathlib.Path) -> FileStore:
    return FileStore(tmp_path / "store")


def files_under(directory: pathlib.Path) -> set[pathlib.Path]:
    return {p for p in directory.rglob("*") if p.is_file()}


def temp_files(directory: pathlib.Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def write_raw(store: FileStore, room: str, instance: str, data: bytes) -> pathlib.Path:
    path = store.path_for(room, instance)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def document(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "format": "verani.room",
        "version": FORMAT_VERSION,
        "room": "chat",
        "instance": "lobby",
        "saved_at": "2025-01-31T12:00:00Z",
        "seq": 0,
        "schedules": {},
        "recovery": {},
        "state": {"count": 1},
        "storage": {},
    }
    doc.update(changes)
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


# --- saving and loading ---------------------------------------------------------------------


def test_file_store_is_a_store(store: FileStore, tmp_path: pathlib.Path) -> None:
    assert isinstance(store, Store)
    assert store.directory == tmp_path / "store"
    assert store.path_for("chat", "lobby") == tmp_path / "store" / "rooms" / "chat" / "lobby.json"


async def test_round_trip(store: FileStore) -> None:
    await store.save("chat", "lobby", STATE)
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.state == STATE
    assert (loaded.room, loaded.instance) == ("chat", "lobby")
    assert loaded.format_version == FORMAT_VERSION


async def test_load_of_nothing_is_none(store: FileStore) -> None:
    assert await store.load("chat", "lobby") is None
    await store.save("chat", "other", {})
    assert await store.load("chat", "lobby") is None


async def test_saved_at_is_recent_utc(store: FileStore) -> None:
    before = datetime.datetime.now(datetime.UTC)
    await store.save("chat", "lobby", {"count": 1})
    after = datetime.datetime.now(datetime.UTC)
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.saved_at.utcoffset() == datetime.timedelta(0)
    assert before <= loaded.saved_at <= after


async def test_document_is_readable_json(store: FileStore) -> None:
    await store.save("chat", "lobby", {"count": 1, "names": ["a"]}, {"k": "v"})
    raw = store.path_for("chat", "lobby").read_bytes()
    assert b'\n  "state": {\n' in raw  # indented for people
    doc = orjson.loads(raw)
    assert list(doc) == [
        "format",
        "version",
        "room",
        "instance",
        "saved_at",
        "seq",
        "state",
        "storage",
        "schedules",
        "recovery",
    ]
    assert doc["format"] == "verani.room"
    assert doc["version"] == 5 and doc["seq"] == 0 and doc["schedules"] == {}
    assert doc["recovery"] == {}
    assert doc["storage"] == {"k": "v"}
    assert (doc["room"], doc["instance"]) == ("chat", "lobby")
    assert doc["saved_at"].endswith("Z")
    assert datetime.datetime.fromisoformat(doc["saved_at"]).utcoffset() == datetime.timedelta(0)
    assert doc["state"] == {"count": 1, "names": ["a"]}


async def test_overwrite_keeps_only_the_newest(store: FileStore) -> None:
    await store.save("chat", "lobby", {"count": 1})
    await store.save("chat", "lobby", {"count": 2})
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.state == {"count": 2}
    assert files_under(store.directory) == {store.path_for("chat", "lobby")}


async def test_directories_are_private(tmp_path: pathlib.Path) -> None:
    store = FileStore(tmp_path / "a" / "store")
    await store.save("chat", "lobby", {})
    for directory in (tmp_path / "a", store.directory, store.directory / "rooms"):
        assert directory.is_dir()
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0, directory
    room_dir = store.path_for("chat", "lobby").parent
    assert stat.S_IMODE(room_dir.stat().st_mode) & 0o077 == 0


async def test_fsync_durability_syncs_file_and_directory(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.save("chat", "lobby", {"count": 1})  # directories exist from here on
    synced: list[bool] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    await store.save("chat", "lobby", {"count": 2})
    assert synced == [False, True]  # the temp file, then the directory after the rename


async def test_os_durability_round_trip_without_fsync(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fsync(fd: int) -> None:
        raise AssertionError("durability='os' must not fsync")

    monkeypatch.setattr(os, "fsync", no_fsync)
    store = FileStore(tmp_path, durability="os")
    await store.save("chat", "lobby", STATE)
    await store.save("chat", "lobby", {"count": 9})
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.state == {"count": 9}
    assert await store.list_instances() == [("chat", "lobby")]


def test_unknown_durability_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        FileStore(tmp_path, durability="never")  # type: ignore[arg-type]


async def test_state_that_is_not_json_is_a_type_error(store: FileStore) -> None:
    with pytest.raises(TypeError, match="lobby"):
        await store.save("chat", "lobby", {"when": {1, 2}})  # type: ignore[dict-item]
    assert not store.path_for("chat", "lobby").exists()


# --- failures and crashes while saving ------------------------------------------------------


class SimulatedCrash(Exception):
    """Stands for the process dying: the store's OSError cleanup does not run for it."""


async def test_crash_between_temp_write_and_rename_keeps_the_old_document(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.save("chat", "lobby", {"count": 1})
    path = store.path_for("chat", "lobby")

    def crash(src: Any, dst: Any) -> None:
        raise SimulatedCrash

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(SimulatedCrash):
            await store.save("chat", "lobby", {"count": 2})

    # What a crash leaves: the old document and a hidden temp file with the new one.
    assert orjson.loads(path.read_bytes())["state"] == {"count": 1}
    [leftover] = temp_files(path.parent)
    assert leftover.endswith(".tmp")
    assert orjson.loads((path.parent / leftover).read_bytes())["state"] == {"count": 2}
    non_temp = {p for p in files_under(store.directory) if not p.name.startswith(".")}
    assert non_temp == {path}
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.state == {"count": 1}
    assert await store.list_instances() == [("chat", "lobby")]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
async def test_failed_save_raises_store_error_and_removes_the_temp_file(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    await store.save("chat", "lobby", {"count": 1})
    path = store.path_for("chat", "lobby")

    def fail(*args: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, failing, fail)
        with pytest.raises(StoreError) as caught:
            await store.save("chat", "lobby", {"count": 2})

    message = str(caught.value)
    assert "'chat'" in message
    assert "'lobby'" in message
    assert str(path) in message
    assert "Input/output error" in message
    assert isinstance(caught.value.__cause__, OSError)
    assert temp_files(path.parent) == []
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.state == {"count": 1}


async def test_failed_write_removes_the_temp_file(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.save("chat", "lobby", {"count": 1})
    path = store.path_for("chat", "lobby")
    real_mkstemp = tempfile.mkstemp

    def read_only_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        # The temp file exists, but writing to it fails, as on a full disk.
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open(name, os.O_RDONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", read_only_mkstemp)
    with pytest.raises(StoreError, match="'lobby'"):
        await store.save("chat", "lobby", {"count": 2})
    assert temp_files(path.parent) == []
    assert orjson.loads(path.read_bytes())["state"] == {"count": 1}


async def test_save_into_an_unusable_directory_is_a_store_error(tmp_path: pathlib.Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("in the way")
    store = FileStore(not_a_dir)
    with pytest.raises(StoreError, match="'lobby'"):
        await store.save("chat", "lobby", {})
    assert not_a_dir.read_text() == "in the way"


async def test_save_into_a_read_only_directory_is_a_store_error(tmp_path: pathlib.Path) -> None:
    # The EACCES a read-only directory gives is injected (root would write there anyway), at
    # the file work, so FileStore's own handling turns it into the StoreError.
    store = FaultyStore(tmp_path / "store")
    await store.save("chat", "lobby", {"count": 1})
    room_dir = store.path_for("chat", "lobby").parent
    store.fail_writes(PermissionError(errno.EACCES, "Permission denied", str(room_dir)))
    with pytest.raises(StoreError, match="Permission denied"):
        await store.save("chat", "lobby", {"count": 2})
    store.heal()
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.state == {"count": 1}


async def test_concurrent_saves_leave_the_last_one_called(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def slow_replace(src: Any, dst: Any) -> None:
        # Unequal delays would let a later save overtake an earlier one if saves overlapped.
        time.sleep(random.uniform(0, 0.005))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    called: list[int] = []

    async def save(n: int) -> None:
        called.append(n)
        await store.save("chat", "lobby", {"n": n})

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(save, n)
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert loaded.state == {"n": called[-1]}
    assert temp_files(store.path_for("chat", "lobby").parent) == []


async def test_load_waits_for_a_save_in_progress(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def slow_replace(src: Any, dst: Any) -> None:
        time.sleep(0.05)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    results: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.save, "chat", "lobby", {"count": 1})
        await trio.testing.wait_all_tasks_blocked()
        results.append(await store.load("chat", "lobby"))
    assert results[0] is not None
    assert results[0].state == {"count": 1}


# --- corrupt documents ----------------------------------------------------------------------

CORRUPT = {
    "not json": b"{ this is not json",
    "empty": b"",
    "invalid utf-8": b'{"format": "\xff"}',
    "not an object": b"[1, 2, 3]",
    "wrong format": document(format="other"),
    "no format": document(format=...),
    "newer version": document(version=FORMAT_VERSION + 1),
    "version as string": document(version="1"),
    "version as bool": document(version=True),
    "no version": document(version=...),
    "other room": document(room="elsewhere"),
    "other instance": document(instance="someone-else"),
    "no instance": document(instance=...),
    "bad saved_at": document(saved_at="yesterday"),
    "naive saved_at": document(saved_at="2025-01-31T12:00:00"),
    "saved_at as number": document(saved_at=1700000000),
    "state as list": document(state=[1]),
    "no state": document(state=...),
}


@pytest.mark.parametrize("data", CORRUPT.values(), ids=CORRUPT.keys())
async def test_corrupt_document_is_moved_aside(
    store: FileStore, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    path = write_raw(store, "chat", "lobby", data)
    with (
        caplog.at_level(logging.WARNING, logger="verani.store"),
        pytest.raises(CorruptDocumentError) as caught,
    ):
        await store.load("chat", "lobby")

    assert not path.exists()
    [moved] = [p for p in path.parent.iterdir() if p.name.startswith("lobby.json.corrupt-")]
    assert moved.read_bytes() == data
    message = str(caught.value)
    for part in ("'chat'", "'lobby'", str(moved)):
        assert part in message
    [record] = [r for r in caplog.records if r.name == "verani.store"]
    assert record.levelno == logging.WARNING
    assert str(moved) in record.getMessage()
    assert "'lobby'" in record.getMessage()

    assert await store.load("chat", "lobby") is None
    assert await store.list_instances() == []


async def test_corrupt_message_says_why(store: FileStore) -> None:
    write_raw(store, "chat", "lobby", document(version=FORMAT_VERSION + 1))
    with pytest.raises(CorruptDocumentError, match="newer"):
        await store.load("chat", "lobby")


async def test_corrupt_copies_never_overwrite_each_other(store: FileStore) -> None:
    path = write_raw(store, "chat", "lobby", b"first")
    with pytest.raises(CorruptDocumentError):
        await store.load("chat", "lobby")
    write_raw(store, "chat", "lobby", b"second")
    with pytest.raises(CorruptDocumentError):
        await store.load("chat", "lobby")
    copies = sorted(path.parent.glob("lobby.json.corrupt-*"))
    assert len(copies) == 2
    assert {p.read_bytes() for p in copies} == {b"first", b"second"}


async def test_corrupt_document_that_cannot_be_moved_is_kept(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_raw(store, "chat", "lobby", b"garbage")

    def fail(*args: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(StoreError, match="Read-only file system") as caught:
        await store.load("chat", "lobby")
    # Not CorruptDocumentError: the room must not start afresh and overwrite the document.
    assert not isinstance(caught.value, CorruptDocumentError)
    assert path.read_bytes() == b"garbage"


async def test_read_error_is_not_corruption(store: FileStore) -> None:
    path = store.path_for("chat", "lobby")
    path.mkdir(parents=True)  # reading it fails with an OS error, as EIO would
    with pytest.raises(StoreError, match="'lobby'") as caught:
        await store.load("chat", "lobby")
    assert not isinstance(caught.value, CorruptDocumentError)
    assert str(path) in str(caught.value)
    assert path.is_dir()
    assert list(path.parent.iterdir()) == [path]


async def test_unreadable_file_is_not_corruption(tmp_path: pathlib.Path) -> None:
    # As above: the EACCES of an unreadable file is injected where the read would raise it.
    store = FaultyStore(tmp_path / "store")
    await store.save("chat", "lobby", {"count": 1})
    path = store.path_for("chat", "lobby")
    store.fail_reads(PermissionError(errno.EACCES, "Permission denied", str(path)), times=1)
    with pytest.raises(StoreError, match="Permission denied") as caught:
        await store.load("chat", "lobby")
    assert not isinstance(caught.value, CorruptDocumentError)
    assert list(path.parent.iterdir()) == [path]


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("instance", TRAVERSAL_NAMES, ids=lambda n: repr(n)[:30])
async def test_instance_names_stay_inside_and_round_trip(
    store: FileStore, tmp_path: pathlib.Path, instance: str
) -> None:
    room_dir = (store.directory / "rooms" / "chat").resolve()
    path = store.path_for("chat", instance)
    assert path.resolve().parent == room_dir
    assert len(path.name.encode()) <= 255

    await store.save("chat", instance, {"who": instance})
    loaded = await store.load("chat", instance)
    assert loaded is not None
    assert loaded.instance == instance
    assert loaded.state == {"who": instance}
    assert await store.list_instances("chat") == [("chat", instance)]
    assert files_under(tmp_path) == {path}


async def test_all_awkward_names_coexist(store: FileStore) -> None:
    for n, instance in enumerate(TRAVERSAL_NAMES):
        await store.save("chat", instance, {"n": n})
    assert await store.list_instances() == sorted(("chat", i) for i in TRAVERSAL_NAMES)
    for n, instance in enumerate(TRAVERSAL_NAMES):
        loaded = await store.load("chat", instance)
        assert loaded is not None
        assert loaded.state == {"n": n}


def test_long_names_are_hashed() -> None:
    stem = encode_instance_name("x" * 10_000)
    assert stem == "x" * 100 + "~" + stem[-32:]
    assert decode_instance_name(stem) is None
    assert encode_instance_name("x" * 9_999 + "y") != stem
    assert encode_instance_name("x" * 180) == "x" * 180  # the longest unhashed stem


def test_encoding_is_percent_encoded_utf8() -> None:
    assert encode_instance_name("lobby-1_A") == "lobby-1_A"
    assert encode_instance_name("../a b") == "%2E%2E%2Fa%20b"
    assert encode_instance_name("%2e") == "%252e"
    assert encode_instance_name("é") == "%C3%A9"
    assert decode_instance_name("%C3%A9") == "é"


@pytest.mark.parametrize("stem", ["", "a.b", "%41", "%c3%a9", "%zz", "%FF", "a%2", "%00%"])
def test_decoding_rejects_stems_encode_cannot_produce(stem: str) -> None:
    with pytest.raises(ValueError, match="not an encoded instance name"):
        decode_instance_name(stem)


@pytest.mark.parametrize("instance", ["", "\ud800"])
async def test_bad_instance_names_are_rejected(store: FileStore, instance: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        await store.save("chat", instance, {})
    with pytest.raises(ValueError, match="instance name"):
        await store.load("chat", instance)
    assert not store.directory.exists()


@pytest.mark.parametrize(
    "room", ["", "a/b", "..", ".", "a" * 65, "é", "chat\n", " chat", "a.b", "a\\b"]
)
async def test_bad_room_names_are_rejected(store: FileStore, room: str) -> None:
    with pytest.raises(ValueError, match="room name") as caught:
        await store.save(room, "lobby", {})
    assert repr(room) in str(caught.value)
    with pytest.raises(ValueError, match="room name"):
        await store.load(room, "lobby")
    with pytest.raises(ValueError, match="room name"):
        await store.list_instances(room)
    with pytest.raises(ValueError, match="room name"):
        store.path_for(room, "lobby")
    assert not store.directory.exists()


STORE_ROOT = pathlib.Path("/nonexistent/verani-store")
ROOM_DIR = STORE_ROOT / "rooms" / "chat"
names = st.text(min_size=1, max_size=300)


@given(names)
def test_encoded_path_stays_in_the_room_directory(name: str) -> None:
    path = FileStore(STORE_ROOT).path_for("chat", name)
    assert path.parent == ROOM_DIR
    assert path.resolve().parent == ROOM_DIR.resolve()
    assert len(path.name.encode()) <= 255
    stem = encode_instance_name(name)
    assert stem.isascii()
    assert not stem.startswith(".")
    full_length = sum(1 if bytes([b]).isalnum() or b in b"_-" else 3 for b in name.encode())
    if full_length <= 180:
        assert decode_instance_name(stem) == name
    else:
        assert len(stem) == 133
        assert decode_instance_name(stem) is None


@given(names, names)
def test_distinct_names_give_distinct_paths(a: str, b: str) -> None:
    if a != b:
        assert encode_instance_name(a) != encode_instance_name(b)


@given(st.text(min_size=60, max_size=60), names, names)
def test_long_names_with_a_shared_prefix_stay_distinct(prefix: str, a: str, b: str) -> None:
    if a != b:
        assert encode_instance_name(prefix + a) != encode_instance_name(prefix + b)


# --- listing --------------------------------------------------------------------------------


async def test_list_instances_of_an_empty_store(store: FileStore) -> None:
    assert await store.list_instances() == []
    assert await store.list_instances("chat") == []


async def test_list_instances_sorted_and_by_room(store: FileStore) -> None:
    for room, instance in [("chat", "b"), ("game", "z"), ("chat", "a"), ("chat", "x" * 500)]:
        await store.save(room, instance, {})
    assert await store.list_instances() == [
        ("chat", "a"),
        ("chat", "b"),
        ("chat", "x" * 500),
        ("game", "z"),
    ]
    assert await store.list_instances("game") == [("game", "z")]
    assert await store.list_instances("other") == []


async def test_list_instances_ignores_what_is_not_a_document(store: FileStore) -> None:
    await store.save("chat", "lobby", {})
    room_dir = store.path_for("chat", "lobby").parent
    for name in [
        ".lobby.json.abc123.tmp",
        "lobby.json.corrupt-20250101T000000Z",
        "lobby.json.corrupt-20250101T000000Z-1",
        "notes.txt",
        "a.b.json",
        "%41.json",  # "A" is spelled "A.json"
        "x~0123.json",  # a hashed stem whose document does not name it
    ]:
        (room_dir / name).write_bytes(b"{}")
    (store.directory / "rooms" / "not.a.room").mkdir()
    (store.directory / "rooms" / "not.a.room" / "lobby.json").write_bytes(b"{}")
    (store.directory / "rooms" / "stray-file").write_bytes(b"")
    assert await store.list_instances() == [("chat", "lobby")]


# --- format versions, storage, delete, set_aside ------------------------------------------------


async def test_version_1_documents_are_migrated_on_read(store: FileStore) -> None:
    write_raw(store, "chat", "lobby", document(version=1, storage=...))
    loaded = await store.load("chat", "lobby")
    assert loaded is not None
    assert (loaded.state, loaded.storage, loaded.format_version) == ({"count": 1}, {}, 1)


async def test_a_store_can_add_its_own_migration_hook(tmp_path: pathlib.Path) -> None:
    class RenamingStore(FileStore):
        def migrate(self, document: dict[str, Any]) -> dict[str, Any]:
            if document["version"] == 1:  # an old room called its key "n"
                document = {**document, "state": {"count": document["state"].pop("n")}}
            return super().migrate(document)

    store = RenamingStore(tmp_path)
    write_raw(store, "chat", "lobby", document(version=1, state={"n": 7}, storage=...))
    loaded = await store.load("chat", "lobby")
    assert loaded is not None and loaded.state == {"count": 7}


async def test_a_document_that_cannot_be_migrated_is_moved_aside(store: FileStore) -> None:
    class NoMigration(FileStore):
        def migrate(self, document: dict[str, Any]) -> dict[str, Any]:
            raise ValueError("this deployment dropped support for version 1")

    strict = NoMigration(store.directory)
    path = write_raw(strict, "chat", "lobby", document(version=1))
    with pytest.raises(CorruptDocumentError, match="cannot migrate it from version 1"):
        await strict.load("chat", "lobby")
    assert not path.exists()
    assert [p.name for p in path.parent.iterdir() if ".corrupt-" in p.name]


async def test_storage_must_be_an_object(store: FileStore) -> None:
    write_raw(store, "chat", "lobby", document(storage=[1]))
    with pytest.raises(CorruptDocumentError, match="storage is list, not an object"):
        await store.load("chat", "lobby")


async def test_delete(store: FileStore) -> None:
    assert await store.delete("chat", "lobby") is False
    await store.save("chat", "lobby", {"count": 1})
    assert await store.delete("chat", "lobby") is True
    assert await store.load("chat", "lobby") is None
    assert await store.list_instances() == []


async def test_set_aside_copies_and_keeps_the_document(store: FileStore) -> None:
    assert await store.set_aside("chat", "lobby", "nothing there") is None
    await store.save("chat", "lobby", {"count": 1})
    original = store.path_for("chat", "lobby").read_bytes()
    copy = await store.set_aside("chat", "lobby", "key 'count' no longer reads as a str")
    assert copy is not None and ".corrupt-" in copy
    assert pathlib.Path(copy).read_bytes() == original
    assert store.path_for("chat", "lobby").read_bytes() == original
    assert await store.list_instances() == [("chat", "lobby")]


async def test_version_4_document_reads_with_no_recoverable_sessions(store: FileStore) -> None:
    write_raw(store, "chat", "lobby", document(version=4, recovery=...))
    loaded = await store.load("chat", "lobby")
    assert loaded is not None and loaded.recovery == {} and loaded.state == {"count": 1}


async def test_recovery_section_commits_through_the_journal(store: FileStore) -> None:
    await store.commit("chat", "lobby", Changes({"count": 1}, recovery_put={"t1": {"o": 1}}))
    await store.commit("chat", "lobby", Changes(recovery_put={"t2": {"o": 2}}))
    await store.commit("chat", "lobby", Changes(recovery_delete=["t1"]))
    loaded = await store.load("chat", "lobby")
    assert loaded is not None and loaded.recovery == {"t2": {"o": 2}}
    await store.aclose()
    reopened = FileStore(store.directory)
    try:
        await reopened.recover()
        again = await reopened.load("chat", "lobby")
    finally:
        await reopened.aclose()
    assert again is not None and again.recovery == {"t2": {"o": 2}}
    assert again.state == {"count": 1}
