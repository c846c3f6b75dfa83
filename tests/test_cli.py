"""The `bgtasks` CLI in-process (typer's CliRunner): arguments, exit codes and rendering at a
fixed terminal width, against real uvicorn servers running in a thread."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from typer.testing import Result

from bgtasks_cli import launcher
from bgtasks_cli.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from bgtasks_cli.state import DEFAULT_URL, ServerState, resolve_url, state_file, write_state
from server import __version__
from tests.cli_helpers import (
    fire_json,
    invoke,
    picture_row,
)
from tests.helpers import LiveServer, free_port

COMMANDS = ("notify", "readme", "tail", "tasks", "timeline", "retry", "cancel", "serve", "demo")
VERDICT = re.compile(r"✓ response returned ([\d,]+) ms before the last write finished")
OUTCOME_FIELDS = {
    "ok",
    "request_id",
    "method",
    "path",
    "status",
    "body",
    "client_sent_at",
    "client_received_at",
    "latency_ms",
    "timed_out",
    "response_before_last_write_ms",
    "server",
}
TASK_FIELDS = {
    "id",
    "request_id",
    "seq",
    "file",
    "line",
    "status",
    "queued_at",
    "started_at",
    "finished_at",
    "last_error",
    "attempts",
    "next_attempt_at",
    "owner",
    "host",
}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Error:" in line]


def assert_clean_error(result: Result, code: int) -> str:
    """The documented exit code, exactly one `Error:` line, and no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    return lines[0]


# --- global options --------------------------------------------------------------------------


def test_version() -> None:
    for flag in ("--version", "-V"):
        result = invoke(flag)
        assert result.exit_code == 0
        assert result.stdout == f"bgtasks {__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_shows_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert f"Example: bgtasks {command}" in result.stdout
    assert "--help" in result.stdout


def test_top_level_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert re.search(rf"│ {command}\s", result.stdout), command
    assert "bgtasks demo" in result.stdout


# --- notify ----------------------------------------------------------------------------------


def test_notify_prints_response_tasks_picture_and_verdict(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=0.2)
    result = invoke("notify", "a@example.com", "--q", "hi", "--url", live.url)
    assert result.exit_code == 0, result.output
    out = result.stdout

    response = out.index("POST /send-notification/a@example.com → 200 in ")
    assert "Message sent" in out
    query_line = out.index("done ", response)
    assert "'found query: hi\\n' → log.txt" in out
    assert re.search(r"done \d\d:\d\d:\d\d\.\d{3} +\+[\d,.]+ ms  'message to a@example.com", out)
    timeline = out.index("timeline of request ")
    verdict = VERDICT.search(out)
    assert verdict is not None, out
    # Printed in the order things happened: response, finished tasks, timeline, verdict.
    assert response < query_line < timeline < verdict.start()
    # The picture, not the table: a row per side and per task, a key, each task in words.
    assert "┏" not in out and "client sent request" not in out
    client, server = picture_row(out, "client"), picture_row(out, "server")
    first, second = picture_row(out, "task 1"), picture_row(out, "task 2")
    assert "├" in client and client.endswith("┤") and server.endswith("▲")
    assert "█" in first and second.endswith("█")
    # The client had its response before the second task's line was written.
    assert len(client) < len(second)
    assert "├─┤ client: sent → got response" in out and "█ running (written at its end)" in out
    assert "task 1 done · 'found query: hi\\n' → log.txt · waited " in out
    assert "task 2 done · 'message to a@example.com\\n' → log.txt · waited " in out
    assert all(len(line) <= 120 for line in out.splitlines())
    assert int(verdict.group(1).replace(",", "")) > 0
    assert live.read("log.txt") == b"found query: hi\nmessage to a@example.com\n"


def test_notify_table_brings_the_table_of_events_back(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=0.2)
    result = invoke("notify", "a@example.com", "--q", "hi", "--table", "--url", live.url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    timeline = out.index("timeline of request ")
    assert VERDICT.search(out), out
    for event in (
        "client sent request",
        "server got request",
        "task 1 queued",
        "task 2 queued",
        "server sent response",
        "client got response",
        "task 1 started",
        "task 1 wrote",
        "task 2 wrote",
    ):
        assert event in out[timeline:], event
    # The timeline is in time order: the client saw the response before the last write.
    assert out.index("client got response", timeline) < out.index("task 2 wrote", timeline)
    assert "├─┤" not in out and "█" not in out  # no picture


def test_notify_no_wait_prints_the_response_only(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(delay=0.2)
    result = invoke("notify", "a@example.com", "--no-wait", "--url", live.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("POST /send-notification/a@example.com → 200 in ")
    assert lines[1].strip().startswith("Message sent  request ")
    for absent in ("timeline", "response returned", "done", "✓", "✗"):
        assert absent not in result.stdout


def test_notify_json_is_one_document_with_stable_fields(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=0.2)
    result = invoke("notify", "a@example.com", "--q", "hi", "--json", "--url", live.url)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n")
    doc = json.loads(result.stdout)
    assert set(doc) == OUTCOME_FIELDS
    assert doc["ok"] is True and doc["timed_out"] is False
    assert doc["status"] == 200 and doc["method"] == "POST"
    assert doc["path"] == "/send-notification/a@example.com"
    assert doc["body"] == {"message": "Message sent"}
    assert uuid.UUID(doc["request_id"]).version == 7
    assert 0 < doc["latency_ms"] < 10_000
    assert doc["client_sent_at"] <= doc["client_received_at"]
    assert doc["response_before_last_write_ms"] > 0
    server = doc["server"]
    assert server["id"] == doc["request_id"]
    assert server["status_code"] == 200 and server["response_sent_at"] is not None
    tasks = server["tasks"]
    # a request's record also gives each task's failed attempts
    assert [set(t) for t in tasks] == [TASK_FIELDS | {"failures"}] * 2
    assert [(t["seq"], t["file"], t["line"], t["status"]) for t in tasks] == [
        (0, "log.txt", "found query: hi\n", "done"),
        (1, "log.txt", "message to a@example.com\n", "done"),
    ]
    last = max(t["finished_at"] for t in tasks)
    assert doc["response_before_last_write_ms"] == pytest.approx(
        (last - doc["client_received_at"]) * 1000, abs=0.01
    )


def test_notify_invalid_email_is_a_usage_error(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    result = invoke("notify", "not-an-email", "--url", live.url)
    line = assert_clean_error(result, EXIT_USAGE)
    assert line.startswith("Error: the server refused the input: email: ")
    assert "hint: see `bgtasks COMMAND --help`" in result.stderr
    assert result.stdout == ""
    assert live.read("log.txt") == b""


def test_notify_timeout_shorter_than_the_work(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(delay=2.0)
    result = invoke("notify", "a@example.com", "--timeout", "0.5", "--url", live.url)
    assert result.exit_code == EXIT_FAILED, result.output
    assert re.search(r"✗ 1 tasks? did not finish in time", result.stdout), result.stdout
    assert "response returned" not in result.stdout
    # The picture draws the task not ended up to now, and says so.
    assert picture_row(result.stdout, "task 1").endswith("…")
    assert "… not ended yet" in result.stdout and "task 1 running · " in result.stdout


def test_timeout_option_is_validated() -> None:
    result = invoke("notify", "a@example.com", "--timeout", "0")
    assert result.exit_code == EXIT_USAGE
    assert "--timeout" in result.output and "Traceback" not in result.output


# --- readme ----------------------------------------------------------------------------------


def test_readme_framework(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(delay=0.2)
    result = invoke("readme", "FastAPI", "--url", live.url)
    assert result.exit_code == 0, result.output
    assert "POST /background_tasks → 200 in " in result.stdout
    assert "任务已在后台运行" in result.stdout
    assert "'\\n## FastAPI 框架精讲' → README.md" in result.stdout
    assert VERDICT.search(result.stdout), result.stdout
    assert live.read("README.md").decode() == "\n## FastAPI 框架精讲"


def test_readme_intro(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(delay=0.2)
    result = invoke("readme", "--intro", "--q", "x", "--url", live.url)
    assert result.exit_code == 0, result.output
    assert "POST /dependency/background_tasks → 200 in " in result.stdout
    assert "README.md更新成功" in result.stdout
    assert VERDICT.search(result.stdout), result.stdout
    assert live.read("README.md").decode().startswith("\n\n> 整体的介绍 FastAPI")


def test_readme_intro_without_q_queues_nothing(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    result = invoke("readme", "--intro", "--url", live.url)
    assert result.exit_code == 0, result.output
    assert "✓ no background task was queued for this request" in result.stdout
    assert live.read("README.md") == b""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give either FRAMEWORK or --intro"),
        (("FastAPI", "--intro"), "give either FRAMEWORK or --intro"),
        (("FastAPI", "--q", "x"), "--q goes with --intro"),
    ],
)
def test_readme_argument_errors(args: tuple[str, ...], message: str) -> None:
    # Refused before any request: the URL is never contacted.
    result = invoke("readme", *args, "--url", f"http://127.0.0.1:{free_port()}")
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output
    assert "Traceback" not in result.output


# --- failures --------------------------------------------------------------------------------


def test_failing_task_gives_exit_1(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(max_attempts=1)  # failed at once: retries are tests/test_retries.py's
    (live.data_dir / "README.md").mkdir(parents=True)
    result = invoke("readme", "FastAPI", "--url", live.url)
    assert result.exit_code == EXIT_FAILED, result.output
    out = result.stdout
    assert "POST /background_tasks → 200" in out
    assert re.search(r"^ +failed \d\d:\d\d:\d\d", out, re.MULTILINE), out
    assert "README.md is a directory" in out
    assert picture_row(out, "task 1").endswith("✗") and "  ✗ failed" in out
    assert "task 1 failed · '\\n## FastAPI 框架精讲' → README.md · failed after waiting " in out
    assert "README.md is a directory" in out[out.index("timeline of request") :]
    assert "✗ 1 of 1 tasks failed: NotARegularFile" in out
    assert "response returned" not in out
    table = invoke("readme", "Flask", "--table", "--url", live.url)
    assert table.exit_code == EXIT_FAILED, table.output
    assert "task 1 FAILED" in table.stdout and "README.md is a directory" in table.stdout

    doc = fire_json(live, "notify", "a@example.com")  # the other file still works
    assert doc["ok"] is True
    failing = invoke("readme", "Django", "--json", "--url", live.url)
    assert failing.exit_code == EXIT_FAILED
    failed = json.loads(failing.stdout)
    assert failed["ok"] is False
    assert failed["server"]["tasks"][0]["status"] == "failed"
    assert "is a directory" in failed["server"]["tasks"][0]["last_error"]


@pytest.mark.parametrize("command", [("notify", "a@example.com"), ("readme", "X"), ("tasks",)])
def test_unreachable_url_is_exit_3_with_a_hint(command: tuple[str, ...]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(*command, "--url", url)
    line = assert_clean_error(result, EXIT_UNREACHABLE)
    assert line == f"Error: no bgtasks server answers at {url} (ConnectError)"
    assert "start it with `bgtasks serve`" in result.stderr
    assert result.stdout == ""


# --- tasks -----------------------------------------------------------------------------------


def test_tasks_json_newest_first(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    fired = [
        fire_json(live, "notify", "a@example.com", "--q", "first")["request_id"],
        fire_json(live, "readme", "FastAPI")["request_id"],
        fire_json(live, "notify", "b@example.com")["request_id"],
    ]
    result = invoke("tasks", "--json", "--url", live.url)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all(set(row) == TASK_FIELDS for row in rows)
    assert [(r["request_id"], r["line"]) for r in rows] == [
        (fired[2], "message to b@example.com\n"),
        (fired[1], "\n## FastAPI 框架精讲"),
        (fired[0], "message to a@example.com\n"),
        (fired[0], "found query: first\n"),
    ]
    queued = [r["queued_at"] for r in rows]
    assert queued == sorted(queued, reverse=True)
    assert {r["status"] for r in rows} == {"done"}

    limited = invoke("tasks", "--json", "--limit", "2", "--url", live.url)
    assert [r["id"] for r in json.loads(limited.stdout)] == [r["id"] for r in rows[:2]]


def test_tasks_table_has_the_columns(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    request_id = fire_json(live, "notify", "a@example.com")["request_id"]
    task_id = json.loads(invoke("tasks", "--json", "--url", live.url).stdout)[0]["id"]
    result = invoke("tasks", "--url", live.url, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("recent tasks")
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    cells = [cell.strip() for cell in header.strip("┃").split("┃")]
    assert cells == [
        "task",
        "request",
        "status",
        "attempts",
        "writes",
        "queued",
        "started",
        "finished",
        "waited",
        "ran",
    ]
    row = next(line for line in out.splitlines() if task_id in line)
    assert f"…{request_id[-8:]}" in row and re.search(r" done +│ +1 │", row), row
    assert re.search(r"(\d\d:\d\d:\d\d\.\d{3}.*){3}", row), row
    assert all(len(line) <= 200 for line in out.splitlines())
    assert "not shown" not in out


def test_tasks_table_empty(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    result = invoke("tasks", "--url", live.url)
    assert result.exit_code == 0, result.output
    assert "no tasks yet" in result.stdout


def test_tasks_status_failed_table(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    fire_json(live, "readme", "FastAPI")
    os.unlink(live.data_dir / "README.md")
    (live.data_dir / "README.md").mkdir()
    assert invoke("readme", "Django", "--url", live.url).exit_code == EXIT_FAILED
    failed = json.loads(invoke("tasks", "--json", "--status", "failed", "--url", live.url).stdout)
    assert [t["status"] for t in failed] == ["failed"]

    result = invoke("tasks", "--status", "failed", "--url", live.url)
    assert result.exit_code == 0, result.output
    assert failed[0]["id"] in result.stdout
    assert "Django" in result.stdout and "FastAPI" not in result.stdout
    assert " failed " in result.stdout and " done " not in result.stdout

    bad = invoke("tasks", "--status", "exploded", "--url", live.url)
    assert bad.exit_code == EXIT_USAGE and "Traceback" not in bad.output


# --- finding the server: --url, BGTASKS_URL, the state file ----------------------------------


def test_bgtasks_url_env_is_honoured(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    fire_json(live, "notify", "a@example.com")
    result = invoke("tasks", "--json", env={"BGTASKS_URL": live.url})
    assert result.exit_code == 0, result.output
    assert [t["line"] for t in json.loads(result.stdout)] == ["message to a@example.com\n"]

    closed = f"http://127.0.0.1:{free_port()}"
    result = invoke("tasks", env={"BGTASKS_URL": closed})
    assert closed in assert_clean_error(result, EXIT_UNREACHABLE)
    # --url wins over the environment.
    assert invoke("tasks", "--url", live.url, env={"BGTASKS_URL": closed}).exit_code == 0


def test_state_file_finds_the_running_server(
    start_server: Callable[..., LiveServer], isolated_env: Path
) -> None:
    live = start_server()
    write_state(ServerState(url=live.url, pid=os.getpid(), data_dir=str(live.data_dir)))
    assert state_file() == isolated_env / "server.json"

    notified = invoke("notify", "a@example.com")
    assert notified.exit_code == 0, notified.output
    assert VERDICT.search(notified.stdout) or "writes finished" in notified.stdout
    rows = json.loads(invoke("tasks", "--json").stdout)
    assert [t["line"] for t in rows] == ["message to a@example.com\n"]
    # tail finds the server's data directory the same way.
    tailed = invoke("tail", "--no-follow", "--json", "-n", "5")
    assert tailed.exit_code == 0, tailed.output
    events = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert [(e["source"], e["text"], e["backlog"]) for e in events] == [
        ("log.txt", "message to a@example.com", True)
    ]


def test_state_file_of_a_dead_server_is_ignored(isolated_env: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    write_state(ServerState(url="http://127.0.0.1:1", pid=gone.pid, data_dir="/nowhere"))
    assert resolve_url(None) == DEFAULT_URL
    assert resolve_url("http://example.test:9/") == "http://example.test:9"


# --- tail ------------------------------------------------------------------------------------


def test_tail_no_follow_backlog(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "log.txt").write_text("one\ntwo\nthree\n")
    (data / "README.md").write_text("# T\n## FastAPI 框架精讲")
    result = invoke("tail", "--no-follow", "-n", "2", "--data-dir", str(data))
    assert result.exit_code == 0, result.output
    rows = [line.split(maxsplit=2)[1:] for line in result.stdout.splitlines()]
    assert rows == [
        ["log.txt", "two"],
        ["log.txt", "three"],
        ["README.md", "# T"],
        ["README.md", "## FastAPI 框架精讲"],
    ]
    only_log = invoke("tail", "--no-follow", "-n", "1", "--file", "log", "--data-dir", str(data))
    assert only_log.stdout.split(maxsplit=2)[1:] == ["log.txt", "three\n"]
    env_dir = invoke(
        "tail", "--no-follow", "--json", "-n", "1", env={"BGTASKS_DATA_DIR": str(data)}
    )
    assert [json.loads(line)["text"] for line in env_dir.stdout.splitlines()] == [
        "three",
        "## FastAPI 框架精讲",
    ]


# --- serve (launcher patched: nothing is bound) ----------------------------------------------


class FakeServe:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


@pytest.fixture
def fake_serve() -> Iterator[FakeServe]:
    fake = FakeServe()
    with patch.object(launcher, "serve", fake), patch.object(launcher, "preflight", FakeServe()):
        yield fake


def test_serve_non_loopback_host_warns(fake_serve: FakeServe, tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = invoke(
        "serve", "--host", "0.0.0.0", "--port", "8123", "--data-dir", str(data), "--delay", "0.5"
    )
    assert result.exit_code == 0, result.output
    assert fake_serve.calls == [
        {
            "host": "0.0.0.0",
            "port": 8123,
            "workers": 1,
            "data_dir": data.resolve(),
            "delay": 0.5,
            "drain_timeout": None,
            "retries": (5, 0.5, 60.0),
            "access_log": True,
            "record_state": True,
            "log_format": "text",
            "database_url": None,
        }
    ]
    assert "Warning: binding 0.0.0.0 exposes the service beyond this machine." in result.stdout
    assert "http://127.0.0.1:8123" in result.stdout
    assert "http://127.0.0.1:8123/docs" in result.stdout
    assert str(data.resolve() / "log.txt") in result.stdout
    assert str(data.resolve() / "README.md") in result.stdout


def test_serve_loopback_passes_every_option(fake_serve: FakeServe, tmp_path: Path) -> None:
    result = invoke(
        "serve",
        "--port",
        "9001",
        "--workers",
        "3",
        "--data-dir",
        str(tmp_path / "d"),
        "--drain-timeout",
        "7",
        "--max-attempts",
        "3",
        "--retry-max",
        "4",
        "--no-access-log",
        env={"BGTASKS_DELAY": "0.25", "BGTASKS_RETRY_BASE": "0.25", "BGTASKS_MAX_ATTEMPTS": "9"},
    )
    assert result.exit_code == 0, result.output
    assert fake_serve.calls == [
        {
            "host": "127.0.0.1",
            "port": 9001,
            "workers": 3,
            "data_dir": (tmp_path / "d").resolve(),
            "delay": 0.25,
            "drain_timeout": 7,
            "retries": (3, 0.25, 4.0),  # the options win over the environment
            "access_log": False,
            "record_state": True,
            "log_format": "text",
            "database_url": None,
        }
    ]
    assert "Warning" not in result.output
    assert "3 · drain on stop: 7 s" in result.stdout
    assert "retries  up to 3 attempts · backoff 0.25 s, doubling to 4 s, jittered" in result.stdout


@pytest.mark.parametrize(
    "args",
    [("--port", "0"), ("--port", "70000"), ("--workers", "0"), ("--delay", "-1")],
)
def test_serve_bad_option_is_a_usage_error(fake_serve: FakeServe, args: tuple[str, ...]) -> None:
    result = invoke("serve", *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert fake_serve.calls == []
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("serve", "--port", "70000"), "'--port'"),
        (("notify",), "Missing argument"),
        (("tail", "--file", "nope"), "'--file'"),
        (("readme",), "either FRAMEWORK or --intro"),
        (("tasks", "--limit", "0"), "'--limit'"),
    ],
)
def test_a_bad_option_is_one_red_line_with_a_hint(args: tuple[str, ...], words: str) -> None:
    result = invoke(*args)
    line = assert_clean_error(result, EXIT_USAGE)
    assert words in line
    assert f"see `bgtasks {args[0]} --help`" in result.output
    assert "Usage:" not in result.output  # no usage box: one line and the hint
