"""The CLI on the server's event stream (`GET /events`): notify follows its request on events,
falls back to polling on a server without them; against real uvicorn servers in a thread."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from typer.testing import CliRunner, Result

from bgtasks_cli.cli import app
from server.app import create_app
from server.config import Settings
from tests.helpers import LiveServer, serve_app

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
