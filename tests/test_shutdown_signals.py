"""A second stop signal ends the drain at once, and what it left unfinished is finished, once,
by the next start: every order of SIGINT and SIGTERM, a third signal, and `--workers`, where a
terminal's Ctrl-C reaches each worker twice (from the terminal and from uvicorn's supervisor).
All against real `bgtasks serve` processes."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.paths import registry_path
from tests.helpers import ServerProcess, wait_until
from tests.loadgen import post_concurrently

INT, TERM = signal.SIGINT, signal.SIGTERM
LEFT = "stopped before these finished; they stay in the registry and are finished at the next start"
# Stopped by Ctrl-C `bgtasks serve` exits 0; after a SIGTERM it dies of it, as uvicorn does.
BY_INT, BY_TERM = 0, -TERM


def rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{registry_path(data_dir)}?mode=ro", uri=True, timeout=10)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def statuses(data_dir: Path) -> list[tuple[Any, ...]]:
    return rows(data_dir, "SELECT status, count(*) FROM tasks GROUP BY 1 ORDER BY 1")


def idle(url: str) -> bool:
    return bool(httpx.get(f"{url}/health", timeout=5).json()["unfinished_tasks"] == 0)


def draining(server: ServerProcess, workers: int = 1) -> Callable[[], bool]:
    return lambda: server.log().count("shutting down, waiting for them") >= workers


def handled(server: ServerProcess, sig: signal.Signals) -> Callable[[], bool]:
    return lambda: f"{sig.name} received" in server.log()


def start_workers(start: Callable[..., ServerProcess], delay: float) -> ServerProcess:
    server = start(delay=delay, args=("--workers", "2"))
    # /health answered once one worker is up; the test needs both to have work and signals.
    wait_until(lambda: server.log().count("Application startup complete") == 2, timeout=30)
    return server


def relayed(server: ServerProcess) -> bool:
    """uvicorn's supervisor has passed the stop on, and a worker with tasks has handled that
    SIGTERM. (A worker that got no request may be gone by then, or get it as it leaves.)"""
    log = server.log()
    return "Waiting for child process" in log and bool(
        re.search(r"SIGTERM received: \d+ background tasks unfinished", log)
    )


def finish_at_next_start(
    start: Callable[..., ServerProcess], data_dir: Path, lines: list[bytes], unfinished: int
) -> None:
    """The stopped server wrote none of `lines`; a new one on the same directory writes each
    exactly once and marks the tasks recovered."""
    assert not (data_dir / "log.txt").exists()
    left = rows(data_dir, "SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')")
    assert left == [(unfinished,)]
    again = start(data_dir=data_dir, delay=0.0)
    wait_until(lambda: idle(again.url), timeout=30)
    assert sorted((data_dir / "log.txt").read_bytes().splitlines(keepends=True)) == sorted(lines)
    assert statuses(data_dir) == [("recovered", unfinished)]


@pytest.mark.parametrize(
    ("signals", "wait_for_drain", "returncode"),
    [
        ((INT, INT), True, BY_INT),
        ((TERM, TERM), True, BY_TERM),
        ((TERM, INT), True, BY_TERM),
        ((INT, TERM), True, BY_TERM),
        # Most often before the drain began: on a second SIGINT uvicorn itself skips the
        # lifespan's shutdown, and cancels it instead.
        ((INT, INT), False, BY_INT),
        ((TERM, TERM), False, BY_TERM),
    ],
    ids=["int-int", "term-term", "term-int", "int-term", "int-int-quickly", "term-term-quickly"],
)
def test_a_second_signal_ends_the_drain_and_the_next_start_finishes_the_tasks(
    server_process: Callable[..., ServerProcess],
    signals: tuple[signal.Signals, signal.Signals],
    wait_for_drain: bool,
    returncode: int,
) -> None:
    server = server_process(delay=5.0)
    response = httpx.post(f"{server.url}/send-notification/a@example.com", params={"q": "hi"})
    assert response.status_code == 200
    first, second = signals
    server.proc.send_signal(first)
    # Not sooner than the first is handled: two signals that arrive before it are one.
    wait_until(draining(server) if wait_for_drain else handled(server, first))
    server.proc.send_signal(second)
    # Waiting would take 10 s (two tasks of 5 s, one after the other).
    assert server.proc.wait(timeout=4) == returncode
    log = server.log()
    (forced,) = [line for line in log.splitlines() if f"{second.name} received again" in line]
    (left,) = [line for line in log.splitlines() if LEFT in line]
    for line in (forced, left):
        assert "finished at the next start: 2 background tasks unfinished" in line
        assert "'found query: hi\\n' -> log.txt" in line
        assert "'message to a@example.com\\n' -> log.txt" in line
    assert "Traceback" not in log
    lines = [b"found query: hi\n", b"message to a@example.com\n"]
    finish_at_next_start(server_process, server.data_dir, lines, 2)


@pytest.mark.parametrize("third", [INT, TERM], ids=["int", "term"])
def test_a_third_signal_changes_nothing(
    server_process: Callable[..., ServerProcess], third: signal.Signals
) -> None:
    server = server_process(delay=5.0)
    paths = [f"/send-notification/t{i}@example.com" for i in range(10)]
    assert post_concurrently(server.url, paths) == [200] * 10
    server.proc.send_signal(INT)
    wait_until(draining(server))
    server.proc.send_signal(INT)
    server.proc.send_signal(third)
    # A late Ctrl-C may land after the server has stopped, in Python's own handler: the
    # process then dies of SIGINT (130 in a shell), which is what Ctrl-C means.
    expected = {BY_INT, -INT} if third == INT else {BY_TERM}
    assert server.proc.wait(timeout=4) in expected
    log = server.log()
    assert "Traceback" not in log
    assert f"{LEFT}: 10 background tasks unfinished" in log
    lines = [f"message to t{i}@example.com\n".encode() for i in range(10)]
    finish_at_next_start(server_process, server.data_dir, lines, 10)


def test_with_workers_one_ctrl_c_still_waits_for_every_task(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = start_workers(server_process, delay=2.0)
    paths = [f"/send-notification/w{i}@example.com" for i in range(20)]
    assert post_concurrently(server.url, paths) == [200] * 20
    os.killpg(server.proc.pid, INT)  # a terminal's Ctrl-C goes to the whole process group
    assert server.proc.wait(timeout=60) == BY_INT
    log = server.log()
    # A worker with tasks to wait for also got the supervisor's SIGTERM, and still waited.
    # (A worker that got no request may be gone before the supervisor passes the stop on.)
    assert log.count("SIGTERM received") >= 1
    assert "received again" not in log
    written = sorted((server.data_dir / "log.txt").read_bytes().splitlines())
    assert written == sorted(f"message to w{i}@example.com".encode() for i in range(20))
    assert statuses(server.data_dir) == [("done", 20)]


def test_with_workers_a_second_ctrl_c_ends_every_drain(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = start_workers(server_process, delay=30.0)
    paths = [f"/send-notification/w{i}@example.com" for i in range(20)]
    assert post_concurrently(server.url, paths) == [200] * 20
    os.killpg(server.proc.pid, INT)
    wait_until(lambda: relayed(server))
    os.killpg(server.proc.pid, INT)
    assert server.proc.wait(timeout=15) == BY_INT
    log = server.log()
    # Each worker names what it leaves. (If the second Ctrl-C came before its lifespan's
    # shutdown, uvicorn skips that and the worker dies of the re-raised SIGTERM: the log's
    # last word is then this line, and the registry is left as by a kill -9.)
    forced = [line for line in log.splitlines() if "SIGINT received again: stopping now" in line]
    assert 1 <= len(forced) <= 2
    for line in forced:  # (a worker that got no request has nothing to leave)
        assert "finished at the next start" in line or "no background tasks unfinished" in line
    assert all(any(f"'message to w{i}@example.com\\n'" in f for f in forced) for i in range(20))
    assert "Traceback" not in log
    lines = [f"message to w{i}@example.com\n".encode() for i in range(20)]
    finish_at_next_start(server_process, server.data_dir, lines, 20)
