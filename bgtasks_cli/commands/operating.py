"""`retry`, `cancel` and `recover`: change tasks in the registry on an operator's word."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bgtasks_cli.options import JsonOpt, UrlOpt, console, print_json

if TYPE_CHECKING:
    from rich.text import Text

    from bgtasks_cli.client import Client
    from bgtasks_cli.operators import Refusal, Results

# What the server's task ids are made of (`a1b2c3d4-7`), with room: its path takes 200.
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
# What the server's owner ids are: 8 hex digits, as `tasks --json` lists them.
OWNER_ID = re.compile(r"[0-9a-f]{8}")
# A header value holds visible ASCII; refused here rather than sent as a broken request.
TOKEN = re.compile(r"[!-~]+")


def _task_ids(values: list[str] | None) -> list[str]:
    for value in values or []:
        if not TASK_ID.fullmatch(value):
            raise typer.BadParameter(
                f"{value!r} is not a task id (letters, digits and . _ : -, at most 200)"
            )
    return list(values or [])


def _token(value: str | None) -> str | None:
    if value is not None and not TOKEN.fullmatch(value):
        # Never echo it: it is a secret, even when it is a wrong one.
        raise typer.BadParameter("the token holds spaces or characters a header cannot carry")
    return value


TaskIdsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="TASK_ID",
        help="Task ids, as `bgtasks tasks` and `tasks --json` list them.",
        callback=_task_ids,
        show_default=False,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="BGTASKS_ADMIN_TOKEN",
        callback=_token,
        help="The server's BGTASKS_ADMIN_TOKEN, needed only from another machine (loopback "
        "needs none). Never printed; prefer the variable, as an option shows in `ps`.",
        show_default=False,
    ),
]


def retry(
    task_ids: TaskIdsArg = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="Retry every failed task the registry lists.")
    ] = False,
    token: TokenOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give failed tasks a fresh set of attempts: their server runs them again.

    `bgtasks retry TASK_ID...` retries those tasks; `bgtasks retry --failed` every task
    `bgtasks tasks --status failed` would list, and says how many. A task that is not failed
    or not known is refused with the server's reason, one red line each, and the others
    still go on. Exit 0 if every task was retried, 1 if any was refused.

    Example: `bgtasks retry --failed`
    """
    if failed == bool(task_ids):
        raise typer.BadParameter("give either TASK_ID... or --failed", param_hint="TASK_ID")
    from bgtasks_cli import operators

    with _client(url, token) as client:
        shown = _shower(operators.format_retried, as_json)
        if failed:
            results = operators.retry_failed(client, seen=shown)
            if not as_json:
                console().print(operators.format_failed_summary(results))
        else:
            results = operators.Results()
            operators.apply(client.retry, task_ids or [], results, shown)
    _end(results, "retried", as_json)


def cancel(
    task_ids: TaskIdsArg = None,
    token: TokenOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel tasks before their line is written: it never will be.

    A task that is queued, asleep in its delay or waiting to retry ends `cancelled`. A task
    that has ended, or whose line is being written at that moment, is refused with
    the server's reason, one red line each, and the others still go on. Exit 0 if every
    task was cancelled, 1 if any was refused.

    Example: `bgtasks cancel a1b2c3d4-7`
    """
    if not task_ids:
        raise typer.BadParameter("give the ids of the tasks to cancel", param_hint="TASK_ID")
    from bgtasks_cli import operators

    with _client(url, token) as client:
        results = operators.Results()
        operators.apply(
            client.cancel, task_ids, results, _shower(operators.format_cancelled, as_json)
        )
    _end(results, "cancelled", as_json)


def _owner_id(value: str) -> str:
    if not OWNER_ID.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not an owner id (8 hex digits, e.g. 3f2a9c1b)")
    return value


def recover(
    owner: Annotated[
        str,
        typer.Option(
            "--owner",
            callback=_owner_id,
            help="The server process's owner id, as `bgtasks tasks` and `tasks --json` list it.",
            show_default=False,
        ),
    ],
    rewrite: Annotated[
        bool,
        typer.Option(
            "--rewrite",
            help="Write here the lines that wait for its lost data directory (operators).",
        ),
    ] = False,
    token: TokenOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a server process the registry knows, and the lines that wait for its host.

    A process that claimed lines in its own data directory and died with its host leaves
    them waiting for that directory. `bgtasks recover --owner ID` shows it: its host, pid,
    data directory, whether it is alive, and those lines. With `--rewrite` (from this
    machine, or with the admin token) they are written here instead: do it only for a host
    gone for good, since a line may then be in two data directories. Exit 1 if the registry
    has no such owner, or it is alive.

    Example: `bgtasks recover --owner 3f2a9c1b`
    """
    from bgtasks_cli import owners

    with _client(url, token) as client:
        found = client.rewrite_owner(owner) if rewrite else client.owner(owner)
    if as_json:
        print_json(found)
    else:
        console().print(owners.format_rewritten(found) if rewrite else owners.format_owner(found))


def _client(url: str | None, token: str | None) -> Client:
    from bgtasks_cli.client import Client
    from bgtasks_cli.state import resolve_url

    return Client(resolve_url(url), token=token)


def _shower(
    changed: Callable[[dict[str, Any]], Text], as_json: bool
) -> Callable[[dict[str, Any] | Refusal], None]:
    """Each outcome as it comes: a changed task on stdout (not with --json), a refusal as
    one red line on stderr."""
    from bgtasks_cli.errors import BgtasksError

    out = console()

    def show(outcome: dict[str, Any] | Refusal) -> None:
        if isinstance(outcome, dict):
            if not as_json:
                out.print(changed(outcome))
            return
        reason = outcome.reason
        BgtasksError(reason if outcome.task_id in reason else f"{outcome.task_id}: {reason}").show()

    return show


def _end(results: Results, action: str, as_json: bool) -> None:
    from bgtasks_cli import operators
    from bgtasks_cli.errors import EXIT_FAILED

    if as_json:
        print_json(operators.results_json(results, action))
    if not results.ok:
        raise typer.Exit(EXIT_FAILED)
