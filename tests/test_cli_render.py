"""The CLI's renderers on fixed records (they are pure): timelines in the order things
happened, spans with their true sign, the tasks table at fixed widths, short ids that tell
requests apart, and tail's backlog lines marked as such."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from rich.console import Console, RenderableType

from bgtasks_cli import render, tasks_table
from bgtasks_cli.tailer import TailEvent
from server.status import TaskStatus
from tests.cli_helpers import (
    IDS,
    SAME_TIME,
    at,
    outcome,
    task,
)
from tests.helpers import LiveServer


def show(renderable: RenderableType, width: int = 120) -> str:
    console = Console(width=width, record=True, color_system=None, highlight=False)
    console.print(renderable)
    return console.export_text()


def timeline_rows(text: str) -> list[tuple[str, str]]:
    """(+ms, event) of each row of a rendered timeline."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if line.startswith("│") and len(cells) == 4:
            rows.append((cells[1], cells[2]))
    return rows


# --- timelines -------------------------------------------------------------------------------


def test_timeline_orders_by_cause_when_stamps_disagree() -> None:
    # Under load the server stamps its response after the client already got it, and the
    # task's start is stamped a hair before its queueing.
    done = outcome(
        sent=at(0),
        received=at(4.0),
        record={
            "received_at": at(1),
            "response_sent_at": at(4.9),
            "tasks": [task(0, queued_at=at(2), started_at=at(1.95), finished_at=at(6))],
        },
    )
    text = show(render.timeline(done.record, done.fired))
    rows = timeline_rows(text)
    assert [event for _, event in rows] == [
        "client sent request",
        "server got request",
        "task 1 queued",
        "task 1 started",
        "server sent response",
        "client got response",
        "task 1 wrote",
    ]
    plus = dict((event, value) for value, event in rows)
    # Shown at the time of the moment each must follow, marked, never earlier.
    assert plus["task 1 started"] == "2.0*"
    assert plus["client got response"] == "4.9*"
    assert plus["server sent response"] == "4.9"
    numbers = [float(value.rstrip("*").replace(",", "")) for value, _ in rows]
    assert numbers == sorted(numbers)
    assert "-" not in "".join(value for value, _ in rows)
    # The note gives what was measured.
    flat = " ".join(text.split())
    assert "* client got response: stamped 0.9 ms before “server sent response”" in flat
    assert "* task 1 started: stamped 0.1 ms before “task 1 queued”" in flat


def test_timeline_in_stamp_order_has_no_marks() -> None:
    done = outcome(
        sent=at(0),
        received=at(5.6),
        record={
            "received_at": at(1.5),
            "response_sent_at": at(4.2),
            "tasks": [
                task(0, queued_at=at(2.9), started_at=at(4.2), finished_at=at(1006.8)),
                task(1, queued_at=at(3.4), started_at=at(1007), finished_at=at(2009.1)),
            ],
        },
    )
    text = show(render.timeline(done.record, done.fired))
    assert [event for _, event in timeline_rows(text)] == [
        "client sent request",
        "server got request",
        "task 1 queued",
        "task 2 queued",
        "server sent response",
        "task 1 started",
        "client got response",
        "task 1 wrote",
        "task 2 started",
        "task 2 wrote",
    ]
    assert "*" not in text


def test_task_line_before_the_response_has_a_minus_not_a_plus() -> None:
    # With no delay, the write can end before the response reaches the client.
    finished = task(0, started_at=at(1.0), finished_at=at(1.1))
    line = render.task_line(finished, since=at(1.5)).plain
    assert "+-" not in line
    assert re.search(r"(?<![+\d])-0\.4 ms", line), line
    later = render.task_line(task(0, started_at=at(1), finished_at=at(1001.7)), since=at(0.5))
    assert "+1,001.2 ms" in later.plain
    assert render.span(0.00001) == "0.0 ms"
    assert render.span(-0.00001) == "0.0 ms"


# --- the tasks table -------------------------------------------------------------------------


def table_tasks() -> list[dict[str, Any]]:
    """Three requests made within the same microsecond, in every status."""
    rows = []
    statuses = [TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.DONE, TaskStatus.FAILED]
    statuses += [TaskStatus.RECOVERED]
    for n, status in enumerate(statuses):
        started = at(1000 * n + 3) if status != TaskStatus.QUEUED else None
        ended = status not in (TaskStatus.QUEUED, TaskStatus.RUNNING)
        rows.append(
            task(
                n,
                id=f"a1b2c3d4-{n + 100}",
                request_id=IDS[n % 3],
                status=status.value,
                line=f"message to user{n}@example.com\n",
                started_at=started,
                finished_at=at(1000 * n + 1004) if ended else None,
                last_error="IsADirectoryError: [Errno 21] Is a directory: 'README.md'"
                if status == TaskStatus.FAILED
                else None,
            )
        )
    return rows


def header_cells(text: str) -> list[str]:
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    return [cell.strip() for cell in header.strip("┃").split("┃")]


def column_lines(text: str, column: int) -> list[str]:
    """The text of one column in each body line of a rendered table."""
    return [
        line.strip("│").split("│")[column].strip()
        for line in text.splitlines()
        if line.startswith("│")
    ]


@pytest.mark.parametrize("width", [80, 100, 120, 200])
def test_tasks_table_stays_readable_at_fixed_widths(width: int) -> None:
    rows = table_tasks()
    text = show(tasks_table.tasks_table(rows, width=width), width=width)
    assert all(len(line) <= width for line in text.splitlines()), text
    cells = header_cells(text)
    for kept in ("task", "status", "writes"):
        assert kept in cells
    status_col, writes_col = cells.index("status"), cells.index("writes")
    statuses = [s for s in column_lines(text, status_col) if s]
    # Every status whole, on its own line.
    assert statuses == [t["status"] for t in rows]
    # The writes column is wide enough to read, and folding keeps every character.
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert len(header.strip("┃").split("┃")[writes_col]) - 2 >= tasks_table.MIN_WRITES
    # Folding breaks lines at spaces: compare what is left without them.
    writes = "".join("".join(column_lines(text, writes_col)).split())
    for t in rows:
        assert "".join(f"{t['line']!r} → {t['file']}".split()) in writes
    assert "IsADirectoryError" in writes
    hidden = [name for name in tasks_table.TASK_COLUMNS if name not in cells]
    if hidden:
        assert f"not shown at this width: {', '.join(hidden)}" in " ".join(text.split())
    if width >= 200:
        assert cells == list(tasks_table.TASK_COLUMNS)
    # The less useful columns give way first.
    order = list(tasks_table.DROPPED_FIRST)
    assert hidden == sorted(hidden, key=tasks_table.TASK_COLUMNS.index)
    assert set(hidden) == set(order[: len(hidden)])


def test_tasks_table_tells_requests_of_the_same_moment_apart() -> None:
    text = show(tasks_table.tasks_table(table_tasks()[:3], width=200), width=200)
    shown = column_lines(text, header_cells(text).index("request"))
    assert shown == [f"…{rid[-8:]}" for rid in IDS]
    assert SAME_TIME[:8] not in text


def test_every_status_has_a_style() -> None:
    assert set(render.STATUS_STYLE) == set(TaskStatus)


def test_tasks_command_at_80_columns(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    (live.data_dir / "README.md").mkdir(parents=True)
    for args in (["notify", "a@example.com", "--q", "x"], ["readme", "FastAPI"]):
        subprocess.run(
            [sys.executable, "-m", "bgtasks_cli", *args, "--json", "--url", live.url],
            capture_output=True,
            timeout=60,
            check=False,
        )
    result = subprocess.run(
        [sys.executable, "-m", "bgtasks_cli", "tasks", "--url", live.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert all(len(line) <= 80 for line in out.splitlines()), out
    statuses = [s for s in column_lines(out, header_cells(out).index("status")) if s]
    assert statuses == ["failed", "done", "done"]
    writes = "".join("".join(column_lines(out, header_cells(out).index("writes"))).split())
    assert "'messagetoa@example.com\\n'→log.txt" in writes
    assert "'\\n##FastAPI框架精讲'→README.md" in writes


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "NO_COLOR": "1"}


# --- tail ------------------------------------------------------------------------------------


def test_backlog_lines_are_marked_as_such() -> None:
    backlog = TailEvent(at(0), "log.txt", "line", "old line", backlog=True)
    live = TailEvent(at(1), "log.txt", "line", "new line")
    old_text, new_text = render.tail_line(backlog).plain, render.tail_line(live).plain
    assert old_text.split() == ["backlog", "log.txt", "old", "line"]
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} +log\.txt +new line$", new_text), new_text
    # Both start their text at the same column.
    assert old_text.index("log.txt") == new_text.index("log.txt")
    assert render.tail_json(backlog) == {
        "at": at(0),
        "backlog": True,
        "source": "log.txt",
        "kind": "line",
        "text": "old line",
        "request_id": None,
        "task_id": None,
    }
    assert render.tail_json(live)["backlog"] is False


def test_tasks_table_shows_where_tasks_run_once_they_run_in_two_places() -> None:
    base = {
        "request_id": "r" * 30,
        "seq": 0,
        "file": "log.txt",
        "line": "message to a\n",
        "status": "done",
        "queued_at": 1.0,
        "started_at": 1.1,
        "finished_at": 1.2,
        "attempts": 1,
    }
    one = {**base, "id": "3f2a9c1b-1", "owner": "3f2a9c1b", "host": "web-1"}
    other = {**base, "id": "3f2a9c1b-2", "owner": "0000000b", "host": "web-2"}

    def text(tasks: list[dict[str, Any]], width: int) -> str:
        console = Console(width=width, record=True, color_system=None)
        console.print(tasks_table.tasks_table(tasks, width=width))
        return console.export_text()

    assert "runs on" not in text([one, {**one, "id": "3f2a9c1b-3"}], 150)
    wide = text([one, other], 150)
    assert "runs on" in wide and "web-1/3f2a9c1b" in wide and "web-2/0000000b" in wide
    assert "web-2/0000000b" in text([one, other], 80)  # kept when the times give way
