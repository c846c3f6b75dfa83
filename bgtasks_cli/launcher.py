"""Starting servers: `serve` in this process with uvicorn, and a throwaway one for `demo`."""

from __future__ import annotations

import copy
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bgtasks_cli.errors import ServeError
from bgtasks_cli.state import ServerState, clear_state, write_state
from server.paths import owners_dir

APP_FACTORY = "server.app:create_app"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    return f"http://{shown}:{port}"


def check_port(host: str, port: int) -> None:
    """Fail with a clear error if `host:port` cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                "is another server running there? pick another port with --port",
            ) from None


def check_data_dir(data_dir: Path) -> None:
    """Create the data directory if needed and prove it is writable."""
    try:
        # The registry and the owner locks live under .bgtasks/: prove that works too.
        owners_dir(data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=owners_dir(data_dir), prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ServeError(
            f"data directory {data_dir} is not writable: {exc.strerror or exc}",
            "choose another with --data-dir or BGTASKS_DATA_DIR",
        ) from None


def log_config() -> dict[str, Any]:
    """uvicorn's logging, plus the service's own `bgtasks` logger on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["bgtasks"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def serve(
    *,
    host: str,
    port: int,
    workers: int,
    data_dir: Path,
    delay: float,
    drain_timeout: int | None,
    access_log: bool,
    record_state: bool,
) -> None:
    """Run the service under uvicorn until it is stopped. Blocks."""
    check_data_dir(data_dir)
    check_port(host, port)
    import uvicorn

    # Workers are separate processes that build the app from the environment.
    os.environ["BGTASKS_DATA_DIR"] = str(data_dir)
    os.environ["BGTASKS_DELAY"] = repr(delay)
    if drain_timeout is not None:
        os.environ["BGTASKS_DRAIN_TIMEOUT"] = str(drain_timeout)
    pid = os.getpid()
    if record_state:
        write_state(ServerState(url=url_for(host, port), pid=pid, data_dir=str(data_dir)))
    # After a graceful stop on SIGTERM, uvicorn re-raises the signal under the handler that was
    # in place before it ran; with the default one the process would die before `finally` and
    # leave the state file behind. Turn it into an exception, clean up, then die of it.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    terminated = False
    try:
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            timeout_graceful_shutdown=drain_timeout,
            log_config=log_config(),
            access_log=access_log,
        )
    except _Terminated:
        terminated = True
    except SystemExit as exc:
        # uvicorn exits 3 when the app could not start; its log above says why.
        if exc.code not in (0, None):
            raise ServeError(
                "the server could not start (see the log above)",
                "check the data directory and its .bgtasks/registry.db",
            ) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if record_state:
            clear_state(pid)
    if terminated:
        signal.raise_signal(signal.SIGTERM)


class _Terminated(BaseException):
    """SIGTERM outside uvicorn's own handling (see `serve`)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoServer:
    """`bgtasks serve` in a subprocess on a free loopback port with a temporary data
    directory; stopped and removed on exit."""

    def __init__(self, *, delay: float, startup_timeout: float = 30.0) -> None:
        self.delay = delay
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="bgtasks-demo-"))
        self._log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DemoServer:
        import httpx

        cmd = [
            sys.executable,
            "-m",
            "bgtasks_cli",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--delay",
            repr(self.delay),
            "--no-state-file",
            "--no-access-log",
        ]
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                self._cleanup()
                raise ServeError(f"the demo server exited at start-up: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self._cleanup()
                raise ServeError("the demo server did not start in time", self.log_tail())
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            lines = self._log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._log_path.unlink(missing_ok=True)
