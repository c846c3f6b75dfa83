"""What `notify` and `readme` show of retries (issue #16, CLI side), through the real console
script against live servers: each failed attempt as it fails, with its error and when the next
is due; the follow going on while a task is retrying; a task that heals is a success (exit 0,
"after N attempts"), one that dies or is cancelled is not (exit 1). Then the pure pieces on
fixed records: the attempts' lines, the status line, the verdicts and the tasks table."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
from rich.console import Console, RenderableType

from bgtasks_cli import attempts, render, tasks_table
from bgtasks_cli.errors import EXIT_FAILED
from tests.cli_helpers import RUN_TIMEOUT, Lines, at, cli, cli_env, cli_popen, outcome, task
from tests.cli_helpers import popen_cleanup as popen_cleanup  # a fixture
from tests.helpers import LiveServer, wait_until

ATTEMPT = re.compile(r"^ +attempt (\d+) failed: (.*); the next (in \d+ ms|in [\d.]+ s|.*)$")
FAULT = "NotARegularFile: log.txt is a directory, not a regular file"
CLOCK = r"\d\d:\d\d:\d\d\.\d{3}"


def show(renderable: RenderableType, width: int = 120) -> str:
    console = Console(width=width, record=True, color_system=None, highlight=False)
    console.print(renderable)
    return console.export_text()


def request_id_in(out: str) -> str:
    found = re.search(r"request (\S+)", out)
    assert found, out
    return found.group(1)


def test_notify_shows_each_failed_attempt_and_ends_when_the_task_heals(
    start_server: Callable[..., LiveServer], popen_cleanup: list[subprocess.Popen[str]]
) -> None:
    # Each attempt sleeps 0.3 s before it writes: time for the fault to go between two.
    live = start_server(delay=0.3, retry_base=0.2, retry_max=0.4, max_attempts=20)
    fault = live.data_dir / "log.txt"
    fault.mkdir(parents=True)
    proc = cli_popen("notify", "a@example.com", "--q", "hi", "--url", live.url)
    popen_cleanup.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    out = Lines(proc.stdout)
    out.until(lambda line: line.startswith("POST /send-notification/a@example.com → 200 in "))
    first = out.until(lambda line: "attempt 1 failed" in line)
    assert ATTEMPT.match(first) and FAULT in first, first
    out.until(lambda line: "attempt 2 failed" in line)
    fault.rmdir()  # the fault heals: a later attempt writes the line
    assert proc.wait(timeout=RUN_TIMEOUT) == 0, proc.stderr.read()
    text = "".join(out.rest())
    assert "Traceback" not in proc.stderr.read()

    body = httpx.get(f"{live.url}/requests/{request_id_in(text)}").json()
    healed, second = body["tasks"]
    assert [healed["status"], second["status"]] == ["done", "done"]
    assert healed["attempts"] >= 3 and second["attempts"] == 1
    # One line per failed attempt, in order, each with the task it belongs to above it.
    lines = text.splitlines()
    shown = [int(m.group(1)) for line in lines if (m := ATTEMPT.match(line))]
    assert shown == [f["attempt"] for f in healed["failures"]] == list(range(1, healed["attempts"]))
    for n, line in enumerate(lines):
        if ATTEMPT.match(line):
            assert re.match(
                r" retrying \d\d:\d\d:\d\d\.\d{3} .*'found query: hi\\n' → log.txt$", lines[n - 1]
            ), lines[n - 1]
    after = f"after {healed['attempts']} attempts"
    assert re.search(rf"^ +done {CLOCK} .*'found query: hi\\n' → log.txt\n +{after}$", text, re.M)
    assert re.search(
        rf"✓ response returned [\d,]+ ms before the last write finished; task 1 {after}", text
    )
    # The picture draws every attempt.
    assert all(f"  try {n} " in text for n in range(2, healed["attempts"] + 1))
    assert live.read("log.txt") == b"found query: hi\nmessage to a@example.com\n"


def test_readme_of_a_task_that_dies_exits_1_after_its_attempts(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=0.1, retry_base=0.05, retry_max=0.1, max_attempts=3)
    (live.data_dir / "README.md").mkdir(parents=True)
    result = cli("readme", "Flask", "--url", live.url)
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    out = result.stdout
    error = "NotARegularFile: README.md is a directory, not a regular file"
    assert [int(m.group(1)) for line in out.splitlines() if (m := ATTEMPT.match(line))] == [1, 2]
    assert re.search(
        rf"^ +failed {CLOCK} .*→ README.md\n +after 3 attempts: {error}$",
        out,
        re.MULTILINE,
    ), out
    assert f"✗ 1 of 1 tasks failed after 3 attempts: {error}" in out
    assert "response returned" not in out
    assert not any((live.data_dir / "README.md").iterdir())  # the fault, still, and empty


def test_the_timeout_still_bounds_a_follow_of_a_retrying_task(
    start_server: Callable[..., LiveServer],
) -> None:
    # Each failure waits up to 30 s before the next attempt: retrying past the timeout (and
    # past the server's stop, which leaves it in the registry).
    live = start_server(retry_base=30, retry_max=30, max_attempts=100, drain_timeout=0.2)
    (live.data_dir / "log.txt").mkdir(parents=True)
    result = cli("notify", "a@example.com", "--timeout", "1", "--url", live.url)
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    out = result.stdout
    assert ATTEMPT.match(next(line for line in out.splitlines() if "attempt 1 failed" in line))
    assert "✗ 1 task did not finish in time" in out
    assert "… not ended yet" in out  # the picture draws its wait up to now


def test_a_task_cancelled_while_notify_follows_is_not_a_success(
    start_server: Callable[..., LiveServer], popen_cleanup: list[subprocess.Popen[str]]
) -> None:
    live = start_server(delay=1.5)
    proc = cli_popen("notify", "a@example.com", "--q", "x", "--url", live.url)
    popen_cleanup.append(proc)
    assert proc.stdout is not None
    out = Lines(proc.stdout)
    request_id = request_id_in(out.until(lambda line: "Message sent  request " in line))
    first = wait_until(lambda: httpx.get(f"{live.url}/requests/{request_id}").json()["tasks"])[0]
    assert cli("cancel", first["id"], "--url", live.url).returncode == 0
    assert proc.wait(timeout=RUN_TIMEOUT) == EXIT_FAILED
    text = "".join(out.rest())
    assert re.search(
        r"^cancelled \d\d:\d\d:\d\d\.\d{3} .*'found query: x\\n' → log.txt$", text, re.MULTILINE
    ), text
    assert "✗ 1 of 2 tasks was cancelled: never written" in text
    assert "✓" not in text  # before: "✓ response returned ... before the last write finished"
    assert live.read("log.txt") == b"message to a@example.com\n"


def test_notify_json_has_each_task_s_attempts_and_failures(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(retry_base=0.05, retry_max=0.1, max_attempts=2)
    (live.data_dir / "log.txt").mkdir(parents=True)
    result = cli("notify", "a@example.com", "--json", "--url", live.url, env=cli_env())
    assert result.returncode == EXIT_FAILED
    (dead,) = json.loads(result.stdout)["server"]["tasks"]
    assert dead["status"] == "failed" and dead["attempts"] == 2
    assert [f["attempt"] for f in dead["failures"]] == [1] and dead["failures"][0]["error"] == FAULT
    assert dead["last_error"] == FAULT and dead["next_attempt_at"] is None


# --- the pure pieces, on fixed records --------------------------------------------------------


def failing(**fields: Any) -> dict[str, Any]:
    """Task 1 of a request, its first attempt failed at +300 ms."""
    failure = {"attempt": 1, "started_at": at(100), "failed_at": at(300), "error": FAULT}
    return task(0, **{"attempts": 1, "failures": [failure], "last_error": FAULT, **fields})


def test_a_failed_attempt_says_when_the_next_is_due() -> None:
    waiting = failing(status="retrying", next_attempt_at=at(1600))
    (failure,) = waiting["failures"]
    line = attempts.failure_line(waiting, failure, since=at(5), max_attempts=5, width=80)
    text = show(line, width=80)
    assert text.splitlines() == [
        f" retrying {render.clock(at(300))}    +295.0 ms  'line 1\\n' → log.txt",
        "           attempt 1 of 5 failed: NotARegularFile: log.txt is a directory, not a",
        "           regular file; the next in 1.3 s",
    ]
    # Seen only once the next attempt had begun: when it began.
    running = failing(status="running", next_attempt_at=None, started_at=at(700), attempts=2)
    assert attempts.next_attempt(running, failure) == "the next in 400 ms"
    # Behind an earlier task of its request: no time of its own.
    held = failing(status="retrying", next_attempt_at=None)
    assert attempts.next_attempt(held, failure) == (
        "the next once an earlier task of its request has ended"
    )
    assert "attempt 1 failed: " in show(attempts.failure_line(held, failure, since=at(5)))


def test_new_failures_are_each_given_once() -> None:
    seen: set[tuple[str, int, float]] = set()
    one = {"tasks": [failing(status="retrying")]}
    assert [f["attempt"] for _, f in attempts.new_failures(one, seen)] == [1]
    assert list(attempts.new_failures(one, seen)) == []
    two = failing(status="retrying")
    two["failures"].append(
        {"attempt": 2, "started_at": at(900), "failed_at": at(1100), "error": FAULT}
    )
    assert [f["attempt"] for _, f in attempts.new_failures({"tasks": [two]}, seen)] == [2]


def test_the_status_line_says_what_the_follow_waits_for() -> None:
    due = failing(status="retrying", next_attempt_at=at(1600))
    behind = task(1, status="queued")
    assert attempts.waiting_for([due, behind], max_attempts=5) == (
        f"waiting for 2 background tasks: task 1's attempt 2 of 5 at {render.clock(at(1600))}…"
    )
    again = failing(status="running", attempts=3)
    assert attempts.waiting_for([again]) == "waiting for 1 background task: task 1 is on attempt 3…"
    assert attempts.waiting_for([task(0, status="queued"), behind]) == (
        "waiting for 2 background tasks…"
    )
    assert attempts.waiting_for([task(0)]) == "waiting for the request's record…"


def test_verdicts_name_the_attempts_and_a_cancelled_task_fails() -> None:
    record = {"received_at": at(1), "response_sent_at": at(4)}
    healed = task(0, attempts=3, started_at=at(900), finished_at=at(1100))
    once = task(1, attempts=1, started_at=at(1100), finished_at=at(1300))
    done = outcome(sent=at(0), received=at(5), record={**record, "tasks": [healed, once]})
    assert done.ok
    assert render.verdict(done).plain == (
        "✓ response returned 1,295 ms before the last write finished; task 1 after 3 attempts"
    )
    dead = failing(status="failed", attempts=5, finished_at=at(3000))
    lost = outcome(sent=at(0), received=at(5), record={**record, "tasks": [dead]})
    assert render.verdict(lost).plain == f"✗ 1 of 1 tasks failed after 5 attempts: {FAULT}"
    cancelled = task(0, status="cancelled", finished_at=at(200))
    gone = outcome(sent=at(0), received=at(5), record={**record, "tasks": [cancelled, once]})
    assert not gone.ok
    assert render.verdict(gone).plain == "✗ 1 of 2 tasks was cancelled: never written"


def test_the_tasks_table_shows_attempts_and_the_next_one_at_80_columns() -> None:
    rows = [
        failing(status="retrying", next_attempt_at=at(1600), attempts=2),
        task(1, status="retrying", attempts=1, last_error=FAULT, next_attempt_at=None),
        task(2, status="done", attempts=3, last_error=FAULT, started_at=at(1), finished_at=at(2)),
        task(3, status="cancelled", finished_at=at(5)),
    ]
    text = show(tasks_table.tasks_table(rows, width=80), width=80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    cells = [cell.strip() for cell in header.strip("┃").split("┃")]
    assert cells == ["task", "request", "status", "attempts", "writes"]
    body = [line for line in text.splitlines() if line.startswith("│")]
    column = [line.strip("│").split("│")[3].strip() for line in body]
    assert [c for c in column if c] == ["2", "1", "3", "0"]
    flat = " ".join(text.split())
    assert f"next attempt at {render.clock(at(1600))}" in flat
    assert "waits for an earlier task" in flat
    # A task that healed shows no error; one still retrying does.
    assert flat.count("NotARegularFile") == 2
    assert [line.strip("│").split("│")[2].strip() for line in body if "…" in line] == [
        "retrying",
        "retrying",
        "done",
        "cancelled",
    ]


def test_the_table_of_events_lists_each_attempt() -> None:
    failures = [
        {"attempt": 1, "started_at": at(4.5), "failed_at": at(300), "error": FAULT},
        {"attempt": 2, "started_at": at(600), "failed_at": at(800), "error": FAULT},
    ]
    healed = task(0, attempts=3, failures=failures, started_at=at(1200), finished_at=at(1400))
    after = task(1, queued_at=at(3), attempts=1, started_at=at(1400), finished_at=at(1600))
    record = {"received_at": at(1), "response_sent_at": at(4), "tasks": [healed, after]}
    done = outcome(sent=at(0), received=at(5), record=record)
    text = show(render.timeline(done.record, done.fired))
    rows = [(event, detail) for _, event, detail in table_rows(text)]
    assert [event for event, _ in rows] == [
        "client sent request",
        "server got request",
        "task 1 queued",
        "task 2 queued",
        "server sent response",
        "task 1 try 1 started",
        "client got response",
        "task 1 try 1 FAILED",
        "task 1 try 2 started",
        "task 1 try 2 FAILED",
        "task 1 try 3 started",
        "task 1 wrote",
        "task 2 started",
        "task 2 wrote",
    ]
    assert dict(rows)["task 1 try 2 FAILED"].startswith("NotARegularFile: log.txt is a")
    # Waiting to retry, its start is still its failed attempt's: no row of its own.
    waiting = task(0, status="retrying", attempts=1, failures=failures[:1], started_at=at(4.5))
    text = show(render.timeline({**record, "tasks": [waiting]}, done.fired))
    events = [event for _, event, _ in table_rows(text)]
    assert events[-2:] == ["client got response", "task 1 try 1 FAILED"]
    assert "task 1 started" not in events and events.count("task 1 try 1 started") == 1


def table_rows(text: str) -> list[tuple[str, str, str]]:
    """(+ms, event, detail) of each row of a rendered timeline (a detail's first line)."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if line.startswith("│") and len(cells) == 4 and cells[2]:
            rows.append((cells[1], cells[2], cells[3]))
    return rows
