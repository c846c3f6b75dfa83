"""The tasks table of `bgtasks tasks`: one row per task, for a terminal of a given width. A
pure function of its arguments, like `render.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.text import Text

from bgtasks_cli.ids import short_id
from bgtasks_cli.render import STATUS_STYLE, clock, ms
from server.status import SUCCEEDED, TaskStatus

if TYPE_CHECKING:
    # Imported where the table is built: it is ~10 ms of start-up.
    from rich.table import Table


# The tasks table's columns, and the order they give way in on a narrow terminal: the start
# and queue times first (the waited and ran spans hold what they tell), the writes never.
TASK_COLUMNS = (
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
)
DROPPED_FIRST = ("started", "queued", "waited", "ran", "finished", "request", "attempts", "runs on")
# Shown after "attempts" only when the tasks run in more than one place (host/owner).
RUNS_ON = "runs on"
MIN_WRITES = 24  # what a folded "writes" cell needs to stay readable: a line and its file
RIGHT_ALIGNED = frozenset({"attempts", "waited", "ran"})


def _runs_on(task: dict[str, Any]) -> str:
    """The host and owner (server process) that runs the task, as `host/owner`."""
    host, owner = task.get("host"), task.get("owner")
    return f"{host or '?'}/{owner}" if owner else (host or "-")


def _task_cells(task: dict[str, Any]) -> dict[str, str | Text]:
    queued, started, finished = task["queued_at"], task.get("started_at"), task.get("finished_at")
    writes = f"{task['line']!r} → {task['file']}"
    if task.get("last_error") and task["status"] not in SUCCEEDED:
        writes += f"\n{task['last_error']}"
    if task["status"] == TaskStatus.RETRYING:
        due = task.get("next_attempt_at")
        writes += f"\nnext attempt at {clock(due)}" if due else "\nwaits for an earlier task"
    return {
        "task": task["id"],
        "request": short_id(task["request_id"]),
        "status": Text(task["status"], style=STATUS_STYLE.get(task["status"], "")),
        "attempts": str(task.get("attempts") or 0),
        "runs on": _runs_on(task),
        "writes": writes,
        "queued": clock(queued),
        "started": clock(started),
        "finished": clock(finished),
        "waited": ms(started - queued) if started else "-",
        "ran": ms(finished - started) if finished and started else "-",
    }


def _fitting_columns(
    rows: list[dict[str, str | Text]], width: int, columns: Sequence[str] = TASK_COLUMNS
) -> list[str]:
    """The `columns` that leave "writes" at least MIN_WRITES wide in `width` characters."""
    need = {
        name: max([len(name)] + [len(str(row[name])) for row in rows]) + 3  # padding, border
        for name in columns
        if name != "writes"
    }
    shown = list(columns)
    for name in DROPPED_FIRST:
        fixed = sum(need[c] for c in shown if c != "writes") + 4  # writes' padding and edges
        if fixed + MIN_WRITES <= width:
            break
        if name in shown:
            shown.remove(name)
    return shown


def tasks_table(
    tasks: Sequence[dict[str, Any]], title: str = "recent tasks", *, width: int = 200
) -> Table:
    """Recent tasks as a table for a terminal `width` characters wide: at 80 or fewer the
    times give way (the caption says which), while each status stays whole and what a task
    writes stays readable. Where a task runs (host/owner) is shown once the tasks run in
    more than one place: with one server it says nothing."""
    from rich.table import Table

    rows = [_task_cells(task) for task in tasks]
    places = {row[RUNS_ON] for row in rows}
    columns = list(TASK_COLUMNS)
    if len(places) > 1:
        columns.insert(columns.index("attempts") + 1, RUNS_ON)
    shown = _fitting_columns(rows, width, columns)
    table = Table(title=title, title_justify="left")
    for name in shown:
        if name == "writes":
            table.add_column(name, overflow="fold", min_width=MIN_WRITES)
        else:
            table.add_column(
                name, no_wrap=True, justify="right" if name in RIGHT_ALIGNED else "left"
            )
    for row in rows:
        table.add_row(*(row[name] for name in shown))
    hidden = [name for name in columns if name not in shown]
    if not tasks:
        table.caption = "no tasks yet"
    elif hidden:
        table.caption = f"not shown at this width: {', '.join(hidden)} (see --json)"
        table.caption_justify = "left"
    return table
