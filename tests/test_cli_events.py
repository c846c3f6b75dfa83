"""The CLI on the server's event stream (`GET /events`): notify follows its request on events,
falls back to polling on a server without them; against real uvicorn servers in a thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from typer.testing import CliRunner, Result

from bgtasks_cli.cli import app
from bgtasks_cli.client import Client
from server.app import create_app
from server.config import Settings
from tests.helpers import LiveServer, free_port, serve_app, wait_until

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=ENV)


class Counting:
    """The app, counting the requests it receives by method and path."""

    def __init__(self, inner: FastAPI) -> None:
        self.inner = inner
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.inner(scope, receive, send)

    def gets(self, prefix: str) -> int:
        return sum(1 for method, path in self.seen if method == "GET" and path.startswith(prefix))


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(**{"data_dir": tmp_path / "data", "delay": 0.0, **overrides})


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[LiveServer, Counting]]:
    counting = Counting(create_app(_settings(tmp_path, delay=0.6)))
    with serve_app(counting, tmp_path / "data") as live:
        yield live, counting


def test_notify_learns_of_the_tasks_end_from_events(
    counted: tuple[LiveServer, Counting],
) -> None:
    live, counting = counted
    result = invoke("notify", "a@example.com", "--q", "hi", "--json", "--url", live.url)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert [t["status"] for t in doc["server"]["tasks"]] == ["done", "done"]
    assert counting.gets("/events") == 1
    # 1.2 s of tasks: polled every 50 ms that is ~24 reads; on events, one after the
    # stream opened and one per burst of the request's events.
    assert counting.gets("/requests/") <= 8, counting.seen


def test_notify_polls_a_server_without_events(tmp_path: Path) -> None:
    older = create_app(_settings(tmp_path, delay=0.2))
    older.router.routes = [r for r in older.router.routes if getattr(r, "path", "") != "/events"]
    counting = Counting(older)
    with serve_app(counting, tmp_path / "data") as live:
        result = invoke("notify", "a@example.com", "--json", "--url", live.url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["server"]["tasks"][0]["status"] == "done"
    assert counting.gets("/events") == 1
    assert counting.gets("/requests/") > 2  # it polled


class Following:
    """`bgtasks COMMAND --json ...` in a subprocess, following until Ctrl-C; `lines` fills as
    it prints."""

    def __init__(self, command: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bgtasks_cli", command, "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **ENV},
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def stop(self) -> str:
        """Ctrl-C; what it wrote on stderr."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=15)
        self._reader.join(timeout=5)
        assert self.proc.returncode == 0, err
        return err


class Opened(Counting):
    """Counting, and `streaming` set once a /events response's headers were sent."""

    def __init__(self, inner: FastAPI) -> None:
        super().__init__(inner)
        self.streaming = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def sent(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.start" and scope.get("path") == "/events":
                self.streaming.set()

        await super().__call__(scope, receive, sent)


def test_tail_events_shows_a_notifys_events_in_order(tmp_path: Path) -> None:
    opened = Opened(create_app(_settings(tmp_path, delay=0.1)))
    with serve_app(opened, tmp_path / "data") as live:
        tail = Following(
            "tail", "--events", "-n", "0", "--data-dir", str(tmp_path / "data"), "--url", live.url
        )
        try:
            assert opened.streaming.wait(30), "tail never opened the event stream"
            with Client(live.url) as client:
                outcome = client.run("/send-notification/a@b.c", {"q": "x"}, wait=True, timeout=10)
            assert outcome.ok
            rid = outcome.fired.request_id
            wait_until(lambda: any(e["text"] == "message to a@b.c" for e in tail.lines))
            wait_until(lambda: sum(" done" in e["text"] for e in tail.lines) == 2)
        finally:
            err = tail.stop()
    assert err == ""
    events = [e for e in tail.lines if e["source"] == "events"]
    assert {e["request_id"] for e in events} == {rid}
    assert set(events[0]) == {"at", "backlog", "source", "kind", "text", "request_id", "task_id"}
    texts = [e["text"].split(" (req")[0] for e in events]
    first, second = (t["id"] for t in outcome.tasks)
    assert texts == [
        "request received POST /send-notification/a@b.c",
        f"task {first} queued -> log.txt",
        f"task {second} queued -> log.txt",
        "response sent 200 POST /send-notification/a@b.c",
        f"task {first} started (attempt 1) -> log.txt",
        f"task {first} done -> log.txt",
        f"task {second} started (attempt 1) -> log.txt",
        f"task {second} done -> log.txt",
    ]
    # File lines come in the order the follower saw them: each after its task started.
    order = [e["text"] for e in tail.lines if e["kind"] in ("line", "event")]
    assert order.index(f"task {first} started (attempt 1) -> log.txt") < order.index(
        "found query: x"
    )
    assert order.index(f"task {second} started (attempt 1) -> log.txt") < order.index(
        "message to a@b.c"
    )


def test_tail_events_with_the_server_down_follows_the_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    tail = Following("tail", "--events", "-n", "0", "--data-dir", str(data), "--url", url)
    try:
        deadline = time.monotonic() + 30
        # Until the follower runs, a line written now could count as backlog: write until
        # one shows.
        while not tail.lines and time.monotonic() < deadline:
            with (data / "log.txt").open("a") as log:
                log.write("hello\n")
            time.sleep(0.2)
        assert tail.lines and tail.lines[0]["text"] == "hello"
        assert tail.lines[0]["source"] == "log.txt"
    finally:
        err = tail.stop()
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: the server's events are unavailable at {url} ([Errno 111] Connection refused);"
        " following the files only"
    ], err
    assert "start it with `bgtasks serve`" in err


def test_tasks_watch_re_reads_on_events(tmp_path: Path) -> None:
    opened = Opened(create_app(_settings(tmp_path, delay=0.3)))
    with serve_app(opened, tmp_path / "data") as live:
        # A minute between safety reads: only an event can make it read again in time.
        watch = Following("tasks", "--watch", "--interval", "60", "--url", live.url)
        try:
            assert opened.streaming.wait(30), "tasks --watch never opened the event stream"
            reads = opened.gets("/tasks")
            with Client(live.url) as client:
                outcome = client.run("/send-notification/a@b.c", None, wait=True, timeout=10)
            task = outcome.tasks[0]["id"]
            wait_until(lambda: any(r["id"] == task and r["status"] == "done" for r in watch.lines))
        finally:
            watch.stop()
    statuses = [r["status"] for r in watch.lines if r["id"] == task]
    assert statuses[-1] == "done" and "running" in statuses
    # A read per burst of events (throttled), not one per event or per tick.
    assert 2 <= opened.gets("/tasks") - reads <= 6, opened.seen
