"""`notify` and `readme`: fire one of the seed's requests and follow its tasks to the end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from bgtasks_cli.options import (
    JsonOpt,
    TableOpt,
    TimeoutOpt,
    UrlOpt,
    WaitOpt,
    console,
    print_json,
)
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
) -> Outcome:
    """Fire one request; print the response the moment it arrives, then follow its tasks and
    show its timeline: the picture, or with `table` the table of its events."""
    from bgtasks_cli import render

    if as_json:
        outcome = client.run(path, params, wait=wait, timeout=timeout)
        print_json(render.outcome_json(outcome))
        return outcome

    if not wait:
        outcome = client.run(path, params, wait=False, timeout=timeout)
        out.print(render.response_line(outcome.fired))
        return outcome

    shown: set[str] = set()
    status = out.status("waiting for the background tasks…")

    def on_response(fired: Fired) -> None:
        out.print(render.response_line(fired))
        status.start()

    def on_update(fired: Fired, record: dict[str, Any]) -> None:
        tasks = record.get("tasks", [])
        for task in tasks:
            if task["status"] in ENDED and task["id"] not in shown:
                shown.add(task["id"])
                out.print(render.task_line(task, fired.client_received_at))
        left = sum(1 for t in tasks if t["id"] not in shown)
        status.update(f"waiting for {left} background task{'s' * (left != 1)}…")

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


def _fire(
    url: str | None,
    path: str,
    params: dict[str, Any] | None,
    *,
    wait: bool,
    timeout: float,
    as_json: bool,
    table: bool,
) -> None:
    from bgtasks_cli.client import Client
    from bgtasks_cli.errors import EXIT_FAILED
    from bgtasks_cli.state import resolve_url

    with Client(resolve_url(url)) as client:
        outcome = run_request(
            client,
            path,
            params,
            wait=wait,
            timeout=timeout,
            as_json=as_json,
            out=console(),
            table=table,
        )
    if wait and not outcome.ok:
        raise typer.Exit(EXIT_FAILED)


def notify(
    email: Annotated[str, typer.Argument(help="Address to notify, e.g. user@example.com.")],
    q: Annotated[
        str | None,
        typer.Option("--q", "-q", help="Query text; also logged as `found query: TEXT`."),
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
    table: TableOpt = False,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fire `POST /send-notification/EMAIL?q=TEXT` and follow its tasks to the end.

    Prints the response the moment it arrives, each task as it finishes, then the
    request's timeline as a picture (`--table`: as a table of its events) and how long the
    response beat the last write.

    Example: `bgtasks notify user@example.com --q hello`
    """
    from urllib.parse import quote

    params = {"q": q} if q is not None else None
    path = f"/send-notification/{quote(email, safe='@')}"
    _fire(url, path, params, wait=wait, timeout=timeout, as_json=as_json, table=table)


def readme(
    framework: Annotated[
        str | None,
        typer.Argument(
            help="Framework name for the heading `## NAME 框架精讲`.", show_default=False
        ),
    ] = None,
    intro: Annotated[
        bool,
        typer.Option("--intro", help="Append the intro paragraph instead (needs --q)."),
    ] = False,
    q: Annotated[
        str | None,
        typer.Option("--q", "-q", help="With --intro: the query that triggers the append."),
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
    table: TableOpt = False,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Append to the data directory's README.md in the background.

    `bgtasks readme FRAMEWORK` fires `POST /background_tasks?framework=FRAMEWORK`;
    `bgtasks readme --intro --q TEXT` fires `POST /dependency/background_tasks?q=TEXT`
    (without --q the server queues nothing and says so). The output is notify's: the
    response, each task as it ends, the timeline picture (`--table`: a table) and a verdict.

    Example: `bgtasks readme FastAPI`
    """
    if intro == (framework is not None):
        raise typer.BadParameter("give either FRAMEWORK or --intro", param_hint="FRAMEWORK")
    if q is not None and not intro:
        raise typer.BadParameter("--q goes with --intro", param_hint="--q")
    path, params = (
        ("/dependency/background_tasks", {"q": q} if q is not None else None)
        if intro
        else ("/background_tasks", {"framework": framework})
    )
    _fire(url, path, params, wait=wait, timeout=timeout, as_json=as_json, table=table)
