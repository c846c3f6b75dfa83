"""Rich renderables for the CLI. Pure functions of their arguments: no I/O, no clock reads."""

from __future__ import annotations

import datetime as dt
import heapq
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.text import Text

from bgtasks_cli.client import Fired, Outcome
from server.status import ENDED, SUCCEEDED, TaskStatus

if TYPE_CHECKING:
    # Imported where a table is built: `notify --no-wait` prints none, and it is ~10 ms of
    # start-up.
    from rich.table import Table

    from bgtasks_cli.tailer import TailEvent

STATUS_STYLE = {
    TaskStatus.QUEUED: "yellow",
    TaskStatus.RUNNING: "blue",
    TaskStatus.RETRYING: "magenta",
    TaskStatus.DONE: "green",
    TaskStatus.RECOVERED: "green",
    TaskStatus.FAILED: "bold red",
    TaskStatus.CANCELLED: "dim",
}
SOURCE_STYLE = {"log.txt": "cyan", "README.md": "magenta", "events": "yellow"}


def clock(at: float | None) -> str:
    """Local wall-clock time with milliseconds, e.g. 18:31:02.123."""
    if at is None:
        return "-"
    return dt.datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if abs(seconds) < 10 else f"{seconds * 1000:,.0f} ms"


def span(seconds: float) -> str:
    """A signed span: `+1,001.2 ms` after, `-0.4 ms` before, `0.0 ms` too short to tell."""
    size = ms(abs(seconds))
    if size == ms(0):
        return size
    return f"{'+' if seconds > 0 else '-'}{size}"


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


def task_line(task: dict[str, Any], since: float, *, width: int | None = None) -> Text:
    """One finished task, with how long after `since` (the response arriving) it finished:
    negative when it finished first (no delay), as the two are not ordered. Under it, how many
    attempts it took (if more than one) and why it failed (if it did), indented in lines of at
    most `width` columns when it is given."""
    status = task["status"]
    finished = task.get("finished_at")
    after = span(finished - since) if finished else ""
    text = Text.assemble(
        (f"{status:>9}", STATUS_STYLE.get(status, "")),
        f" {clock(finished)} ",
        (f"{after:>12}", "dim"),
        f"  {task['line']!r} → {task['file']}",
    )
    tries = task.get("attempts") or 0
    error = task.get("last_error") if status not in SUCCEEDED else None
    under = [f"after {tries} attempts"] if tries > 1 else []
    under += [error] if error else []
    if under:
        text.append("\n" + indented(": ".join(under), width), style="red" if error else "dim")
    return text


def indented(said: str, width: int | None, indent: int = 11) -> str:
    """`said` under a task line's text (past its status and time), wrapped to `width`."""
    margin = " " * indent
    if width is None:
        return margin + said
    return "\n".join(
        textwrap.wrap(said, max(20, width), initial_indent=margin, subsequent_indent=margin)
    )


@dataclass(slots=True)
class _Moment:
    """One event of a timeline: when it was stamped, and which events must come before it."""

    at: float
    event: str
    detail: str = ""
    after: list[_Moment] = field(default_factory=list)


def _moments(record: Mapping[str, Any], fired: Fired | None) -> list[_Moment]:
    """Every stamped moment of one request, each with the moments it is known to follow: the
    client sends before the server gets the request, which comes before the tasks are queued
    and the response is sent, which the client gets after; a task is queued, then each of its
    attempts starts and fails or ends it. Without `fired` (a request the CLI did not send)
    there are no client moments."""
    moments: list[_Moment] = []
    got = None
    if fired is not None:
        got = _Moment(fired.client_sent_at, "client sent request", f"{fired.method} {fired.path}")
        moments.append(got)
    if record.get("received_at"):
        what = "" if fired else f"{record.get('method', '')} {record.get('path', '')}"
        got = _Moment(record["received_at"], "server got request", what, _after(got))
        moments.append(got)
    queued: list[_Moment] = []
    ran: list[_Moment] = []
    for task in record.get("tasks", []):
        n, what = task["seq"] + 1, f"{task['line']!r} → {task['file']}"
        last = _Moment(task["queued_at"], f"task {n} queued", what, _after(got))
        queued.append(last)
        begun = None  # when its latest failed attempt started
        for failure in task.get("failures") or []:
            tried, begun = f"task {n} try {failure['attempt']}", failure.get("started_at")
            if begun:
                last = _Moment(begun, f"{tried} started", after=[last])
                ran.append(last)
            error = str(failure.get("error"))
            last = _Moment(failure["failed_at"], f"{tried} FAILED", error, after=[last])
            ran.append(last)
        # While it waits to retry, its start is still that of the attempt that failed.
        if task.get("started_at") and not (begun and task["started_at"] <= begun):
            tries = task.get("attempts") or 0
            label = f"task {n} try {tries}" if tries > 1 else f"task {n}"
            last = _Moment(task["started_at"], f"{label} started", after=[last])
            ran.append(last)
        if task.get("finished_at"):
            failed = task["status"] == TaskStatus.FAILED
            label = f"task {n} FAILED" if failed else f"task {n} wrote"
            detail = str(task.get("last_error")) if failed else what
            ran.append(_Moment(task["finished_at"], label, detail, after=[last]))
    moments += queued
    answered = got
    if record.get("response_sent_at"):
        after = [*_after(got), *queued]
        answered = _Moment(record["response_sent_at"], "server sent response", "last byte", after)
        moments.append(answered)
    # Listed in this order, moments stamped alike show the server's response first.
    moments += ran
    if fired is not None:
        received = _Moment(
            fired.client_received_at, "client got response", str(fired.status), _after(answered)
        )
        moments.append(received)
    return moments


def _after(moment: _Moment | None) -> list[_Moment]:
    return [] if moment is None else [moment]


def _in_order(moments: list[_Moment]) -> list[_Moment]:
    """Every moment after those it must follow, and otherwise by its stamp: the stamps of two
    moments milliseconds apart (taken near, not at, each moment) can disagree with what is
    known to have caused what."""
    index = {id(m): i for i, m in enumerate(moments)}
    waiting = {id(m): len(m.after) for m in moments}
    followers: dict[int, list[_Moment]] = {}
    for m in moments:
        for before in m.after:
            followers.setdefault(id(before), []).append(m)
    ready = [(m.at, index[id(m)], m) for m in moments if not m.after]
    heapq.heapify(ready)
    ordered: list[_Moment] = []
    while ready:
        _, _, m = heapq.heappop(ready)
        ordered.append(m)
        for follower in followers.get(id(m), []):
            waiting[id(follower)] -= 1
            if not waiting[id(follower)]:
                heapq.heappush(ready, (follower.at, index[id(follower)], follower))
    return ordered


def timeline(record: Mapping[str, Any], fired: Fired | None = None) -> Table:
    """Every moment of one request, client side too when `fired` (the CLI sent it), in the
    order they happened; `+ms` counts from the first of them.

    Where a moment's stamp is earlier than that of one it must follow, it is shown at that
    one's time with a `*`, and a note gives the stamps' difference: never a negative span."""
    from rich.table import Table

    request_id = record.get("id") or (fired.request_id if fired else "?")
    table = Table(title=f"timeline of request {request_id}", title_justify="left")
    table.add_column("time", no_wrap=True)
    table.add_column("+ms", justify="right", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("detail", overflow="fold")
    moments = _in_order(_moments(record, fired))
    origin = moments[0].at if moments else 0.0
    # The latest stamp among each moment's causes, and whose it is.
    floor: dict[int, _Moment] = {}
    notes: list[str] = []
    for m in moments:
        causes = [c for before in m.after for c in (before, floor.get(id(before))) if c]
        latest = max(causes, key=lambda c: c.at, default=None)
        shown_at = m.at
        mark = ""
        if latest is not None and latest.at > m.at:
            floor[id(m)] = latest
            shown_at, mark = latest.at, "*"
            notes.append(
                f"* {m.event}: stamped {ms(latest.at - m.at)} before “{latest.event}”, which"
                " comes first (each stamp is taken near, not at, its moment)"
            )
        elif latest is not None:
            floor[id(m)] = latest
        style = "red" if "FAILED" in m.event else ("green" if "wrote" in m.event else "")
        if m.event.startswith("client"):
            style = "bold"
        plus = f"{(shown_at - origin) * 1000:,.1f}{mark}"
        table.add_row(clock(m.at), plus, Text(m.event, style=style), m.detail)
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table


def verdict(outcome: Outcome) -> Text:
    """One sentence on what happened, as measured, with the tasks that needed more than one
    attempt."""
    tasks = outcome.tasks
    failed = [t for t in tasks if t["status"] == TaskStatus.FAILED]
    cancelled = [t for t in tasks if t["status"] == TaskStatus.CANCELLED]
    unfinished = [t for t in tasks if t["status"] not in ENDED]
    if failed:
        tries = failed[0].get("attempts") or 0
        after = f" after {tries} attempts" if tries > 1 else ""
        return Text(
            f"✗ {len(failed)} of {len(tasks)} tasks failed{after}: {failed[0].get('last_error')}",
            style="bold red",
        )
    if cancelled:
        what = f"{len(cancelled)} of {len(tasks)} tasks {'were' if len(cancelled) > 1 else 'was'}"
        return Text(f"✗ {what} cancelled: never written", style="bold red")
    if outcome.timed_out:
        left = len(unfinished)
        what = f"{left} task{'s' * (left != 1)} did" if left else "the request's record did"
        return Text(f"✗ {what} not finish in time", style="bold red")
    if not tasks:
        return Text("✓ no background task was queued for this request", style="bold green")
    last = max(t["finished_at"] for t in tasks)
    lead = last - outcome.fired.client_received_at
    retried = needed(tasks)
    if lead >= 0:
        said = f"✓ response returned {lead * 1000:,.0f} ms before the last write finished"
    else:
        said = (
            f"✓ all {len(tasks)} writes finished {-lead * 1000:,.0f} ms before the response"
            " arrived (no delay: the work was quicker than the round trip)"
        )
    return Text(said + (f"; {retried}" if retried else ""), style="bold green")


def needed(tasks: list[dict[str, Any]]) -> str:
    """`task 1 after 3 attempts, task 2 after 2 attempts`: the tasks that needed more than one
    attempt; empty if none did."""
    return ", ".join(
        f"task {t['seq'] + 1} after {t['attempts']} attempts"
        for t in sorted(tasks, key=lambda t: t["seq"])
        if (t.get("attempts") or 0) > 1
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
        "client_sent_at": fired.client_sent_at,
        "client_received_at": fired.client_received_at,
        "latency_ms": round(fired.elapsed_ms, 3),
        "timed_out": outcome.timed_out,
        "response_before_last_write_ms": (
            round((last - fired.client_received_at) * 1000, 3) if last is not None else None
        ),
        "server": outcome.record or None,
    }


def tail_line(event: TailEvent) -> Text:
    """One followed line or notice: when it appeared (`backlog` if it was there before the
    follower started, when is not known), its source, and its text."""
    style = SOURCE_STYLE.get(event.source, "")
    when = "backlog" if event.backlog else clock(event.at)
    text = Text.assemble((f"{when:<12}", "dim"), " ", (f"{event.source:<9}", style), " ")
    if event.kind == "line":
        text.append(event.text)
    elif event.kind == "event":
        text.append(event.text, style="yellow")
    else:
        text.append(f"[{event.text}]", style="dim italic")
    return text


def tail_json(event: TailEvent) -> dict[str, Any]:
    """A followed line or notice as JSON: `at` is when it was seen, which for a `backlog`
    line is when the follower read it."""
    return {
        "at": event.at,
        "backlog": event.backlog,
        "source": event.source,
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
    retries: tuple[int, float, float],
    database: str | None = None,
) -> RenderableType:
    """What `serve` is about to do: where, with which files and registry (`database`: a
    PostgreSQL URL, its password hidden), delay, workers and retries (attempts at most, the
    backoff's base and cap)."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", justify="right")
    grid.add_column(overflow="fold")  # paths are shown whole, never cut to "…"
    grid.add_row("bgtasks", f"{version} serving at [link={url}]{url}[/link]")
    grid.add_row("API docs", f"{url}/docs")
    grid.add_row("data dir", str(data_dir))
    grid.add_row("files", f"{data_dir / 'log.txt'}\n{data_dir / 'README.md'}")
    registry = f"PostgreSQL at {database}" if database else "SQLite in the data dir's .bgtasks/"
    grid.add_row("registry", escape(registry))
    grid.add_row("delay", f"{delay:g} s before each task writes")
    drain = "wait for every task" if drain_timeout is None else f"{drain_timeout:g} s"
    grid.add_row("workers", f"{workers} · drain on stop: {drain}")
    attempts, base, cap = retries
    grid.add_row(
        "retries",
        f"up to {attempts} attempts · backoff {base:g} s, doubling to {cap:g} s, jittered",
    )
    return Group(Text(""), grid, Text(""))
