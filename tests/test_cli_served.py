"""`bgtasks serve` tunes the garbage collector of the processes that serve (issue #14): once
start-up is done, every worker's GC is frozen and its threshold raised, while an app built by
`create_app()` alone leaves the GC as it found it."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from bgtasks_cli import launcher, served
from tests.helpers import LiveServer, ServerProcess

ROOT = Path(__file__).resolve().parents[1]
WRAPPED = "BGTASKS_TEST_WRAPPED_FACTORY"
# The console script's `main()`, with one change: uvicorn is handed the probe below, which
# builds the app with the factory `bgtasks serve` would have used (or the one the test names)
# and adds a route that reads the GC from inside the worker that answers.
DRIVER = (
    "import os\n"
    "from bgtasks_cli import launcher\n"
    f"os.environ.setdefault({WRAPPED!r}, launcher.APP_FACTORY)\n"
    "launcher.APP_FACTORY = 'tests.test_cli_served:create_probe_app'\n"
    "from bgtasks_cli.cli import main\n"
    "main()\n"
)


def create_probe_app() -> FastAPI:
    """The app of the wrapped factory, plus `GET /debug/gc`: the answering worker's GC."""
    from uvicorn.importer import import_from_string

    app: FastAPI = import_from_string(os.environ[WRAPPED])()

    async def gc_state() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "frozen": gc.get_freeze_count(),
            "threshold": list(gc.get_threshold()),
        }

    app.add_api_route("/debug/gc", gc_state, methods=["GET"])
    return app


def gc_states(url: str, workers: int) -> dict[int, dict[str, Any]]:
    """Each worker's GC state, by pid: asked on fresh connections until every worker answered
    (at most 400 requests and 30 s)."""
    states: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    for _ in range(400):
        if len(states) == workers or time.monotonic() > deadline:
            break
        state = httpx.get(f"{url}/debug/gc", timeout=5).json()
        states[state["pid"]] = state
    return states


def default_threshold() -> list[int]:
    """The threshold of a fresh interpreter (it differs between Python versions)."""
    code = "import gc, json; print(json.dumps(gc.get_threshold()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    threshold: list[int] = json.loads(done.stdout)
    return threshold


def test_serve_uses_the_served_factory() -> None:
    assert launcher.APP_FACTORY == "bgtasks_cli.served:create_served_app"


@pytest.mark.parametrize("workers", [1, 2])
def test_every_worker_of_bgtasks_serve_has_its_gc_frozen_and_its_threshold_set(
    workers: int, server_process: Callable[..., ServerProcess]
) -> None:
    server = server_process(args=("--workers", str(workers)), entry=("-c", DRIVER))
    states = gc_states(server.url, workers)
    assert len(states) == workers, states
    for state in states.values():
        assert state["frozen"] > 0, state
        assert state["threshold"] == list(served.GC_THRESHOLD), state


def test_a_served_create_app_alone_leaves_the_gc_alone(
    server_process: Callable[..., ServerProcess],
) -> None:
    # The same process and probe, with the plain app factory in place of serve's.
    server = server_process(entry=("-c", DRIVER), env={WRAPPED: "server.app:create_app"})
    (state,) = gc_states(server.url, 1).values()
    assert state["frozen"] == 0
    assert state["threshold"] == default_threshold()


def test_an_app_from_create_app_leaves_the_test_process_gc_alone(
    start_server: Callable[..., LiveServer],
) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    gc.set_threshold(777, 11, 12)  # a threshold nothing else sets
    try:
        live = start_server()
        assert httpx.post(f"{live.url}/send-notification/a@example.com").status_code == 200
        assert (gc.get_freeze_count(), gc.get_threshold()) == (0, (777, 11, 12))
    finally:
        gc.set_threshold(*before)


def test_the_tuning_comes_after_start_up_and_is_undone_after_shutdown() -> None:
    seen: dict[str, tuple[int, tuple[int, int, int]]] = {}

    def now() -> tuple[int, tuple[int, int, int]]:
        return gc.get_freeze_count(), gc.get_threshold()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen["start-up"] = now()
        yield
        seen["shutdown"] = now()

    gc.unfreeze()
    untuned = now()
    app = served.tune_gc_after_startup(FastAPI(lifespan=lifespan))

    async def run() -> None:
        async with app.router.lifespan_context(app):
            seen["serving"] = now()

    try:
        asyncio.run(run())
        seen["after"] = now()
    finally:
        gc.unfreeze()
        gc.set_threshold(*untuned[1])
    assert seen["start-up"] == untuned
    frozen, threshold = seen["serving"]
    assert frozen > 0 and threshold == served.GC_THRESHOLD
    # The app's own shutdown (the tasks' drain) still runs tuned; after it, all is undone.
    assert seen["shutdown"][1] == served.GC_THRESHOLD
    assert seen["after"] == untuned


def test_the_benchmark_serves_bgtasks_with_serve_s_factory(tmp_path: Path) -> None:
    """benchmarks/same_shape_app.py (what bench.py serves as bgtasks) tunes the GC as
    `bgtasks serve` does, so the benchmark measures what users run."""
    code = (
        "import asyncio, gc, json, sys\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "from same_shape_app import create_bench_app\n"
        "app = create_bench_app()\n"
        "async def main():\n"
        "    async with app.router.lifespan_context(app):\n"
        "        print(json.dumps([gc.get_freeze_count(), gc.get_threshold()]))\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "BGTASKS_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stderr
    frozen, threshold = json.loads(done.stdout)
    assert frozen > 0 and tuple(threshold) == served.GC_THRESHOLD
