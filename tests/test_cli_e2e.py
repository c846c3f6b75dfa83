"""The `bgtasks` CLI end to end: `python -m bgtasks_cli ...` in subprocesses against real
servers, checking exit codes, stderr (no traceback) and that nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bgtasks_cli.errors import EXIT_FAILED, EXIT_SERVE, EXIT_UNREACHABLE, EXIT_USAGE
from tests.cli_helpers import (
    HAS_PROC,
    RED_ERROR,
    RUN_TIMEOUT,
    WAIT,
    Lines,
    assert_one_error_line,
    cli,
    cli_env,
    cli_popen,
    heavy_modules_loaded,
    processes_mentioning,
)
from tests.cli_helpers import popen_cleanup as popen_cleanup  # a fixture
from tests.helpers import LiveServer, ServerProcess, free_port, wait_until

TAIL_FIELDS = {"at", "backlog", "source", "kind", "text", "request_id", "task_id"}


def open_files(pid: int) -> set[str]:
    targets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.add(os.readlink(fd))
        except OSError:
            continue
    return targets


# --- smoke and import cost -------------------------------------------------------------------


def test_module_entry_point_help() -> None:
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    commands = ("notify", "readme", "tail", "tasks", "timeline", "retry", "cancel", "serve", "demo")
    for command in commands:
        assert command in result.stdout
    assert result.stderr == ""
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("bgtasks ")


# Start-up time is mostly imports: which modules the client commands must not load, and why,
# is HEAVY in tests/cli_helpers.py.


@pytest.mark.parametrize(
    "args",
    [
        ["notify", "a@example.com", "--no-wait", "--url", "http://127.0.0.1:1"],
        ["readme", "FastAPI", "--url", "http://127.0.0.1:1"],
        ["tasks", "--url", "http://127.0.0.1:1"],
        ["timeline", "0197a4f2-6c1e-7b3a-9d52-3f1e8c0a4b21", "--url", "http://127.0.0.1:1"],
        ["tail", "--no-follow", "-n", "3"],
        ["retry", "a1b2c3d4-1", "--url", "http://127.0.0.1:1"],
        ["retry", "--failed", "--url", "http://127.0.0.1:1"],
        ["cancel", "a1b2c3d4-1", "--url", "http://127.0.0.1:1"],
    ],
    ids=" ".join,
)
def test_commands_do_not_import_the_server_stack(args: list[str], tmp_path: Path) -> None:
    env = cli_env(BGTASKS_DATA_DIR=str(tmp_path / "data"))
    exit_code, loaded = heavy_modules_loaded(args, env)
    # The command really ran (unreachable for the requests, fine for tail) ...
    assert exit_code == (0 if args[0] == "tail" else EXIT_UNREACHABLE)
    # ... and never loaded those modules.
    assert loaded == []


def test_notify_against_a_live_server_does_not_import_them(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    args = ["notify", "a@example.com", "--q", "hi", "--url", live.url]
    for wait in ([], ["--no-wait"], ["--table"]):
        exit_code, loaded = heavy_modules_loaded([*args, *wait], cli_env())
        assert (exit_code, loaded) == (0, [])
    request_id = json.loads(cli(*args, "--json").stdout)["request_id"]
    for how in ([], ["--table"], ["--json"]):
        shown = ["timeline", request_id, "--url", live.url, *how]
        assert heavy_modules_loaded(shown, cli_env()) == (0, [])


# --- unreachable server ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [["tasks"], ["notify", "a@example.com"], ["tasks", "--json"]])
def test_unreachable_server_exit_3_no_traceback(args: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(*args, env=cli_env(BGTASKS_URL=url))
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    line = assert_one_error_line(result.stderr)
    assert url in line
    assert "bgtasks serve" in result.stderr
    assert result.stdout == ""


# --- serve -----------------------------------------------------------------------------------


def test_serve_port_taken_exit_4(tmp_path: Path, isolated_env: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in cli_env(FORCE_COLOR="1").items() if k != "NO_COLOR"}
        result = cli(
            "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), env=env, timeout=30
        )
    assert result.returncode == EXIT_SERVE, result.stderr
    line = assert_one_error_line(result.stderr)
    assert line.startswith(RED_ERROR), repr(line)  # one red line
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "--port" in result.stderr  # the hint
    assert not (isolated_env / "server.json").exists()


def test_serve_data_dir_not_writable_exit_4(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    result = cli("serve", "--port", str(free_port()), "--data-dir", str(a_file / "data"))
    assert result.returncode == EXIT_SERVE, result.stderr
    line = assert_one_error_line(result.stderr)
    assert f"data directory {a_file / 'data'} is not writable" in line
    assert "--data-dir" in result.stderr


def test_serve_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    result = cli("serve", "--port", str(free_port()), "--data-dir", str(a_file))
    # Caught while parsing the option, so it is a usage error rather than a start-up one.
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "is a file" in result.stderr and "Traceback" not in result.stderr
    assert a_file.read_text() == "not a directory"


# --- against `bgtasks serve` in a subprocess -------------------------------------------------


def test_against_a_served_process(
    server_process: Callable[..., ServerProcess],
    popen_cleanup: list[subprocess.Popen[str]],
    isolated_env: Path,
) -> None:
    server = server_process(delay=1.0, env={"BGTASKS_STATE_DIR": str(isolated_env)})
    # `serve` records where it listens; the other commands find it with no flags.
    state = json.loads((isolated_env / "server.json").read_text())
    assert state == {"url": server.url, "pid": server.proc.pid, "data_dir": str(server.data_dir)}
    # The banner (80 columns: not a terminal) shows the URLs and the whole file paths.
    banner = "".join(line.strip() for line in server.log().split("INFO:")[0].splitlines())
    assert f"serving at {server.url}" in banner and f"{server.url}/docs" in banner
    for name in ("log.txt", "README.md"):
        assert str(server.data_dir / name) in banner
    assert "…" not in banner

    # notify prints the response while its task is still sleeping, then the verdict.
    proc = cli_popen("notify", "a@example.com")
    popen_cleanup.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    out = Lines(proc.stdout)
    first = out.until(lambda line: "POST /send-notification/a@example.com" in line)
    assert " → 200 in " in first
    log = server.data_dir / "log.txt"
    assert not log.exists() or b"message to" not in log.read_bytes()
    assert proc.wait(timeout=RUN_TIMEOUT) == 0, proc.stderr.read()
    text = "".join(out.rest())
    assert "done" in text and "timeline of request" in text
    assert "response returned" in text and "before the last write finished" in text
    assert proc.stderr.read() == ""
    assert log.read_bytes() == b"message to a@example.com\n"

    # A task that fails gives exit 1.
    (server.data_dir / "README.md").mkdir()
    failed = cli("readme", "FastAPI", "--timeout", "30")
    assert failed.returncode == EXIT_FAILED, failed.stdout + failed.stderr
    assert "failed" in failed.stdout and "is a directory" in failed.stdout
    assert "Traceback" not in failed.stdout + failed.stderr

    # tasks --json: newest first, with both outcomes.
    listed = cli("tasks", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["file"], r["status"]) for r in rows] == [
        ("README.md", "failed"),
        ("log.txt", "done"),
    ]
    assert "is a directory" in rows[0]["last_error"]

    # A graceful stop (uvicorn re-raises SIGTERM after it) removes the state file; then the
    # commands say the server is gone.
    assert server.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    assert "Finished server process" in server.log()
    assert not (isolated_env / "server.json").exists()
    gone = cli("tasks", env=cli_env(BGTASKS_URL=server.url))
    assert gone.returncode == EXIT_UNREACHABLE
    assert_one_error_line(gone.stderr)


# --- tail ------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to know when the follower is watching")
def test_tail_follows_appends_truncation_and_recreation(
    tmp_path: Path, popen_cleanup: list[subprocess.Popen[str]]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    log = data / "log.txt"
    log.write_text("written before tail started\n")
    proc = cli_popen("tail", "--json", "-n", "0", "--data-dir", str(data))
    popen_cleanup.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    out, stderr = Lines(proc.stdout), proc.stderr

    # Ready once it holds log.txt open (backlog read) and an inotify watch (following).
    def watching() -> bool:
        assert proc.poll() is None, stderr.read()
        files = open_files(proc.pid)
        return str(log) in files and "anon_inode:inotify" in files

    wait_until(watching, timeout=WAIT)
    events: list[dict[str, Any]] = []

    def expect(kind: str, text: str | None = None, file: str = "log.txt") -> dict[str, Any]:
        def match(line: str) -> bool:
            event = json.loads(line)
            assert set(event) == TAIL_FIELDS
            events.append(event)
            return (event["source"], event["kind"]) == (file, kind) and text in (
                None,
                event["text"],
            )

        found: dict[str, Any] = json.loads(out.until(match))
        return found

    def append(path: Path, data: str) -> None:
        with path.open("a") as f:
            f.write(data)

    append(log, "a line written after tail started\n")
    expect("line", "a line written after tail started")

    os.truncate(log, 0)
    expect("truncated")
    append(log, "after truncation\n")
    expect("line", "after truncation")

    log.unlink()
    expect("removed")
    append(log, "after recreation\n")
    expect("created")
    expect("line", "after recreation")

    append(data / "README.md", "# appeared later\n")
    expect("line", "# appeared later", file="README.md")

    assert all(e["text"] != "written before tail started" for e in events)
    # Ctrl-C ends it cleanly.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WAIT) == 0
    assert "Traceback" not in proc.stderr.read()


def test_tail_no_follow_prints_last_lines(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "log.txt").write_text("one\ntwo\nthree\n")
    result = cli("tail", "--no-follow", "-n", "2", "--file", "log", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(maxsplit=2)[1:] for line in lines] == [
        ["log.txt", "two"],
        ["log.txt", "three"],
    ]
    as_json = cli("tail", "--no-follow", "-n", "2", "--json", "--data-dir", str(data))
    assert [json.loads(line)["text"] for line in as_json.stdout.splitlines()] == ["two", "three"]


# --- demo ------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to look for leftover processes")
def test_demo_runs_to_the_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # The demo's server and data directory live under TMPDIR: find them by that path.
    assert processes_mentioning(str(scratch)) == []
    result = cli("demo", "--delay", "0.2", env=cli_env(TMPDIR=str(scratch), COLUMNS="200"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"data dir {scratch}/bgtasks-demo-" in out
    assert out.count("response returned") == 2
    # Each request's timeline is the picture (the table only with --table).
    assert out.count("├─┤ client: sent → got response") == 2 and "┏" not in out
    assert "what `bgtasks tail` saw" in out
    assert "message to demo@example.com" in out.split("what `bgtasks tail` saw")[1]
    assert "## FastAPI 框架精讲" in out.split("what `bgtasks tail` saw")[1]
    # It ends pointing at the crash and fail demos.
    more = [line.split() for line in out.split("more demos")[1].splitlines()]
    assert [words[:6] for words in more if words[:1] == ["bgtasks"]] == [
        ["bgtasks", "demo", "--crash", "what", "kill", "-9"],
        ["bgtasks", "demo", "--fail", "a", "task", "that"],
    ]
    assert "Traceback" not in result.stderr
    assert processes_mentioning(str(scratch)) == []
    assert list(scratch.iterdir()) == []
