"""Fire one request and follow its tasks live: what `notify`, `readme` and the demos print
while the work happens after the response."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bgtasks_cli.options import print_json
from server.status import ENDED

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from bgtasks_cli.client import Client, Fired, Outcome


def run_request(
    client: Client,
    path: str,
    params: dict[str, Any] | None,
    *,
    wait: bool,
    timeout: float,
    as_json: bool,
    out: Console,
    table: bool = False,
    max_attempts: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """Fire one request; print the response the moment it arrives, then follow its tasks:
    each attempt that fails and is tried again, each task as it ends; then show its timeline
    (the picture, or with `table` the table of its events) and the verdict.

    `max_attempts` (the server's, when known) is named in the attempts' lines; `on_record` is
    called with each new state of the request's record, after it is shown."""
    from bgtasks_cli import attempts, render

    if as_json:
        outcome = client.run(path, params, wait=wait, timeout=timeout)
        print_json(render.outcome_json(outcome))
        return outcome

    if not wait:
        outcome = client.run(path, params, wait=False, timeout=timeout)
        out.print(render.response_line(outcome.fired))
        return outcome

    shown: set[str] = set()
    failures: set[tuple[str, int, float]] = set()
    status = out.status("waiting for the background tasks…")

    def on_response(fired: Fired) -> None:
        out.print(render.response_line(fired))
        status.start()

    def on_update(fired: Fired, record: dict[str, Any]) -> None:
        since = fired.client_received_at
        for task, failure in attempts.new_failures(record, failures):
            out.print(attempts.failure_line(task, failure, since, max_attempts, width=out.width))
        tasks = record.get("tasks", [])
        for task in tasks:
            if task["status"] in ENDED and task["id"] not in shown:
                shown.add(task["id"])
                out.print(render.task_line(task, since, width=out.width))
        status.update(attempts.waiting_for(tasks, max_attempts))
        if on_record:
            on_record(record)

    try:
        outcome = client.run(
            path, params, wait=True, timeout=timeout, on_update=on_update, on_response=on_response
        )
    finally:
        status.stop()
    out.print(timeline_view(outcome, table=table, width=out.width))
    out.print(render.verdict(outcome))
    return outcome


def timeline_view(outcome: Outcome, *, table: bool, width: int) -> RenderableType:
    """The followed request's timeline: its picture, or with `table` its events as a table."""
    import time

    from bgtasks_cli import picture, render

    if table:
        return render.timeline(outcome.record, outcome.fired)
    # A task that did not end in time is drawn up to now.
    return picture.draw_outcome(outcome, width=width, now=time.time())
