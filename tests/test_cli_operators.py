"""`bgtasks retry` and `bgtasks cancel` (issue #16, CLI side) through the real console script
against live servers: a dead task retried and written once, `retry --failed`, a sleeping or
retrying task cancelled and never written, each refusal one red line with the server's reason
while the other ids still go on, and the admin token sent (and never shown) when it is set."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from bgtasks_cli import operators
from bgtasks_cli.client import Client
from bgtasks_cli.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from server.status import ENDED
from tests.cli_helpers import Canned, assert_one_error_line, cli, cli_env, http_server
from tests.helpers import LiveServer, free_port, wait_until

HEADING = "\n## {} 框架精讲"
TOKEN = "s3cret-token-of-16+"


def record(live: LiveServer, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{live.url}/requests/{request_id}").json()
    return body


def ended_tasks(live: LiveServer, request_id: str) -> list[dict[str, Any]] | None:
    tasks: list[dict[str, Any]] = record(live, request_id).get("tasks") or []
    return tasks if tasks and all(t["status"] in ENDED for t in tasks) else None


def dead_readme(live: LiveServer, framework: str) -> dict[str, Any]:
    """A readme request whose one task died (README.md is a directory); that task."""
    response = httpx.post(f"{live.url}/background_tasks", params={"framework": framework})
    (task,) = wait_until(lambda: ended_tasks(live, response.headers["x-request-id"]))
    assert task["status"] == "failed", task
    return task


def status_of(live: LiveServer, task: dict[str, Any]) -> str:
    tasks = record(live, task["request_id"])["tasks"]
    return str(next(t for t in tasks if t["id"] == task["id"])["status"])


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


@pytest.fixture
def dead_letters(start_server: Callable[..., LiveServer]) -> Iterator[LiveServer]:
    """A server whose tasks die at their first failure, with README.md made a directory."""
    live = start_server(max_attempts=1)
    (live.data_dir / "README.md").mkdir(parents=True)
    yield live


def test_retry_runs_a_dead_task_again_and_writes_it_once(dead_letters: LiveServer) -> None:
    live = dead_letters
    dead = dead_readme(live, "Flask")
    (live.data_dir / "README.md").rmdir()  # the fault is fixed
    result = cli("retry", dead["id"], "--url", live.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"retried {dead['id']}: '\\n## Flask 框架精讲' → README.md\n"
    assert result.stderr == ""
    wait_until(lambda: status_of(live, dead) == "done")
    assert live.read("README.md") == HEADING.format("Flask").encode()

    # Done now: a second retry is refused with the server's reason, and nothing is written.
    again = cli("retry", dead["id"], "--url", live.url)
    assert again.returncode == EXIT_FAILED, again.stderr
    line = assert_one_error_line(again.stderr)
    assert line == f"Error: task {dead['id']} is done: only a failed task can be retried"
    assert again.stdout == ""
    assert live.read("README.md") == HEADING.format("Flask").encode()


def test_each_refusal_is_one_line_and_the_other_ids_still_go_on(dead_letters: LiveServer) -> None:
    live = dead_letters
    dead = dead_readme(live, "Django")
    done = httpx.post(f"{live.url}/send-notification/a@example.com")
    (written,) = wait_until(lambda: ended_tasks(live, done.headers["x-request-id"]))
    (live.data_dir / "README.md").rmdir()
    result = cli("retry", "nope-1", dead["id"], written["id"], "--url", live.url)
    assert result.returncode == EXIT_FAILED, result.stderr
    assert error_lines(result.stderr) == [
        "Error: no task 'nope-1' in the registry",
        f"Error: task {written['id']} is done: only a failed task can be retried",
    ]
    assert result.stdout.startswith(f"retried {dead['id']}: ") and result.stdout.count("\n") == 1
    wait_until(lambda: status_of(live, dead) == "done")
    assert live.read("README.md") == HEADING.format("Django").encode()
    assert live.read("log.txt") == b"message to a@example.com\n"


def test_retry_failed_retries_every_dead_task_and_says_how_many(dead_letters: LiveServer) -> None:
    live = dead_letters
    dead = [dead_readme(live, name) for name in ("A", "B", "C")]
    (live.data_dir / "README.md").rmdir()
    result = cli("retry", "--failed", "--url", live.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "retried 3 failed tasks"
    # Newest first, as `tasks --status failed` lists them.
    assert [line.split(":")[0] for line in lines[:-1]] == [
        f"retried {task['id']}" for task in reversed(dead)
    ]
    wait_until(lambda: all(status_of(live, task) == "done" for task in dead))
    written = live.read("README.md").decode()
    assert sorted(written.split("\n## ")[1:]) == ["A 框架精讲", "B 框架精讲", "C 框架精讲"]

    nothing = cli("retry", "--failed", "--url", live.url, "--json")
    assert nothing.returncode == 0, nothing.stderr
    assert json.loads(nothing.stdout) == {"retried": [], "refused": [], "more_left": False}
    plain = cli("retry", "--failed", "--url", live.url)
    assert plain.stdout == "no failed tasks to retry\n"


def test_retry_failed_pages_through_the_list_and_is_bounded(dead_letters: LiveServer) -> None:
    live = dead_letters
    dead = {dead_readme(live, f"F{n}")["id"] for n in range(5)}
    with Client(live.url) as client:
        # The fault stays: a retried task fails again at once and is listed again, and is not
        # retried twice: the paging ends.
        stays = operators.retry_failed(client, page=10)
        assert sorted(task["id"] for task in stays.changed) == sorted(dead)
        assert stays.refused == [] and stays.ok
        wait_until(lambda: len(client.tasks("failed", 10)) == 5)
        (live.data_dir / "README.md").rmdir()
        cut = operators.retry_failed(client, page=2, max_pages=1)
        assert len(cut.changed) == 2 and cut.more_left and not cut.ok
        rest = operators.retry_failed(client, page=2)  # three pages: 2, then 1, then none
        assert len(rest.changed) == 3 and not rest.more_left and rest.ok
    assert {t["id"] for t in cut.changed} | {t["id"] for t in rest.changed} == dead
    wait_until(lambda: len(live.read("README.md").decode().split("\n## ")) == 6)
    assert operators.format_failed_summary(cut).plain.startswith("retried 2 failed tasks; the ")


def test_cancel_a_sleeping_task_and_it_is_never_written(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=1.5)
    response = httpx.post(f"{live.url}/send-notification/a@example.com", params={"q": "x"})
    request_id = response.headers["x-request-id"]
    first, second = wait_until(lambda: record(live, request_id)["tasks"])
    result = cli("cancel", first["id"], "--url", live.url)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout
        == f"cancelled {first['id']}: 'found query: x\\n' → log.txt is never written\n"
    )
    tasks = wait_until(lambda: ended_tasks(live, request_id), timeout=15)
    assert [t["status"] for t in tasks] == ["cancelled", "done"]
    assert live.read("log.txt") == b"message to a@example.com\n"  # only the other line

    refused = cli("cancel", second["id"], "nope-2", first["id"], "--url", live.url)
    assert refused.returncode == EXIT_FAILED
    assert error_lines(refused.stderr) == [
        f"Error: task {second['id']} cannot be cancelled: it is already done",
        "Error: no task 'nope-2' in the registry",
        f"Error: task {first['id']} cannot be cancelled: it is already cancelled",
    ]
    assert refused.stdout == ""


def test_a_retrying_task_is_listed_by_its_status_and_can_be_cancelled(
    start_server: Callable[..., LiveServer],
) -> None:
    # Many attempts, each a quick failure followed by a wait of up to 30 s: retrying throughout.
    live = start_server(retry_base=30, retry_max=30, max_attempts=100)
    (live.data_dir / "README.md").mkdir(parents=True)
    response = httpx.post(f"{live.url}/background_tasks", params={"framework": "Flask"})
    request_id = response.headers["x-request-id"]
    wait_until(lambda: record(live, request_id)["tasks"][0]["status"] == "retrying")
    listed = cli("tasks", "--status", "retrying", "--json", "--url", live.url)
    assert listed.returncode == 0, listed.stderr
    (task,) = json.loads(listed.stdout)
    assert task["request_id"] == request_id and task["next_attempt_at"] > task["queued_at"]
    assert "README.md is a directory" in task["last_error"]
    table = cli("tasks", "--status", "retrying", "--url", live.url, env=cli_env(COLUMNS="80"))
    assert " retrying " in table.stdout and "next attempt at " in table.stdout, table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines())

    cancelled = cli("cancel", task["id"], "--url", live.url)
    assert cancelled.returncode == 0, cancelled.stderr
    (live.data_dir / "README.md").rmdir()
    gone = json.loads(cli("tasks", "--status", "cancelled", "--json", "--url", live.url).stdout)
    assert [t["id"] for t in gone] == [task["id"]] and gone[0]["next_attempt_at"] is None
    assert json.loads(cli("tasks", "-s", "retrying", "--json", "--url", live.url).stdout) == []
    assert live.read("README.md") == b""


def test_the_token_is_sent_when_set_and_never_shown(dead_letters: LiveServer) -> None:
    live = dead_letters
    dead = dead_readme(live, "Token")
    env = cli_env(BGTASKS_ADMIN_TOKEN=TOKEN)
    shown = cli("retry", dead["id"], "nope-3", "--url", live.url, env=env)
    assert shown.returncode == EXIT_FAILED  # nope-3 is refused; the task is retried
    assert shown.stdout.startswith(f"retried {dead['id']}: ")
    assert TOKEN not in shown.stdout + shown.stderr
    helped = cli("retry", "--help", env=env)
    assert "BGTASKS_ADMIN_TOKEN" in helped.stdout and TOKEN not in helped.stdout

    sent: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.raw_path.decode(), request.headers.get("authorization")))
        body: list[object] | dict[str, Any] = (
            [] if request.method == "GET" else {**dead, "status": "queued"}
        )
        return httpx.Response(200, json=body, headers={"x-request-id": "r-1"})

    with Client("http://bgtasks.test", token=TOKEN, transport=httpx.MockTransport(handler)) as c:
        c.tasks("failed")
        c.retry(dead["id"])
        c.cancel("a/b")
    assert sent == [
        ("/tasks?limit=50&status=failed", None),  # reads go without it
        (f"/tasks/{dead['id']}/retry", f"Bearer {TOKEN}"),
        ("/tasks/a%2Fb/cancel", f"Bearer {TOKEN}"),
    ]


class Forbidden(Canned):
    """A bgtasks server that refuses this client: not on loopback, and no (valid) token."""

    status = 403
    content_type = "application/json"
    body = json.dumps(
        {"detail": "retrying and cancelling tasks is for requests from this"}
    ).encode()
    request_id = "r-403"


def test_a_403_is_one_line_with_a_hint_and_stops_at_once() -> None:
    with http_server(Forbidden) as url:
        result = cli("cancel", "a1b2c3d4-1", "a1b2c3d4-2", "--url", url)
    assert result.returncode == EXIT_FAILED, result.stderr
    line = assert_one_error_line(result.stderr)
    assert line == (
        "Error: POST /tasks/a1b2c3d4-1/cancel: 403 retrying and cancelling tasks is for"
        " requests from this"
    )
    assert "hint: from another machine, set BGTASKS_ADMIN_TOKEN (or --token)" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("retry",), "give either TASK_ID... or --failed"),
        (("retry", "a-1", "--failed"), "give either TASK_ID... or --failed"),
        (("cancel",), "give the ids of the tasks to cancel"),
        (("retry", "a/1"), "'a/1' is not a task id"),
        (("cancel", "a-1", "--token", "two words"), "the token holds spaces"),
    ],
)
def test_bad_input_is_refused_before_any_request(args: tuple[str, ...], words: str) -> None:
    result = cli(*args, "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert words in assert_one_error_line(result.stderr)
    assert "two words" not in result.stderr and result.stdout == ""


def test_no_server_is_exit_3() -> None:
    result = cli("retry", "--failed", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == EXIT_UNREACHABLE
    assert "no bgtasks server answers" in assert_one_error_line(result.stderr)
