"""The crash demo end to end through the console script (`bgtasks demo --crash`): real
servers, a real `kill -9`, a restart; and that nothing it started or wrote outlives it, Ctrl-C
included. What only the module can be asked (a server that does not start, bad arguments, the
report's two forms) is asked of `bgtasks_cli/crash_demo.py` directly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from bgtasks_cli import crash_demo
from bgtasks_cli.errors import InvalidInput, ServeError
from tests.cli_helpers import Lines, fixed_report, run_to_the_end

HAS_PROC = Path("/proc/self/fd").is_dir()
pytestmark = pytest.mark.skipif(not HAS_PROC, reason="needs /proc to look for leftover processes")
RUN_TIMEOUT = 120.0
INTERRUPTED = 130
KEYS = ["acknowledged", "written", "lost", "duplicated"]


def crash_demo_cli(scratch: Path, *args: str, columns: int = 200) -> subprocess.Popen[str]:
    """`bgtasks demo --crash ARGS` through the console script, its temporary files in
    `scratch`."""
    env = {**os.environ, "TMPDIR": str(scratch), "NO_COLOR": "1", "COLUMNS": str(columns)}
    return subprocess.Popen(
        [sys.executable, "-m", "bgtasks_cli", "demo", "--crash", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def killed_after(progress: str) -> float:
    found = re.search(r"kill -9 both, ([\d.]+) s after the first response", progress)
    assert found, progress
    return float(found.group(1))


def processes_in(directory: Path) -> list[int]:
    """Live processes (not zombies) whose working directory is in `directory`: the demo runs
    its servers in its temporary directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cwd.startswith(str(directory)) and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def pids_in(progress: str) -> list[int]:
    return [int(pid) for pid in re.findall(r": pid (\d+) on ", progress)]


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """An empty TMPDIR for the demo: whatever it leaves behind is found there (and, should a
    test fail, its servers are killed afterwards rather than left running)."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    yield directory
    for pid in processes_in(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_nothing_left(scratch: Path, pids: list[int]) -> None:
    assert pids, "the demo said which processes it started"
    assert [pid for pid in pids if alive(pid)] == []
    assert processes_in(scratch) == []
    assert list(scratch.iterdir()) == []


def test_plain_background_tasks_lose_acknowledged_lines_and_bgtasks_loses_none(
    scratch: Path,
) -> None:
    proc = crash_demo_cli(scratch, "--json")
    out, err = run_to_the_end(proc, RUN_TIMEOUT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    # Only the JSON document on stdout; the progress went to stderr.
    assert out.count("\n") == 1, out
    report = json.loads(out)
    assert list(report) == ["plain", "bgtasks"]
    assert list(report["plain"]) == KEYS and list(report["bgtasks"]) == [*KEYS, "recovered"]
    plain, bgtasks = report["plain"], report["bgtasks"]
    # 5 notifications with q: two lines acknowledged by each server.
    assert plain["acknowledged"] == bgtasks["acknowledged"] == 10
    # The kill came before the delays ran out: plain BackgroundTasks lost what it had promised.
    assert killed_after(err) < 1.0
    assert plain["lost"] > 0 and plain["written"] == plain["acknowledged"] - plain["lost"]
    assert (bgtasks["lost"], bgtasks["duplicated"], bgtasks["written"]) == (0, 0, 10)
    assert 0 < bgtasks["recovered"] <= bgtasks["acknowledged"]
    # Both servers, started twice, each named in the progress; all gone now.
    pids = pids_in(err)
    assert len(pids) == 4
    assert_nothing_left(scratch, pids)


def table_row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"│ {label} "))
    return [cell.strip() for cell in line.strip("│").split("│")][1:]


def test_the_report_as_a_table_at_80_columns(scratch: Path) -> None:
    proc = crash_demo_cli(scratch, columns=80)
    out, err = run_to_the_end(proc, RUN_TIMEOUT)
    assert proc.returncode == 0, err
    assert err == ""
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert killed_after(out) < 1.0  # the progress comes first, on stdout
    acknowledged = table_row(out, "lines acknowledged (200)")
    before = table_row(out, "written before the kill")
    recovered = table_row(out, "marked recovered")
    assert acknowledged == ["10", "10"] and recovered[0] == "-"
    # Every bgtasks task unfinished at the kill (its line not yet written) ended recovered.
    assert int(recovered[1]) == 10 - int(before[1]) > 0
    assert table_row(out, "lost")[1] == "0" and table_row(out, "duplicated")[1] == "0"
    assert "✓ bgtasks lost none and wrote each once" in out
    assert_nothing_left(scratch, pids_in(out))


@pytest.mark.parametrize(
    "moment",
    [
        "started bgtasks: pid",  # waiting for the first bgtasks to answer
        "kill -9 both",  # both just killed, about to start again
        "started bgtasks again: pid",  # waiting for the second bgtasks to answer
    ],
)
def test_ctrl_c_mid_demo_leaves_nothing_behind(scratch: Path, moment: str) -> None:
    proc = crash_demo_cli(scratch, "--json")
    assert proc.stdout is not None and proc.stderr is not None
    progress = Lines(proc.stderr)
    try:
        progress.until(lambda line: moment in line, timeout=60.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == INTERRUPTED
        assert proc.stdout.read() == ""  # no report of a demo cut short
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()  # stderr: Lines closes it at its end
    err = "".join(progress.rest(timeout=30.0))
    assert "Traceback" not in err
    assert err.rstrip().endswith(
        "interrupted: every server the demo started is stopped and its files removed"
    )
    assert_nothing_left(scratch, pids_in(err))


def test_a_server_that_does_not_start_is_one_error_and_leaves_nothing(
    scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both servers import the `server` package first: a broken one ahead of it on their path.
    broken = tmp_path / "broken" / "server"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no server here')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    said = io.StringIO()
    with pytest.raises(ServeError) as caught:
        crash_demo.run(delay=1.0, notifications=1, console=Console(file=said, width=200))
    message = caught.value.message
    assert message.startswith("the tutorial app did not start for the crash demo: ")
    assert "no server here" in message and "\n" not in message
    assert_nothing_left(scratch, pids_in(said.getvalue()))


@pytest.mark.parametrize(("delay", "notifications"), [(0.0, 5), (0.1, 5), (11.0, 5), (1.0, 0)])
def test_bad_arguments_are_refused_before_anything_starts(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, delay: float, notifications: int
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(InvalidInput):
        crash_demo.run(delay=delay, notifications=notifications)
    assert list(scratch.iterdir()) == []


def test_the_report_as_json_and_as_a_table() -> None:
    report = fixed_report()
    assert report.ok
    assert not replace(report, bgtasks=replace(report.bgtasks, duplicated=1)).ok
    assert crash_demo.report_json(report) == {
        "plain": {"acknowledged": 2, "written": 0, "lost": 2, "duplicated": 0},
        "bgtasks": {"acknowledged": 2, "written": 2, "lost": 0, "duplicated": 0, "recovered": 2},
    }
    console = Console(width=80, no_color=True, record=True, file=io.StringIO())
    console.print(crash_demo.render(report))
    assert [line.rstrip() for line in console.export_text().splitlines()] == [
        "log.txt after kill -9, 0.04 s after the first response, and a restart",
        "┏━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━┓",
        "┃                          ┃ FastAPI tutorial                 ┃         ┃",
        "┃                          ┃ (plain BackgroundTasks)          ┃ bgtasks ┃",
        "┡━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━┩",
        "│ lines acknowledged (200) │ 2                                │ 2       │",
        "│ written before the kill  │ 0                                │ 0       │",
        "│ there after the restart  │ 0                                │ 2       │",
        "│ lost                     │ 2                                │ 0       │",
        "│ duplicated               │ 0                                │ 0       │",
        "│ marked recovered         │ -                                │ 2       │",
        "│ missing                  │ 'found query: note 1\\n'          │ none    │",
        "│                          │ 'message to user1@example.com\\n' │         │",
        "└──────────────────────────┴──────────────────────────────────┴─────────┘",
        "✗ plain BackgroundTasks lost 2 of 2 acknowledged lines: the client got 200 for",
        "work that never happened",
        "✓ bgtasks lost none and wrote each once (2 finished after the restart, marked",
        "recovered)",
    ]


def test_the_demo_loads_neither_the_server_stack_nor_the_tutorial_app() -> None:
    """The tutorial app only ever runs in its own process, and `demo` starts as fast as the
    other commands."""
    heavy = ("fastapi", "uvicorn", "pydantic", "server.tutorial_app")
    code = f"import sys, bgtasks_cli.crash_demo; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
