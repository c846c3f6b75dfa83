"""Re-drive and cancel tasks: `bgtasks retry` and `bgtasks cancel` over the server's
`POST /tasks/{id}/retry` and `POST /tasks/{id}/cancel`. Plain functions over a `Client`: each
id is asked on its own, and a refusal of one (409, 404) never stops the others. A 403 does
(no other id can pass either), and so does a server that stops answering.

No printing here: `format_*` give the lines, the commands print them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from bgtasks_cli.client import Client
from bgtasks_cli.errors import Refused

PAGE = 1000
"""Failed tasks asked for at a time (the most `GET /tasks` lists)."""
MAX_PAGES = 1000
"""`retry --failed` stops after this many pages (a million tasks) and says so."""


@dataclass(slots=True)
class Refusal:
    task_id: str
    status: int
    reason: str


@dataclass(slots=True)
class Results:
    """What became of each id: the tasks the server changed, and the ids it refused."""

    changed: list[dict[str, Any]] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    more_left: bool = False  # retry --failed: failed tasks may be left that it did not reach

    @property
    def ok(self) -> bool:
        return not self.refused and not self.more_left


Each = Callable[[str], dict[str, Any]]
Seen = Callable[[dict[str, Any] | Refusal], None]


def apply(call: Each, task_ids: Iterable[str], results: Results, seen: Seen | None = None) -> None:
    """`call` (Client.retry or Client.cancel) for each id in turn, into `results`; `seen` is
    told of each outcome as it comes. A 403 is raised: it would refuse every id alike."""
    for task_id in task_ids:
        try:
            task = call(task_id)
        except Refused as exc:
            if exc.status == 403:
                raise
            refusal = Refusal(task_id, exc.status, exc.reason)
            results.refused.append(refusal)
            if seen:
                seen(refusal)
            continue
        results.changed.append(task)
        if seen:
            seen(task)


def retry_failed(
    client: Client, *, page: int = PAGE, max_pages: int = MAX_PAGES, seen: Seen | None = None
) -> Results:
    """Retry every task `GET /tasks?status=failed` lists, a page at a time, until a page holds
    none it has not retried already: a task that fails again while this runs (its fault still
    there) is listed again, and is not retried twice. If such tasks fill a whole page, older
    failed tasks may lie behind them: `more_left` says so."""
    results = Results()
    asked: set[str] = set()
    for _ in range(max_pages):
        listed = client.tasks("failed", page)
        fresh = [task["id"] for task in listed if task["id"] not in asked]
        if not fresh:
            results.more_left = len(listed) == page
            return results
        asked.update(fresh)
        apply(client.retry, fresh, results, seen)
    results.more_left = True
    return results


def _what(task: dict[str, Any]) -> str:
    return f"{task['line']!r} → {task['file']}"


def format_retried(task: dict[str, Any]) -> Text:
    """A task given a fresh set of attempts, and what it writes."""
    return Text.assemble(("retried ", "green"), (task["id"], "bold"), f": {_what(task)}")


def format_cancelled(task: dict[str, Any]) -> Text:
    """A task cancelled, and what it would have written."""
    return Text.assemble(
        ("cancelled ", "magenta"), (task["id"], "bold"), f": {_what(task)} is never written"
    )


def format_failed_summary(results: Results) -> Text:
    """How many failed tasks `retry --failed` retried, and what was left."""
    done, refused = len(results.changed), len(results.refused)
    if not done and not refused:
        text = Text("no failed tasks to retry")
    else:
        text = Text(f"retried {done} failed task{'s' * (done != 1)}")
        if refused:
            text.append(f"; {refused} refused (see above)")
    if results.more_left:
        text.append(
            "; the failed tasks listed last all failed again, and older ones may lie behind"
            " them: fix the fault and run it again",
            style="yellow",
        )
    return text


def results_json(results: Results, action: str) -> dict[str, Any]:
    """`--json`: the tasks as the server now has them, and each refusal with its reason."""
    return {
        action: results.changed,
        "refused": [
            {"id": r.task_id, "status_code": r.status, "reason": r.reason} for r in results.refused
        ],
        "more_left": results.more_left,
    }
