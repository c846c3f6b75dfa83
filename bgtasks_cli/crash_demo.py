"""`bgtasks demo --crash`: what a `kill -9` does to work a server has acknowledged.

FastAPI's tutorial code (`server/tutorial_app.py`: plain `BackgroundTasks`, a sync
`write_log`) and a bgtasks server run side by side, each on a free loopback port with its own
temporary data directory and the same delay before each write. Both get the same
notifications; once every response has arrived, and before the delays run out, both are killed
with SIGKILL, started again on their data directories, and bgtasks is given time to finish what
it acknowledged. Then each `log.txt` is held against the lines each server acknowledged.

Everything the demo starts or writes (both servers' process groups, the temporary directory
with the data and the servers' logs) is removed at the end, on failure and on Ctrl-C. Only the
HTTP API and the files are relied on, not how bgtasks recovers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from bgtasks_cli.client import Client
from bgtasks_cli.demo_server import free_port, interrupts_deferred
from bgtasks_cli.errors import BgtasksError, InvalidInput, ServeError, ServerUnreachable
from server.status import ENDED, TaskStatus

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

SIDES = ("plain", "bgtasks")
LABELS = {"plain": "the tutorial app", "bgtasks": "bgtasks"}
MIN_DELAY, MAX_DELAY = 0.2, 10.0
MAX_NOTIFICATIONS = 100
STARTUP_TIMEOUT = 30.0
FINISH_TIMEOUT = 30.0
"""Seconds bgtasks gets to end its tasks after it answers again (plus the delays' sum)."""
POLL = 0.05


@dataclass(frozen=True, slots=True)
class Side:
    """One server's lines: acknowledged (a 200 was sent for them), and what `log.txt` held."""

    acknowledged: int
    written: int  # acknowledged lines in the log at the end
    lost: int  # acknowledged lines not in it
    duplicated: int  # acknowledged lines in it more than once
    written_before_kill: int
    missing: tuple[str, ...]
    recovered: int | None = None  # bgtasks' tasks marked recovered


@dataclass(frozen=True, slots=True)
class CrashReport:
    delay: float
    notifications: int
    killed_after: float  # seconds from the first response to the kill
    plain: Side
    bgtasks: Side
    pids: tuple[int, ...]  # every server process the demo started (all gone now)

    @property
    def ok(self) -> bool:
        """bgtasks kept its word: every acknowledged line written, none twice."""
        return self.bgtasks.lost == 0 and self.bgtasks.duplicated == 0


def _answers(url: str) -> bool:
    # Imported here, after bgtasks_cli.client, which keeps httpx from loading its own CLI.
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _log_lines(path: Path) -> Counter[str]:
    """How many times each line is in the file (a line cut short counts as itself)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Counter()
    return Counter(data.decode("utf-8", errors="replace").splitlines(keepends=True))


class _Demo:
    """The temporary directory and the servers started in it; all removed on exit."""

    def __init__(self, delay: float, say: Callable[[str], None]) -> None:
        self.delay, self.say = delay, say
        self.root: Path | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        self.pids: list[int] = []

    def __enter__(self) -> _Demo:
        with interrupts_deferred():
            self.root = Path(tempfile.mkdtemp(prefix="bgtasks-crash-demo-"))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with interrupts_deferred():
            for side in list(self.procs):
                self.kill(side)
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)

    def data_dir(self, side: str) -> Path:
        assert self.root is not None
        return self.root / side

    def log_path(self, side: str) -> Path:
        return self.data_dir(side).with_suffix(".log")

    def start(self, side: str) -> None:
        """Start one server (again) on its data directory, on a free port; wait until it
        answers."""
        assert self.root is not None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        data_dir = self.data_dir(side)
        data_dir.mkdir(exist_ok=True)
        if side == "plain":
            argv = ["-m", "uvicorn", "--factory", "server.tutorial_app:app_from_env"]
            argv += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
            ready = f"{url}/openapi.json"
        else:
            argv = ["-m", "bgtasks_cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
            argv += ["--delay", repr(self.delay), "--no-state-file", "--no-access-log"]
            ready = f"{url}/health"
        env = {**os.environ, "BGTASKS_DATA_DIR": str(data_dir), "BGTASKS_DELAY": repr(self.delay)}
        again = " again" if side in self.urls else ""
        with interrupts_deferred(), self.log_path(side).open("ab") as log:
            # Its own session, so that kill -9 of its group takes any worker with it; run in
            # the empty temporary directory, so that nothing there shadows the packages.
            self.procs[side] = proc = subprocess.Popen(
                [sys.executable, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
                start_new_session=True,
            )
            self.pids.append(proc.pid)
            self.urls[side] = url
            self.say(f"started {LABELS[side]}{again}: pid {proc.pid} on {url}")
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServeError(
                    f"{LABELS[side]} did not start for the crash demo: {self.last_log_line(side)}",
                    "try again; if it persists, run `bgtasks serve` to see why",
                )
            time.sleep(POLL)

    def last_log_line(self, side: str) -> str:
        lines = self.log_path(side).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def kill(self, side: str) -> None:
        """SIGKILL to the server's process group, and wait until it is gone."""
        proc = self.procs.pop(side)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # nothing more can be done
            proc.wait(timeout=10)

    def client(self, side: str) -> Client:
        return Client(self.urls[side], timeout=10)


def _side(acked: list[str], before: Counter[str], after: Counter[str]) -> Side:
    return Side(
        acknowledged=len(acked),
        written=sum(1 for line in acked if after[line]),
        lost=sum(1 for line in acked if not after[line]),
        duplicated=sum(1 for line in acked if after[line] > 1),
        written_before_kill=sum(1 for line in acked if before[line]),
        missing=tuple(line for line in acked if not after[line]),
    )


def _wait_for_bgtasks(demo: _Demo, request_ids: list[str], timeout: float) -> list[Any]:
    """Every acknowledged request's tasks, once all have ended; BgtasksError after `timeout`."""
    deadline = time.monotonic() + timeout
    with demo.client("bgtasks") as client:
        while True:
            tasks: list[Any] = []
            for request_id in request_ids:
                with contextlib.suppress(BgtasksError):  # not readable yet
                    record = client.request_record(request_id)
                    tasks += record["tasks"] if record else []
            ended = [t for t in tasks if t["status"] in ENDED]
            if len(ended) == len(tasks) == 2 * len(request_ids):
                return tasks
            if time.monotonic() > deadline:
                raise BgtasksError(
                    f"bgtasks ended {len(ended)} of its {2 * len(request_ids)} acknowledged tasks"
                    f" in the {timeout:.0f} s after it started again",
                    f"its log said: {demo.last_log_line('bgtasks')}",
                )
            time.sleep(POLL)


def _send(demo: _Demo, notifications: int) -> tuple[dict[str, list[str]], list[str], float]:
    """The same notifications to both servers: the lines each acknowledged, bgtasks' request
    ids, and when the first response arrived (monotonic)."""
    acked: dict[str, list[str]] = {side: [] for side in SIDES}
    request_ids: list[str] = []
    first_response: float | None = None
    for side in SIDES:
        # The tutorial's app answers like any FastAPI app, not like bgtasks: a plain POST.
        client = demo.client(side) if side == "bgtasks" else None
        with client or contextlib.nullcontext(), httpx.Client(timeout=10) as plain:
            for n in range(1, notifications + 1):
                email, q = f"user{n}@example.com", f"note {n}"
                path = f"/send-notification/{email}"
                try:
                    if client is not None:
                        request_ids.append(client.fire(path, {"q": q}).request_id)
                    else:
                        plain.post(f"{demo.urls[side]}{path}", params={"q": q}).raise_for_status()
                except (ServerUnreachable, httpx.HTTPError):
                    raise BgtasksError(
                        f"{LABELS[side]} stopped answering: {demo.last_log_line(side)}"
                    ) from None
                if first_response is None:
                    first_response = time.monotonic()
                acked[side] += [f"found query: {q}\n", f"message to {email}\n"]
    assert first_response is not None  # at least one notification was sent
    return acked, request_ids, first_response


def run(delay: float = 1.0, notifications: int = 5, console: Console | None = None) -> CrashReport:
    """Run the crash demo; progress goes to `console` (none if None). Cleans up everything,
    also on failure and Ctrl-C. Raises InvalidInput for a bad argument, ServeError if a server
    does not start, BgtasksError if bgtasks does not end its tasks in time."""
    if not MIN_DELAY <= delay <= MAX_DELAY:
        raise InvalidInput(
            f"the crash demo needs a delay from {MIN_DELAY:g} to {MAX_DELAY:g} s, not {delay:g}",
            "the kill must come while the tasks still wait: try --delay 1",
        )
    if not 1 <= notifications <= MAX_NOTIFICATIONS:
        raise InvalidInput(f"notifications must be 1 to {MAX_NOTIFICATIONS}, not {notifications}")

    def say(message: str) -> None:
        if console is not None:
            from rich.text import Text

            console.print(Text(message))

    say(f"FastAPI's tutorial code beside bgtasks, {delay:g} s before each write")
    with _Demo(delay, say) as demo:
        for side in SIDES:
            demo.start(side)
        acked, request_ids, first_response = _send(demo, notifications)
        lines = 2 * notifications
        say(f"both acknowledged the same {notifications} notifications: {lines} lines each")
        killed_after = time.monotonic() - first_response
        for side in SIDES:
            demo.kill(side)
        when = "within" if killed_after < delay else "late: past"
        say(f"kill -9 both, {killed_after:.2f} s after the first response ({when} the delay)")
        before = {side: _log_lines(demo.data_dir(side) / "log.txt") for side in SIDES}
        for side in SIDES:
            demo.start(side)
        timeout = FINISH_TIMEOUT + delay * lines
        tasks = _wait_for_bgtasks(demo, request_ids, timeout)
        after = {side: _log_lines(demo.data_dir(side) / "log.txt") for side in SIDES}
        plain, bgtasks = (_side(acked[side], before[side], after[side]) for side in SIDES)
        recovered = sum(1 for t in tasks if t["status"] == TaskStatus.RECOVERED)
        say(f"bgtasks ended all {len(tasks)} of its tasks after it started again")
        report = CrashReport(
            delay=delay,
            notifications=notifications,
            killed_after=killed_after,
            plain=plain,
            bgtasks=replace(bgtasks, recovered=recovered),
            pids=tuple(demo.pids),
        )
    return report


def report_json(report: CrashReport) -> dict[str, Any]:
    """`demo --crash --json`: the counts of each side, with bgtasks' recovered tasks."""
    keys = ("acknowledged", "written", "lost", "duplicated")
    plain = {key: getattr(report.plain, key) for key in keys}
    bgtasks = {key: getattr(report.bgtasks, key) for key in keys}
    return {"plain": plain, "bgtasks": {**bgtasks, "recovered": report.bgtasks.recovered}}


def render(report: CrashReport) -> RenderableType:
    """The two sides in one table, the missing lines listed, and what it shows."""
    from rich.console import Group
    from rich.table import Table

    table = Table(
        title=f"log.txt after kill -9, {report.killed_after:.2f} s after the first response,"
        " and a restart",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("FastAPI tutorial\n(plain BackgroundTasks)", overflow="fold")
    table.add_column("bgtasks", overflow="fold")
    plain, bgtasks = report.plain, report.bgtasks
    for label, name in (
        ("lines acknowledged (200)", "acknowledged"),
        ("written before the kill", "written_before_kill"),
        ("there after the restart", "written"),
        ("lost", "lost"),
        ("duplicated", "duplicated"),
    ):
        table.add_row(label, str(getattr(plain, name)), str(getattr(bgtasks, name)))
    table.add_row("marked recovered", "-", str(bgtasks.recovered))
    table.add_row(
        "missing", _listed(plain.missing), _listed(bgtasks.missing), style="dim", end_section=True
    )
    return Group(table, *_verdict(report))


def _listed(lines: tuple[str, ...]) -> str:
    return "\n".join(repr(line) for line in lines) if lines else "none"


def _verdict(report: CrashReport) -> list[Any]:
    from rich.text import Text

    plain, bgtasks = report.plain, report.bgtasks
    said = []
    if plain.lost:
        said.append(
            Text(
                f"✗ plain BackgroundTasks lost {plain.lost} of {plain.acknowledged} acknowledged"
                " lines: the client got 200 for work that never happened",
                style="bold red",
            )
        )
    if bgtasks.lost or bgtasks.duplicated:
        said.append(
            Text(
                f"✗ bgtasks lost {bgtasks.lost} and duplicated {bgtasks.duplicated} of"
                f" {bgtasks.acknowledged} acknowledged lines",
                style="bold red",
            )
        )
    else:
        said.append(
            Text(
                f"✓ bgtasks lost none and wrote each once ({bgtasks.recovered} finished after"
                " the restart, marked recovered)",
                style="bold green",
            )
        )
    return said
