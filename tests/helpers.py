"""Helpers shared by the tests: real uvicorn servers on free loopback ports (TestClient waits
for background tasks, so it cannot show that a response came first), and polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.config import Settings

T = TypeVar("T")


@dataclass
class LiveServer:
    url: str
    data_dir: Path
    app: FastAPI

    def read(self, name: str) -> bytes:
        path = self.data_dir / name
        return path.read_bytes() if path.exists() else b""


@contextmanager
def serve_in_thread(settings: Settings) -> Iterator[LiveServer]:
    """Run the app under a real uvicorn server in a thread, on a free loopback port."""
    with serve_app(create_app(settings), settings.data_dir) as live:
        yield live


@contextmanager
def serve_app(app: Any, data_dir: Path) -> Iterator[LiveServer]:
    """Run `app` (an ASGI app; `.app` of the result) under uvicorn in a thread, on a free
    loopback port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))

    def run() -> None:
        # uvicorn exits (SystemExit) when the app cannot start: the thread ends, seen below.
        with contextlib.suppress(SystemExit):
            server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", data_dir, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def spawn_server(
    data_dir: Path,
    *,
    delay: float = 0.0,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    entry: tuple[str, ...] = ("-m", "bgtasks_cli"),
) -> ServerProcess:
    """Start `bgtasks serve` in a subprocess on a free port and wait for /health; `entry` is
    how Python is told to run the CLI."""
    port = free_port()
    log_path = data_dir.parent / f"server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state_dir = data_dir.parent / "state"
    full_env = {**os.environ, "NO_COLOR": "1", "BGTASKS_STATE_DIR": str(state_dir), **(env or {})}
    cmd = [
        sys.executable,
        *entry,
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--delay",
        str(delay),
        *args,
    ]
    with log_path.open("w") as log:
        # Its own session, so teardown can stop uvicorn's worker processes with it.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {log_path.read_text()}")
        time.sleep(0.05)
    return ServerProcess(proc, url, data_dir, log_path)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the event loop run until `predicate` holds; fail the test after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.001)


def wait_until(predicate: Callable[[], T | None], timeout: float = 10.0, step: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail the test
    after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)
