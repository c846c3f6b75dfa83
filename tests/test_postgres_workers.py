"""`bgtasks serve --workers 4` with its registry in PostgreSQL (issue #15): four owners on one
data directory, each with its own sessions and advisory lock, write every line exactly once."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import ServerProcess, wait_until
from tests.loadgen import post_concurrently

pytestmark = pytest.mark.parametrize("store", ["postgresql"], indirect=True)

COUNT = 3000
LINE = re.compile(rb"found query: w(\d+)\n|message to w(\d+)@example\.com\n")


def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def health(server: ServerProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=10).json()
    return body


def test_four_workers_on_postgresql_write_every_line_exactly_once(
    server_process: Callable[..., ServerProcess], store: str, tmp_path: Path
) -> None:
    server = server_process(delay=0.0, args=("--workers", "4", "--no-access-log"))
    # Any worker answers /health; the first answers before the last has started.
    wait_until(lambda: health(server)["owners"] == 4, timeout=30)
    paths = [f"/send-notification/w{i}@example.com?q=w{i}" for i in range(COUNT)]
    assert post_concurrently(server.url, paths, timeout=120, concurrency=1000) == [200] * COUNT
    wait_until(lambda: health(server)["unfinished_tasks"] == 0, timeout=120)

    offsets: dict[bytes, int] = {}
    offset = 0
    for line in (server.data_dir / "log.txt").read_bytes().splitlines(keepends=True):
        assert LINE.fullmatch(line), f"malformed line {line!r}"
        assert line not in offsets, f"written twice: {line!r}"
        offsets[line] = offset
        offset += len(line)
    for i in range(COUNT):
        first = offsets.get(f"found query: w{i}\n".encode())
        second = offsets.get(f"message to w{i}@example.com\n".encode())
        assert first is not None and second is not None, f"request w{i} lost a line"
        assert first < second, f"request w{i}'s lines out of order"
    assert len(offsets) == 2 * COUNT

    assert rows(store, "SELECT status, count(*) FROM bgtasks.tasks GROUP BY 1") == [
        ("done", 2 * COUNT)
    ]
    owners = {owner for (owner,) in rows(store, "SELECT owner FROM bgtasks.owners")}
    assert len(owners) == 4
    by_owner = Counter(dict(rows(store, "SELECT owner, count(*) FROM bgtasks.tasks GROUP BY 1")))
    assert set(by_owner) <= owners
    assert len(by_owner) > 1, f"one worker took all the work: {by_owner}"
    shown = health(server)
    assert (shown["store"], shown["owners"], shown["unfinished_tasks"]) == ("postgresql", 4, 0)
