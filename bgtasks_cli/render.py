"""Rich renderables for the CLI. Pure functions of their arguments: no I/O, no clock reads."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.text import Text

from bgtasks_cli.client import Fired, Outcome
from server.status import ENDED

if TYPE_CHECKING:
    # Imported where a table is built: `notify --no-wait` prints none, and it is ~10 ms of
    # start-up.
    from rich.table import Table

    from bgtasks_cli.tailer import TailEvent

STATUS_STYLE = {
    "queued": "yellow",
    "running": "blue",
    "done": "green",
    "recovered": "green",
    "failed": "bold red",
}
SOURCE_STYLE = {"log.txt": "cyan", "README.md": "magenta", "server": "yellow"}


def clock(at: float | None) -> str:
    """Local wall-clock time with milliseconds, e.g. 18:31:02.123."""
    if at is None:
        return "-"
    return dt.datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if abs(seconds) < 10 else f"{seconds * 1000:,.0f} ms"


def response_line(fired: Fired) -> Text:
    text = Text.assemble(
        (f"{fired.method} {fired.path}", "bold"),
        " → ",
        (str(fired.status), "green" if fired.status < 300 else "red"),
        f" in {ms(fired.elapsed_ms / 1000)}",
    )
    message = fired.body.get("message") if isinstance(fired.body, dict) else None
    text.append(f"\n  {message or ''}")
    text.append(f"  request {fired.request_id}", style="dim")
    return text


def task_line(task: dict[str, Any], since: float) -> Text:
    """One finished task, with how long after `since` (the response) it finished."""
    status = task["status"]
    finished = task.get("finished_at")
    after = f"+{ms(finished - since)}" if finished else ""
    text = Text.assemble(
        (f"{status:>9}", STATUS_STYLE.get(status, "")),
        f" {clock(finished)} ",
        (f"{after:>12}", "dim"),
        f"  {task['line']!r} → {task['file']}",
    )
    if task.get("error"):
        text.append(f"\n           {task['error']}", style="red")
    return text


def timeline(outcome: Outcome) -> Table:
    """Every moment of one request, client and server side, in time order."""
    fired, record = outcome.fired, outcome.record
    events: list[tuple[float, str, str]] = [
        (fired.sent_at, "client sent request", f"{fired.method} {fired.path}"),
        (fired.received_at, "client got response", str(fired.status)),
    ]
    if record.get("received_at"):
        events.append((record["received_at"], "server got request", ""))
    if record.get("response_sent_at"):
        events.append((record["response_sent_at"], "server sent response", "last byte"))
    for task in outcome.tasks:
        n, what = task["seq"] + 1, f"{task['line']!r} → {task['file']}"
        events.append((task["queued_at"], f"task {n} queued", what))
        if task.get("started_at"):
            events.append((task["started_at"], f"task {n} started", ""))
        if task.get("finished_at"):
            failed = task["status"] == "failed"
            label = f"task {n} {'FAILED' if failed else 'wrote'}"
            events.append((task["finished_at"], label, str(task.get("error")) if failed else what))
    events.sort(key=lambda e: e[0])
    from rich.table import Table

    table = Table(title=f"timeline of request {fired.request_id}", title_justify="left")
    table.add_column("time", no_wrap=True)
    table.add_column("+ms", justify="right", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for at, event, detail in events:
        style = "red" if "FAILED" in event else ("green" if "wrote" in event else "")
        if event.startswith("client"):
            style = "bold"
        table.add_row(
            clock(at), f"{(at - fired.sent_at) * 1000:,.1f}", Text(event, style=style), detail
        )
    return table


def verdict(outcome: Outcome) -> Text:
    """One sentence on what happened, as measured."""
    tasks = outcome.tasks
    failed = [t for t in tasks if t["status"] == "failed"]
    unfinished = [t for t in tasks if t["status"] not in ENDED]
    if failed:
        return Text(
            f"✗ {len(failed)} of {len(tasks)} tasks failed: {failed[0].get('error')}",
            style="bold red",
        )
    if outcome.timed_out:
        left = len(unfinished)
        what = f"{left} task{'s' * (left != 1)} did" if left else "the request's record did"
        return Text(f"✗ {what} not finish in time", style="bold red")
    if not tasks:
        return Text("✓ no background task was queued for this request", style="bold green")
    last = max(t["finished_at"] for t in tasks)
    lead = last - outcome.fired.received_at
    if lead >= 0:
        return Text(
            f"✓ response returned {lead * 1000:,.0f} ms before the last write finished",
            style="bold green",
        )
    return Text(
        f"✓ all {len(tasks)} writes finished {-lead * 1000:,.0f} ms before the response"
        " arrived (no delay: the work was quicker than the round trip)",
        style="bold green",
    )


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    fired = outcome.fired
    tasks = outcome.tasks
    last = max((t["finished_at"] for t in tasks if t.get("finished_at")), default=None)
    return {
        "ok": outcome.ok,
        "request_id": fired.request_id,
        "method": fired.method,
        "path": fired.path,
        "status": fired.status,
        "body": fired.body,
        "sent_at": fired.sent_at,
        "received_at": fired.received_at,
        "latency_ms": round(fired.elapsed_ms, 3),
        "timed_out": outcome.timed_out,
        "response_before_last_write_ms": (
            round((last - fired.received_at) * 1000, 3) if last is not None else None
        ),
        "server": outcome.record or None,
    }


def tasks_table(tasks: Sequence[dict[str, Any]], title: str = "recent tasks") -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name, kwargs in (
        ("task", {"no_wrap": True}),
        ("request", {"no_wrap": True}),
        ("status", {"no_wrap": True}),
        ("writes", {"overflow": "fold"}),
        ("queued", {"no_wrap": True}),
        ("started", {"no_wrap": True}),
        ("finished", {"no_wrap": True}),
        ("waited", {"justify": "right", "no_wrap": True}),
        ("ran", {"justify": "right", "no_wrap": True}),
    ):
        table.add_column(name, **kwargs)
    for task in tasks:
        queued, started, finished = (
            task["queued_at"],
            task.get("started_at"),
            task.get("finished_at"),
        )
        status = Text(task["status"], style=STATUS_STYLE.get(task["status"], ""))
        writes = f"{task['line']!r} → {task['file']}"
        if task.get("error"):
            writes += f"\n{task['error']}"
        table.add_row(
            task["id"],
            task["request_id"][:12],
            status,
            writes,
            clock(queued),
            clock(started),
            clock(finished),
            ms(started - queued) if started else "-",
            ms(finished - started) if finished and started else "-",
        )
    if not tasks:
        table.caption = "no tasks yet"
    return table


def tail_line(event: TailEvent) -> Text:
    style = SOURCE_STYLE.get(event.source, "")
    text = Text.assemble((clock(event.at), "dim"), " ", (f"{event.source:<9}", style), " ")
    if event.kind == "line":
        text.append(event.text)
    elif event.kind == "event":
        text.append(event.text, style="yellow")
    else:
        text.append(f"[{event.text}]", style="dim italic")
    return text


def tail_json(event: TailEvent) -> dict[str, Any]:
    return {
        "at": event.at,
        "file": event.source,
        "kind": event.kind,
        "text": event.text,
        "request_id": event.request_id,
        "task_id": event.task_id,
    }


def banner(
    *,
    url: str,
    data_dir: Path,
    delay: float,
    workers: int,
    drain_timeout: float | None,
    version: str,
) -> RenderableType:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", justify="right")
    grid.add_column(overflow="fold")  # paths are shown whole, never cut to "…"
    grid.add_row("bgtasks", f"{version} serving at [link={url}]{url}[/link]")
    grid.add_row("API docs", f"{url}/docs")
    grid.add_row("data dir", str(data_dir))
    grid.add_row("files", f"{data_dir / 'log.txt'}\n{data_dir / 'README.md'}")
    grid.add_row("delay", f"{delay:g} s before each task writes")
    drain = "wait for every task" if drain_timeout is None else f"{drain_timeout:g} s"
    grid.add_row("workers", f"{workers} · drain on stop: {drain}")
    return Group(Text(""), grid, Text(""))
