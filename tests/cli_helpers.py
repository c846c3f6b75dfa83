"""Helpers shared by the CLI's tests: `python -m bgtasks_cli ...` in subprocesses and the
lines they print, the CLI in-process (typer's CliRunner), fixed records for the renderers, a
plain HTTP server that is not bgtasks, and a fixed crash-demo report."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, ClassVar

import pytest
from typer.testing import CliRunner, Result

from bgtasks_cli import crash_demo
from bgtasks_cli.cli import app
from bgtasks_cli.client import Fired, Outcome
from server.status import TaskStatus
from tests.helpers import LiveServer

# --- the CLI in subprocesses -----------------------------------------------------------------

WAIT = 15.0
RUN_TIMEOUT = 60.0
HAS_PROC = Path("/proc/self/fd").is_dir()
RED_ERROR = "\x1b[1;31mError:\x1b[0m"


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "120", **extra}


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run `python -m bgtasks_cli ARGS` to completion (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "bgtasks_cli", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def cli_popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bgtasks_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env or cli_env(),
    )


def assert_one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "Error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


class Lines:
    """Reads a stream's lines in a thread so the test can wait for them with a bound; closes
    the stream at its end (nothing else may read or close it meanwhile)."""

    reading: ClassVar[weakref.WeakSet[IO[str]]] = weakref.WeakSet()
    """The streams some Lines reads (and will close): popen_cleanup closes the others."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        Lines.reading.add(stream)
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._queue.put(line)
        self._queue.put(None)

    def until(self, match: Callable[[str], bool], timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no matching line within {timeout} s; saw {self.seen}"
                ) from None
            if line is None:
                raise AssertionError(f"stream ended without a matching line; saw {self.seen}")
            self.seen.append(line)
            if match(line):
                return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Everything until the stream ends."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not end"
        while (line := self._queue.get_nowait()) is not None:
            self.seen.append(line)
        return self.seen


@pytest.fixture
def popen_cleanup() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started by a test; any still running afterwards are killed, and their pipes
    that no Lines reads are closed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None and pipe not in Lines.reading:
                pipe.close()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(
                (line for line in (entry / "status").read_text().splitlines() if "State:" in line),
                "",
            )
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found.append(cmdline)
    return found


# Start-up time is mostly imports: the client commands must not load the server's stack
# (fastapi, uvicorn), pydantic (Typer >= 0.29 converts options through it unless the CLI hands
# it plain converters, bgtasks_cli/coercion.py) or click and pygments (Typer < 0.26 imports
# click; httpx imports its own command line when click is installed).
HEAVY = ["fastapi", "uvicorn", "pydantic", "click", "pygments"]


def heavy_modules_loaded(args: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run the command in a fresh interpreter; its exit code and the heavy modules it loaded."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bgtasks_cli.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        f"print(result.exit_code, *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    exit_code, *loaded = result.stdout.split()
    return int(exit_code), loaded


# --- the CLI in-process ----------------------------------------------------------------------

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env={**ENV, **(env or {})})


def fire_json(live: LiveServer, *args: str) -> dict[str, Any]:
    result = invoke(*args, "--json", "--url", live.url)
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def picture_row(out: str, label: str) -> str:
    """The line of the timeline picture for the row labelled `label`."""
    return next(line for line in out.splitlines() if line.startswith(label + " "))


# --- fixed records for the renderers ---------------------------------------------------------

T0 = 1_790_000_000.0  # a fixed moment; every stamp below is T0 plus milliseconds
# Request ids as the server makes them: 16 hex digits of time_ns, then 16 random ones.
SAME_TIME = "18ed3dec9a1b2c3d"
IDS = [SAME_TIME + end for end in ("4cddc3acb6faf602", "0b4f1e2d3c4b5a69", "77e3a1c0de5f4a21")]


def at(ms: float) -> float:
    return T0 + ms / 1000


def task(seq: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"a1b2c3d4-{seq + 1}",
        "request_id": IDS[0],
        "seq": seq,
        "file": "log.txt",
        "line": f"line {seq + 1}\n",
        "status": TaskStatus.DONE.value,
        "queued_at": at(2),
        "started_at": None,
        "finished_at": None,
        "last_error": None,
    }
    return {**base, **fields}


def outcome(
    *, sent: float, received: float, record: dict[str, Any], request_id: str = IDS[0]
) -> Outcome:
    fired = Fired(
        method="POST",
        path="/send-notification/a@example.com",
        url="http://127.0.0.1:8000/send-notification/a@example.com",
        status=200,
        body={"message": "Message sent"},
        request_id=request_id,
        client_sent_at=sent,
        client_received_at=received,
    )
    return Outcome(fired, {"id": request_id, **record})


# --- a server that is not bgtasks ------------------------------------------------------------

REQUEST_ID = "18ed3dec9a1b2c3d4cddc3acb6faf602"


@contextmanager
def http_server(handler: Callable[..., BaseHTTPRequestHandler]) -> Iterator[str]:
    """A plain HTTP server on a free loopback port, in a thread; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class Canned(BaseHTTPRequestHandler):
    """Answers every request with one fixed response; subclasses say which."""

    status = 200
    content_type = "text/html"
    body = b"<!DOCTYPE html>\n<html>\n<body>\n<h1>Welcome</h1>\n</body>\n</html>\n"
    request_id: str | None = None

    def answer(self, status: int, content_type: str, body: bytes, tagged: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if tagged:
            self.send_header("X-Request-ID", REQUEST_ID)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.answer(self.status, self.content_type, self.body, self.request_id is not None)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


# --- the crash demo's report -----------------------------------------------------------------


def fixed_report() -> crash_demo.CrashReport:
    lines = ["found query: note 1\n", "message to user1@example.com\n"]
    return crash_demo.CrashReport(
        delay=1.0,
        notifications=1,
        killed_after=0.0412,
        plain=crash_demo.Side(2, 0, 2, 0, 0, tuple(lines)),
        bgtasks=crash_demo.Side(2, 2, 0, 0, 0, (), recovered=2),
        pids=(11, 12, 13, 14),
    )


def run_to_the_end(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """A demo's stdout and stderr once it exits (killed after `timeout` seconds)."""
    with proc:  # its pipes closed, and waited for
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
    return out, err
