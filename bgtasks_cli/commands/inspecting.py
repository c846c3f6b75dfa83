"""`tail`, `tasks` and `timeline`: watch the data files and the registry."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Annotated

import typer

from bgtasks_cli.options import (
    DataDirOpt,
    FileChoice,
    JsonOpt,
    TableOpt,
    UrlOpt,
    console,
    finite,
    print_json,
)
from server.status import TaskStatus

if TYPE_CHECKING:
    from bgtasks_cli.tailer import TailEvent

# The request ids the server keeps (a client's own X-Request-ID must match it too).
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def tail(
    file: Annotated[
        FileChoice, typer.Option("--file", "-f", help="Which file to follow.")
    ] = FileChoice.all,
    lines: Annotated[
        int, typer.Option("-n", "--lines", min=0, max=100_000, help="Lines of backlog to show.")
    ] = 10,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Keep following after the backlog.")
    ] = True,
    events: Annotated[
        bool,
        typer.Option(
            "--events", help="Interleave the server's request and task events (GET /events)."
        ),
    ] = False,
    data_dir: DataDirOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow log.txt and README.md like `tail -F`: each new line with the time it appeared.

    Backlog lines (there before `tail` started) are marked `backlog`: when they appeared is
    not known. Files that appear later, are truncated, or are deleted and recreated are
    followed on. `--events` adds the server's events from `--url`, in the order they came;
    if that server is down, the files are still followed. Stop with Ctrl-C.

    Example: `bgtasks tail --file log -n 0 --events`
    """
    from contextlib import nullcontext

    from bgtasks_cli import render
    from bgtasks_cli.client import START_HINT, Client
    from bgtasks_cli.errors import BgtasksError
    from bgtasks_cli.state import resolve_data_dir, resolve_url
    from bgtasks_cli.tailer import FILE_CHOICES, Tailer

    base = resolve_url(url) if events and follow else None
    client = Client(base) if base else None
    with client or nullcontext():
        tailer = Tailer(
            resolve_data_dir(data_dir),
            FILE_CHOICES[file.value],
            backlog=lines,
            events=client.events() if client else None,
        )
        out = console()

        def show(event: TailEvent) -> None:
            if event.kind == "unavailable":
                BgtasksError(
                    f"the server's events are unavailable at {base} ({event.text});"
                    " following the files only",
                    START_HINT,
                ).show()
            elif as_json:
                print_json(render.tail_json(event))
            else:
                out.print(render.tail_line(event), soft_wrap=True)

        for event in tailer.initial():
            show(event)
        if not follow:
            return
        stop = threading.Event()
        try:
            for event in tailer.follow(stop):
                show(event)
        except KeyboardInterrupt:
            stop.set()


def tasks(
    status: Annotated[
        TaskStatus | None,
        typer.Option("--status", "-s", help="Only tasks in this state."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh live until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            min=0.1,
            max=60,
            callback=finite,
            help="With --watch: re-read at least this often (it re-reads on each of the "
            "server's events, at most 10 times a second).",
        ),
    ] = 1.0,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show recent tasks: their status and attempts, what they write, and when.

    Each task's request, status, attempts and what it writes, when it was queued, started
    and finished, and how long each step took; a retrying task shows when its next attempt
    is due. Narrow terminals get fewer columns. `--status` takes queued, running, retrying,
    done, failed, recovered or cancelled.

    Example: `bgtasks tasks --status failed`
    """
    from bgtasks_cli.client import Client
    from bgtasks_cli.state import resolve_url
    from bgtasks_cli.tasks_table import tasks_table

    wanted = status.value if status else None
    with Client(resolve_url(url)) as client:
        rows = client.tasks(wanted, limit)
        if not watch:
            if as_json:
                print_json(rows)
            else:
                out = console()
                out.print(tasks_table(rows, width=out.width))
            return
        from bgtasks_cli.watching import on_changes

        try:
            if as_json:
                # A retrying task changes without changing its status: each attempt counts.
                seen: dict[str, tuple[str, int]] = {}

                def print_changed() -> None:
                    for row in reversed(client.tasks(wanted, limit)):
                        now = (row["status"], row.get("attempts") or 0)
                        if seen.get(row["id"]) != now:
                            seen[row["id"]] = now
                            print_json(row)

                for row in reversed(rows):
                    seen[row["id"]] = (row["status"], row.get("attempts") or 0)
                    print_json(row)
                on_changes(client, print_changed, safety=interval)
                return
            from rich.live import Live

            out = console()
            with Live(tasks_table(rows, width=out.width), console=out, auto_refresh=False) as live:

                def redraw() -> None:
                    table = tasks_table(client.tasks(wanted, limit), width=out.width)
                    live.update(table, refresh=True)

                on_changes(client, redraw, safety=interval)
        except KeyboardInterrupt:
            pass


def _request_id(value: str) -> str:
    if not REQUEST_ID.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not a request id (letters, digits and . _ : -, at most 128)"
        )
    return value


def timeline(
    request_id: Annotated[
        str,
        typer.Argument(
            help="The request's id: `notify` prints it, `tasks --json` lists it, every "
            "response carries it as X-Request-ID.",
            callback=_request_id,
            show_default=False,
        ),
    ],
    table: TableOpt = False,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw the timeline of any recorded request, as `notify` draws its own.

    When the server got the request and sent the response, how long each task waited and
    ran, and how it ended; a task still running is drawn up to now. `--table` lists the
    events instead, `--json` prints the server's record. Exits 0 whatever the tasks did,
    1 if the registry has no such request.

    Example: `bgtasks timeline 0197a4f2-6c1e-7b3a-9d52-3f1e8c0a4b21`
    """
    import time
    from urllib.parse import quote

    from bgtasks_cli import picture, render
    from bgtasks_cli.client import Client
    from bgtasks_cli.errors import BgtasksError
    from bgtasks_cli.state import resolve_url

    base = resolve_url(url)
    with Client(base) as client:
        record = client.request_record(quote(request_id, safe=""))
    if record is None:
        raise BgtasksError(
            f"no request {request_id} in the registry at {base}",
            "`bgtasks tasks --json` lists recent tasks with their request ids; the registry "
            "keeps the newest BGTASKS_RETENTION requests",
        )
    if as_json:
        print_json(record)
        return
    out = console()
    if table:
        out.print(render.timeline(record))
    else:
        out.print(picture.draw(record, width=out.width, now=time.time()))
