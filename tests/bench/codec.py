"""Encode and decode throughput of the persistence codec (run by hand; never collected by pytest).

    python -m tests.bench.codec [--quick]

Run from the repository root. For each representative persisted value, times
``Codec.encode(value, declared)`` and ``Codec.decode(raw, declared)`` (the JSON tree only: no
``dumps``/``loads``, which are orjson's own work) and prints the best of several rounds, as
microseconds per call and as MB/s of the value's JSON text. Best-of, not mean: the figure is what
the code costs when the machine does not interfere, which is what a before/after compares.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import re
import time
import uuid
import zoneinfo
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import attrs

from verani.codec import dumps, make_codec


@attrs.define
class Small:
    """A small room state of scalars: the per-turn case."""

    count: int = 0
    ratio: float = 0.0
    label: str = ""
    flag: bool = False
    owner: str | None = None


@attrs.define
class Special:
    """Declared special types: the datetime family, sets, Decimal, UUID, bytes, re.Pattern."""

    when: dt.datetime
    day: dt.date
    at: dt.time
    span: dt.timedelta
    tags: set[str]
    frozen: frozenset[int]
    price: Decimal
    id: uuid.UUID
    blob: bytes
    pattern: re.Pattern[str]
    by_id: dict[int, str]


def _cases() -> list[tuple[str, Any, Any]]:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    scalars: list[Any] = []
    i = 0
    while len(dumps(scalars)) < 1_000_000:
        scalars.extend((i, f"name-{i}", i * 0.5, i % 2 == 0, None))
        i += 1
    nested = {
        f"room-{r}": {
            "members": [{"id": m, "name": f"user{m}", "score": m * 1.5} for m in range(20)],
            "meta": {"open": True, "limits": [1, 2, 3], "title": "lobby"},
        }
        for r in range(50)
    }
    special = Special(
        when=dt.datetime(2024, 6, 1, 12, tzinfo=paris),
        day=dt.date(2024, 2, 29),
        at=dt.time(1, 2, 3),
        span=dt.timedelta(days=1, seconds=5),
        tags={f"t{n}" for n in range(20)},
        frozen=frozenset(range(20)),
        price=Decimal("12.50"),
        id=uuid.UUID(int=7),
        blob=b"\x00\xff" * 32,
        pattern=re.compile("^a+", re.I),
        by_id={n: f"v{n}" for n in range(20)},
    )
    specials_list = [special] * 50
    untyped = {
        f"k{n}": [
            n,
            f"s{n}",
            dt.datetime(2024, 1, 1, n % 24),
            {n, n + 1},
            (n, "t"),
            Decimal(n),
            uuid.UUID(int=n),
            b"xy",
            {n: "map"},
            2**70,
            float("nan"),
        ]
        for n in range(200)
    }
    return [
        ("small attrs state of scalars", Small(3, 0.5, "lobby", True, "ann"), Small),
        ("1 MB list of scalars (Any)", scalars, Any),
        ("1 MB list of scalars (list[Any])", scalars, list[Any]),
        ("nested dicts/lists (Any)", nested, Any),
        ("special types x50 (list[Special])", specials_list, list[Special]),
        ("untyped dict, mixed values (Any)", untyped, Any),
        ("scalar int (int)", 42, int),
    ]


def _best(fn: Callable[[], object], rounds: int, budget: float) -> float:
    """Best seconds per call over ``rounds`` rounds of about ``budget`` seconds each."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(budget / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def main() -> None:
    """Print one line per case: encode and decode, µs per call and MB/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, budget = (3, 0.1) if args.quick else (5, 0.3)
    codec = make_codec()
    print(f"{'case':<36} {'bytes':>9} {'encode µs':>11} {'MB/s':>7} {'decode µs':>11} {'MB/s':>7}")
    for name, value, declared in _cases():
        raw = codec.encode(value, declared, path="k")
        assert codec.decode(raw, declared, path="k") is not None
        size = len(dumps(raw))
        enc = _best(functools.partial(codec.encode, value, declared, path="k"), rounds, budget)
        dec = _best(functools.partial(codec.decode, raw, declared, path="k"), rounds, budget)
        print(
            f"{name:<36} {size:>9} {enc * 1e6:>11.1f} {size / enc / 1e6:>7.1f}"
            f" {dec * 1e6:>11.1f} {size / dec / 1e6:>7.1f}"
        )


if __name__ == "__main__":
    main()
