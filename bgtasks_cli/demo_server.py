"""A throwaway `bgtasks serve` for the demos, in a subprocess on a free loopback port."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from bgtasks_cli.errors import ServeError


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C off until the block is done, then raise it: what the block starts (a
    process, a directory) is recorded before the interrupt can unwind past it, and clean-up
    is never cut short. Only the main thread gets signals: elsewhere, nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt
    elif caught and previous == signal.SIG_DFL:
        raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoServer:
    """`bgtasks serve` in a subprocess on a free loopback port, with its data directory and
    log in one temporary directory; stopped and removed on exit, or on Ctrl-C at any point.
    `options` are more of `serve`'s options (the fail demo's retry settings)."""

    def __init__(
        self, *, delay: float, options: Sequence[str] = (), startup_timeout: float = 30.0
    ) -> None:
        self.delay = delay
        self.options = tuple(options)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        assert self._root is not None, "the demo server is not started"
        return self._root / "data"

    @property
    def _log_path(self) -> Path:
        assert self._root is not None, "the demo server is not started"
        return self._root / "server.log"

    def __enter__(self) -> DemoServer:
        self.start()
        return self

    def start(self) -> None:
        """Start the server and wait until it answers; on any failure (Ctrl-C included)
        everything started so far is stopped and removed."""
        try:
            with interrupts_deferred():
                self._root = Path(tempfile.mkdtemp(prefix="bgtasks-demo-"))
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
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
            *self.options,
        ]
        with self._log_path.open("wb") as log, interrupts_deferred():
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise ServeError(
                    f"the demo server exited at start-up: {self.failure()}",
                    "`bgtasks serve` with the same environment shows the whole story",
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServeError("the demo server did not start in time", self.failure())
            time.sleep(0.05)

    def failure(self) -> str:
        """Why the server failed, from its log: its `Error:` line, else its last line."""
        try:
            lines = self._log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(its log is gone)"
        errors = [line for line in lines if line.startswith("Error: ")]
        if errors:
            return errors[-1].removeprefix("Error: ")
        return lines[-1].strip() if lines else "(it printed nothing)"

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server and remove its directory; safe to call again, or before `start`."""
        with interrupts_deferred():
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
