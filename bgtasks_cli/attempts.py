"""A task's attempts as the CLI tells them: a line for each attempt that failed and was tried
again, and what a follow waits for. Pure functions of their arguments, like `render.py`.

`max_attempts` is the server's BGTASKS_MAX_ATTEMPTS when the caller knows it (the demo sets
it); the API does not say it, so `notify` leaves it out rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from rich.text import Text

from bgtasks_cli.render import STATUS_STYLE, clock, indented, span
from server.status import ENDED, TaskStatus


def new_failures(
    record: Mapping[str, Any], seen: set[tuple[str, int, float]]
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Each (task, failure) of `record` not in `seen` yet, oldest first; adds them to it. A
    failure is known by its time too: a task an operator retried counts its attempts anew."""
    for task in sorted(record.get("tasks", []), key=lambda t: t["seq"]):
        for failure in task.get("failures") or []:
            key = (task["id"], failure["attempt"], failure["failed_at"])
            if key not in seen:
                seen.add(key)
                yield task, failure


def _of(max_attempts: int | None) -> str:
    return f" of {max_attempts}" if max_attempts else ""


def _wait(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def next_attempt(task: Mapping[str, Any], failure: Mapping[str, Any]) -> str:
    """How long after `failure` the next attempt is due: from the task's `next_attempt_at`
    while it waits, or (if the follow looked only once it had begun) from when it began."""
    failed_at = failure["failed_at"]
    if task["status"] == TaskStatus.RETRYING and task.get("attempts") == failure["attempt"]:
        due = task.get("next_attempt_at")
        if due is None:
            return "the next once an earlier task of its request has ended"
        return f"the next in {_wait(max(0.0, due - failed_at))}"
    later = [f for f in task.get("failures") or [] if f["attempt"] > failure["attempt"]]
    started = later[0].get("started_at") if later else task.get("started_at")
    if started is not None and started >= failed_at:
        return f"the next in {_wait(started - failed_at)}"
    return "tried again"


def failure_line(
    task: Mapping[str, Any],
    failure: Mapping[str, Any],
    since: float,
    max_attempts: int | None = None,
    *,
    width: int = 80,
) -> Text:
    """A failed attempt that will be tried again, shown like a finished task (when, how long
    after the response arrived, what it writes), then the attempt, its error and the next,
    indented under it in lines of at most `width` columns."""
    failed_at = failure["failed_at"]
    said = (
        f"attempt {failure['attempt']}{_of(max_attempts)} failed: {failure['error']}; "
        f"{next_attempt(task, failure)}"
    )
    return Text.assemble(
        (f"{'retrying':>9}", STATUS_STYLE[TaskStatus.RETRYING]),
        f" {clock(failed_at)} ",
        (f"{span(failed_at - since):>12}", "dim"),
        f"  {task['line']!r} → {task['file']}\n",
        (indented(said, width), "red"),
    )


def waiting_for(tasks: list[dict[str, Any]], max_attempts: int | None = None) -> str:
    """The follow's status line: how many tasks it waits for and, when the first of them is
    between attempts, when its next attempt is due."""
    left = sorted((t for t in tasks if t["status"] not in ENDED), key=lambda t: t["seq"])
    if not left:
        return "waiting for the request's record…"
    count = f"{len(left)} background task{'s' * (len(left) != 1)}"
    first = left[0]
    number, tried = first["seq"] + 1, first.get("attempts") or 0
    if first["status"] == TaskStatus.RETRYING and first.get("next_attempt_at"):
        due = f"{tried + 1}{_of(max_attempts)} at {clock(first['next_attempt_at'])}"
        return f"waiting for {count}: task {number}'s attempt {due}…"
    if first["status"] == TaskStatus.RUNNING and tried > 1:
        return f"waiting for {count}: task {number} is on attempt {tried}{_of(max_attempts)}…"
    return f"waiting for {count}…"
