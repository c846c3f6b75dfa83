"""The timeline picture in the CLI (issue #18): `bgtasks timeline REQUEST_ID` for any recorded
request (the picture, `--table`, `--json`), and the picture of `notify` through the real console
script at 80 columns with NO_COLOR."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from rich.cells import cell_len

from bgtasks_cli.errors import EXIT_FAILED, EXIT_USAGE
from tests.cli_helpers import assert_one_error_line, cli, cli_env, fire_json, invoke, picture_row
from tests.helpers import LiveServer, wait_until


def record_of(live: LiveServer, request_id: str) -> dict[str, Any]:
    response = httpx.get(f"{live.url}/requests/{request_id}", timeout=10)
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def test_timeline_draws_any_recorded_request(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(delay=0.1)
    request_id = fire_json(live, "notify", "a@example.com", "--q", "hi")["request_id"]
    result = invoke("timeline", request_id, "--url", live.url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"timeline of request {request_id}\n")
    assert "POST /send-notification/a@example.com → 200" in out
    # Only the server's times are known: the axis counts from when it got the request.
    assert "ms from server got request" in out
    assert not any(line.startswith("client ") for line in out.splitlines())
    assert picture_row(out, "server").endswith("▲")
    assert picture_row(out, "task 2").endswith("█")
    assert "task 1 done · 'found query: hi\\n' → log.txt · waited " in out
    assert "task 2 done · 'message to a@example.com\\n' → log.txt · waited " in out
    assert all(cell_len(line) <= 120 for line in out.splitlines())


def test_timeline_table_and_json(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    request_id = fire_json(live, "notify", "a@example.com")["request_id"]
    table = invoke("timeline", request_id, "--table", "--url", live.url)
    assert table.exit_code == 0, table.output
    events = re.findall(r"│ ([a-z0-9 ]+?) +│", table.stdout)
    assert [e for e in events if e.startswith(("server", "task"))] == [
        "server got request",
        "task 1 queued",
        "server sent response",
        "task 1 started",
        "task 1 wrote",
    ]
    assert "client" not in table.stdout and "█" not in table.stdout
    # The +ms column counts from the server getting the request.
    assert re.search(r"│ +0\.0 │ server got request", table.stdout), table.stdout

    as_json = invoke("timeline", request_id, "--json", "--url", live.url)
    assert as_json.exit_code == 0, as_json.output
    assert as_json.stdout.count("\n") == 1
    assert json.loads(as_json.stdout) == record_of(live, request_id)


def test_timeline_of_a_request_still_running_is_drawn_up_to_now(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=3.0)
    request_id = fire_json(live, "notify", "a@example.com", "--no-wait")["request_id"]

    def running() -> bool:
        return bool(record_of(live, request_id)["tasks"][0]["status"] == "running")

    wait_until(running, timeout=10)
    time.sleep(0.3)  # so that now is well after the last recorded moment (the start)
    result = invoke("timeline", request_id, "--url", live.url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert picture_row(out, "task 1").endswith("█…")
    assert "task 1 running · 'message to a@example.com\\n' → log.txt · waited " in out
    assert "… not ended yet" in out
    # The axis runs on past the start to the moment it was drawn.
    ticks = next(line for line in out.splitlines() if line.lstrip().startswith("ms 0"))
    assert int(ticks.split()[-1].replace(",", "")) >= 300


def test_timeline_of_a_failed_task_says_why_and_exits_0(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    (live.data_dir / "README.md").mkdir(parents=True)
    failed = invoke("readme", "FastAPI", "--json", "--url", live.url)
    assert failed.exit_code == EXIT_FAILED, failed.output
    request_id = json.loads(failed.stdout)["request_id"]
    result = invoke("timeline", request_id, "--url", live.url)
    # Showing a record succeeds whatever its tasks did.
    assert result.exit_code == 0, result.output
    assert picture_row(result.stdout, "task 1").endswith("✗")
    assert "task 1 failed · " in result.stdout
    assert "README.md is a directory" in result.stdout


def test_timeline_of_an_unknown_id_exits_1_with_one_line(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    unknown = "0197a4f2-6c1e-7b3a-9d52-3f1e8c0a4b21"
    result = cli("timeline", unknown, "--url", live.url)
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    line = assert_one_error_line(result.stderr)
    assert line == f"Error: no request {unknown} in the registry at {live.url}"
    assert result.stderr.splitlines()[1].startswith("hint: `bgtasks tasks --json` lists")
    assert len(result.stderr.splitlines()) == 2
    assert result.stdout == ""


def test_timeline_refuses_what_cannot_be_a_request_id() -> None:
    for bad in ("a/b", "../tasks", "-x" * 70, "x" * 129):
        result = cli("timeline", "--url", "http://127.0.0.1:1", "--", bad)
        assert result.returncode == EXIT_USAGE, (bad, result.stderr)
        line = assert_one_error_line(result.stderr)
        assert "is not a request id" in line, line


def test_the_picture_reads_at_80_columns_without_colour(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=0.2)
    env = cli_env(COLUMNS="80")
    result = cli("notify", "user@example.com", "--q", "hello", "--url", live.url, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b[" not in out  # NO_COLOR: the glyphs carry the meaning
    assert all(cell_len(line) <= 80 for line in out.splitlines()), out
    for label in ("client", "server", "task 1", "task 2"):
        assert picture_row(out, label)
    assert "├─┤ client: sent → got response" in out
    request_id = fire_json(live, "readme", "FastAPI")["request_id"]
    drawn = cli("timeline", request_id, "--url", live.url, env=env)
    assert drawn.returncode == 0, drawn.stderr
    assert "\x1b[" not in drawn.stdout
    assert all(cell_len(line) <= 80 for line in drawn.stdout.splitlines()), drawn.stdout
    assert picture_row(drawn.stdout, "task 1").endswith("█")
