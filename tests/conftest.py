"""Fixtures: an isolated environment for every test, and live servers stopped after it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.config import Settings
from tests.helpers import LiveServer, ServerProcess, serve_in_thread, spawn_server
from tests.postgres import fresh_database


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and every subprocess it starts) gets its own state directory and no
    inherited server settings, so nothing touches the user's real ~/.local/state/bgtasks."""
    state_dir = tmp_path / "state"
    monkeypatch.setenv("BGTASKS_STATE_DIR", str(state_dir))
    for name in (
        "BGTASKS_URL",
        "BGTASKS_DATA_DIR",
        "BGTASKS_DELAY",
        "BGTASKS_DATABASE_URL",
        "FORCE_COLOR",
    ):
        monkeypatch.delenv(name, raising=False)
    return state_dir


@pytest.fixture(params=["sqlite"])
def store(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The registry's database URL for the test's servers: None for SQLite (the default), or
    a fresh PostgreSQL database. A module runs its tests on both stores with
    `pytestmark = pytest.mark.parametrize("store", STORES, indirect=True)`."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_database() as url:
        yield url


@pytest.fixture
def start_server(tmp_path: Path, store: str | None) -> Iterator[Callable[..., LiveServer]]:
    """Start in-thread servers with the given settings; all are stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> LiveServer:
            overrides.setdefault("data_dir", tmp_path / "data")
            overrides.setdefault("delay", 0.0)
            overrides.setdefault("database_url", store)
            return stack.enter_context(serve_in_thread(Settings(**overrides)))

        yield start


@pytest.fixture
def server_process(tmp_path: Path, store: str | None) -> Iterator[Callable[..., ServerProcess]]:
    """Start `bgtasks serve` subprocesses; any still running after the test are killed."""
    started: list[ServerProcess] = []

    def start(**kwargs: Any) -> ServerProcess:
        kwargs.setdefault("data_dir", tmp_path / "data")
        if store is not None:
            kwargs["env"] = {"BGTASKS_DATABASE_URL": store, **kwargs.get("env", {})}
        data_dir = kwargs.pop("data_dir")
        proc = spawn_server(data_dir, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.proc.pid, signal.SIGKILL)  # workers too, even if the parent is gone
        proc.proc.wait(timeout=10)
