"""`notify` and `readme`: fire one of the seed's requests and follow its tasks to the end."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bgtasks_cli.options import (
    JsonOpt,
    TableOpt,
    TimeoutOpt,
    UrlOpt,
    WaitOpt,
    console,
)


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
    from bgtasks_cli.following import run_request
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
