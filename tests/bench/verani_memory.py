"""``verani serve`` on the in-memory store: the server the harness starts for ``verani`` and
``verani_os``, with nothing written anywhere — what verani costs without its store.

``verani serve`` has no option for it (the memory store is for tests and throw-away servers), so
this runs the CLI's own ``serve`` command with ``open_server`` given a ``MemoryStore``; every
other option means what it means to ``verani serve`` (``--store`` and ``--durability`` are
accepted and unused). No control endpoint: ``verani hibernate`` and the harness' status
requests do not reach it.

Usage: ``python tests/bench/verani_memory.py FILE_OR_DIR... [verani serve options]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import verani.cli
from verani.room import RoomDefinition
from verani.server import Server, open_server
from verani.store import MemoryStore


def open_server_in_memory(
    rooms: Sequence[RoomDefinition[Any]], **options: Any
) -> AbstractAsyncContextManager[Server]:
    return open_server(rooms, **{**options, "store": MemoryStore()})


if __name__ == "__main__":
    # The CLI module's own name for open_server, replaced: its serve command calls this one.
    vars(verani.cli)["open_server"] = open_server_in_memory
    print("store: memory (nothing is written)", flush=True)
    verani.cli.main(["serve", *sys.argv[1:]])
