"""`bgtasks serve --log-format json` (issue #17), through the real console script: every line
of the server's output is one JSON object, with the request and task ids where they are
known; the default stays readable; a bad format is one line and exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from bgtasks_cli.errors import EXIT_USAGE
from tests.cli_helpers import assert_one_error_line, cli, cli_env
from tests.helpers import ServerProcess, free_port, wait_until


def json_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = [line for line in server.log().splitlines() if line.strip()]
    documents = []
    for line in lines:
        document = json.loads(line)  # fails the test on any line that is not one object
        assert isinstance(document, dict), line
        documents.append(document)
    return documents


def test_json_logs_are_one_object_per_line_with_request_and_task_ids(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(args=("--log-format", "json"))
    (server.data_dir / "README.md").mkdir()  # so that a task fails and is logged
    sent = httpx.post(f"{server.url}/send-notification/a@example.com", params={"q": "hi"})
    failing = httpx.post(f"{server.url}/background_tasks", params={"framework": "x"})
    assert sent.status_code == failing.status_code == 200
    failing_id = failing.headers["x-request-id"]
    wait_until(lambda: any(line.get("task_id") for line in json_lines(server)), timeout=10)
    (task,) = httpx.get(f"{server.url}/requests/{failing_id}").json()["tasks"]
    assert server.stop() in (0, -15)
    lines = json_lines(server)
    for line in lines:
        assert list(line)[:3] == ["ts", "level", "event"], line
        assert datetime.fromisoformat(line["ts"]).tzinfo is not None
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
        assert isinstance(line["pid"], int)
        assert "color_message" not in line
    (banner,) = [line for line in lines if line["event"].startswith("bgtasks ") and "url" in line]
    assert banner["url"] == server.url and banner["data_dir"] == str(server.data_dir)
    assert banner["metrics"] == f"{server.url}/metrics"
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    by_id = {line.get("request_id"): line for line in access}
    assert by_id[sent.headers["x-request-id"]]["method"] == "POST"
    # uvicorn quotes the path it logs.
    assert by_id[sent.headers["x-request-id"]]["path"] == "/send-notification/a%40example.com?q=hi"
    assert by_id[sent.headers["x-request-id"]]["status"] == 200
    assert by_id[failing_id]["path"] == "/background_tasks?framework=x"
    (failed,) = [line for line in lines if line.get("task_id")]
    assert failed["level"] == "error" and failed["logger"] == "bgtasks.tasks"
    assert (failed["request_id"], failed["task_id"]) == (failing_id, task["id"])
    assert "is a directory" in failed["exception"]
    # Only the access lines carry a request id they did not name themselves.
    others = [line for line in lines if line["logger"] not in ("uvicorn.access", "bgtasks.tasks")]
    assert not any("request_id" in line for line in others)


def test_the_default_log_stays_readable(server_process: Callable[..., ServerProcess]) -> None:
    server = server_process()
    assert httpx.post(f"{server.url}/send-notification/a@example.com").status_code == 200
    wait_until(lambda: '"POST /send-notification/a%40example.com HTTP/1.1" 200' in server.log())
    log = server.log()
    assert "INFO:" in log and "serving at" in log
    assert not any(line.startswith("{") for line in log.splitlines())


def test_log_format_from_the_environment(server_process: Callable[..., ServerProcess]) -> None:
    server = server_process(env={"BGTASKS_LOG_FORMAT": "json"})
    assert httpx.get(f"{server.url}/health").status_code == 200
    wait_until(lambda: any(line["logger"] == "uvicorn.access" for line in json_lines(server)))


def test_a_bad_log_format_is_one_line_and_exit_2() -> None:
    bad_option = cli("serve", "--port", str(free_port()), "--log-format", "yaml")
    assert bad_option.returncode == EXIT_USAGE
    assert "'yaml' is not one of 'text', 'json'" in assert_one_error_line(bad_option.stderr)
    bad_setting = cli("serve", "--port", str(free_port()), env=cli_env(BGTASKS_LOG_FORMAT="yaml"))
    assert bad_setting.returncode == EXIT_USAGE
    assert assert_one_error_line(bad_setting.stderr).startswith("Error: BGTASKS_LOG_FORMAT: ")
