"""The `bgtasks` command. Commands only parse options and hand them to the plain modules
(client, launcher, tailer, render); heavy imports happen inside the command that needs them,
so `notify`, `tasks` and `tail` never load fastapi or uvicorn."""

from __future__ import annotations

import json
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from bgtasks_cli.errors import EXIT_USAGE, BgtasksError, InvalidInput
from server import __version__
from server.status import ENDED, TaskStatus

if TYPE_CHECKING:
    from rich.console import Console

    from bgtasks_cli.client import Client, Outcome


# Typer may vendor its own click: take UsageError from wherever its BadParameter comes from.
_UsageError: type[Exception] = sys.modules[typer.BadParameter.__module__].UsageError


class BgtasksGroup(TyperGroup):
    """The error boundary: an expected failure (`BgtasksError`) or a command's bad option
    becomes one red line, a hint and its exit code, never a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BgtasksError as exc:
            exc.show()
            raise typer.Exit(exc.exit_code) from None
        except _UsageError as exc:
            command = getattr(getattr(exc, "ctx", None), "command_path", None) or "bgtasks"
            message = exc.format_message()  # type: ignore[attr-defined]
            InvalidInput(message, f"see `{command} --help`").show()
            raise typer.Exit(EXIT_USAGE) from None


app = typer.Typer(
    name="bgtasks",
    cls=BgtasksGroup,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class FileChoice(StrEnum):
    log = "log"
    readme = "readme"
    all = "all"


UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="BGTASKS_URL",
        help="Server URL. Default: the running `bgtasks serve`, else http://127.0.0.1:8000.",
        show_default=False,
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="BGTASKS_DATA_DIR",
        help="Data directory. Default: the running server's, else the per-user state directory.",
        show_default=False,
        file_okay=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (JSON lines when following).")]
WaitOpt = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Follow the request's tasks until they end.")
]
TimeoutOpt = Annotated[
    float,
    typer.Option(min=0.1, max=86400, help="Seconds to wait for the tasks before giving up."),
]


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False, emoji=False)


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bgtasks {__version__}")
        raise typer.Exit()


@app.callback()
def callback(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Drive the bgtasks service and watch FastAPI background tasks run after the response.

    Start with `bgtasks demo`: it starts a server, fires requests and shows the timeline.
    """


def _run_request(
    client: Client,
    path: str,
    params: dict[str, Any] | None,
    *,
    wait: bool,
    timeout: float,
    as_json: bool,
    console: Console,
) -> Outcome:
    """Fire one request; print the response the moment it arrives, then follow its tasks."""
    from bgtasks_cli import render

    if as_json:
        outcome = client.run(path, params, wait=wait, timeout=timeout)
        _print_json(render.outcome_json(outcome))
        return outcome

    if not wait:
        outcome = client.run(path, params, wait=False, timeout=timeout)
        console.print(render.response_line(outcome.fired))
        return outcome

    shown: set[str] = set()
    status = console.status("waiting for the background tasks…")

    def on_response(fired: Any) -> None:
        console.print(render.response_line(fired))
        status.start()

    def on_update(fired: Any, record: dict[str, Any]) -> None:
        tasks = record.get("tasks", [])
        for task in tasks:
            if task["status"] in ENDED and task["id"] not in shown:
                shown.add(task["id"])
                console.print(render.task_line(task, fired.received_at))
        left = sum(1 for t in tasks if t["id"] not in shown)
        status.update(f"waiting for {left} background task{'s' * (left != 1)}…")

    try:
        outcome = client.run(
            path, params, wait=True, timeout=timeout, on_update=on_update, on_response=on_response
        )
    finally:
        status.stop()
    console.print(render.timeline(outcome))
    console.print(render.verdict(outcome))
    return outcome


def _exit_for(outcome: Outcome, wait: bool) -> None:
    from bgtasks_cli.errors import EXIT_FAILED

    if wait and not outcome.ok:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def notify(
    email: Annotated[str, typer.Argument(help="Address to notify, e.g. user@example.com.")],
    q: Annotated[
        str | None,
        typer.Option("--q", "-q", help="Query text; also logged as `found query: TEXT`."),
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 30.0,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fire `POST /send-notification/EMAIL?q=TEXT` and follow its tasks to the end.

    Prints the response the moment it arrives, each task as it finishes, then a timeline
    and how long the response beat the last write.

    Example: `bgtasks notify user@example.com --q hello`
    """
    from urllib.parse import quote

    from bgtasks_cli.client import Client
    from bgtasks_cli.state import resolve_url

    params = {"q": q} if q is not None else None
    with Client(resolve_url(url)) as client:
        outcome = _run_request(
            client,
            f"/send-notification/{quote(email, safe='@')}",
            params,
            wait=wait,
            timeout=timeout,
            as_json=as_json,
            console=_console(),
        )
    _exit_for(outcome, wait)


@app.command()
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
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Append to the data directory's README.md in the background.

    `bgtasks readme FRAMEWORK` fires `POST /background_tasks?framework=FRAMEWORK`;
    `bgtasks readme --intro --q TEXT` fires `POST /dependency/background_tasks?q=TEXT`
    (without --q the server queues nothing and says so).

    Example: `bgtasks readme FastAPI`
    """
    from bgtasks_cli.client import Client
    from bgtasks_cli.state import resolve_url

    if intro == (framework is not None):
        raise typer.BadParameter("give either FRAMEWORK or --intro", param_hint="FRAMEWORK")
    if q is not None and not intro:
        raise typer.BadParameter("--q goes with --intro", param_hint="--q")
    path, params = (
        ("/dependency/background_tasks", {"q": q} if q is not None else None)
        if intro
        else ("/background_tasks", {"framework": framework})
    )
    with Client(resolve_url(url)) as client:
        outcome = _run_request(
            client, path, params, wait=wait, timeout=timeout, as_json=as_json, console=_console()
        )
    _exit_for(outcome, wait)


@app.command()
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
        typer.Option("--events", help="Interleave the server's request and task events."),
    ] = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow log.txt and README.md like `tail -F`: each new line with the time it appeared.

    Files that appear later, are truncated, or are deleted and recreated are followed on.
    Stop with Ctrl-C.

    Example: `bgtasks tail --file log -n 0 --events`
    """
    from bgtasks_cli import render
    from bgtasks_cli.state import resolve_data_dir
    from bgtasks_cli.tailer import FILE_CHOICES, Tailer

    tailer = Tailer(
        resolve_data_dir(data_dir), FILE_CHOICES[file.value], backlog=lines, events=events
    )
    console = _console()

    def show(event: Any) -> None:
        if as_json:
            _print_json(render.tail_json(event))
        else:
            console.print(render.tail_line(event), soft_wrap=True)

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


@app.command()
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
        float, typer.Option(min=0.1, max=60, help="Seconds between refreshes with --watch.")
    ] = 0.5,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show recent tasks: their request, what they write, when they were queued, started and
    finished, and how long each step took.

    Example: `bgtasks tasks --status failed`
    """
    import time

    from bgtasks_cli import render
    from bgtasks_cli.client import Client
    from bgtasks_cli.state import resolve_url

    wanted = status.value if status else None
    with Client(resolve_url(url)) as client:
        rows = client.tasks(wanted, limit)
        if not watch:
            if as_json:
                _print_json(rows)
            else:
                _console().print(render.tasks_table(rows))
            return
        try:
            if as_json:
                seen: dict[str, str] = {}
                while True:
                    for row in reversed(rows):
                        if seen.get(row["id"]) != row["status"]:
                            seen[row["id"]] = row["status"]
                            _print_json(row)
                    time.sleep(interval)
                    rows = client.tasks(wanted, limit)
            from rich.live import Live

            with Live(render.tasks_table(rows), console=_console(), auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(render.tasks_table(client.tasks(wanted, limit)), refresh=True)
        except KeyboardInterrupt:
            pass


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback warns.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="BGTASKS_DATA_DIR",
            help="Where log.txt, README.md and the task registry live. "
            "Default: ~/.local/state/bgtasks/data.",
            show_default=False,
            file_okay=False,
        ),
    ] = None,
    delay: Annotated[
        float,
        typer.Option(
            envvar="BGTASKS_DELAY", min=0, max=3600, help="Seconds each task waits before writing."
        ),
    ] = 1.0,
    drain_timeout: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=86400,
            help="On stop, wait at most this long for running tasks; the rest stay in the "
            "registry and finish at the next start. Default: wait for all.",
            show_default=False,
        ),
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    state_file: Annotated[
        bool,
        typer.Option(hidden=True, help="Record where the server listens for other commands."),
    ] = True,
) -> None:
    """Start the service with uvicorn (Ctrl-C stops it after the pending tasks finish).

    Example: `bgtasks serve --port 8000 --delay 1`
    """
    from bgtasks_cli import launcher, render
    from server.paths import default_data_dir

    console = _console()
    directory = (data_dir or default_data_dir()).expanduser().resolve()
    url = launcher.url_for(host, port)
    if not launcher.is_loopback(host):
        console.print(
            f"[bold yellow]Warning:[/] binding {host} exposes the service beyond this machine."
        )
    console.print(
        render.banner(
            url=url,
            data_dir=directory,
            delay=delay,
            workers=workers,
            drain_timeout=drain_timeout,
            version=__version__,
        )
    )
    launcher.serve(
        host=host,
        port=port,
        workers=workers,
        data_dir=directory,
        delay=delay,
        drain_timeout=drain_timeout,
        access_log=access_log,
        record_state=state_file,
    )


@app.command()
def demo(
    delay: Annotated[
        float, typer.Option(min=0, max=10, help="Seconds of simulated work per task.")
    ] = 1.0,
) -> None:
    """Start a throwaway server, notify and append to README, and show that each response
    came back before its background writes finished. Cleans up after itself.

    Example: `bgtasks demo`
    """
    from contextlib import ExitStack

    from rich.rule import Rule

    from bgtasks_cli import render
    from bgtasks_cli.client import Client
    from bgtasks_cli.launcher import DemoServer
    from bgtasks_cli.tailer import FILE_CHOICES, Tailer

    console = _console()
    with ExitStack() as stack:
        with console.status("starting a demo server…"):
            server = stack.enter_context(DemoServer(delay=delay))
        console.print(
            f"demo server at {server.url} · data dir {server.data_dir} · {delay:g} s per task"
        )
        tailer = Tailer(server.data_dir, FILE_CHOICES["all"], backlog=0)
        tailer.initial()
        seen: list[Any] = []
        stop = threading.Event()
        follower = threading.Thread(
            target=lambda: seen.extend(tailer.follow(stop)), name="demo-tail", daemon=True
        )
        follower.start()
        outcomes = []
        with Client(server.url) as client:
            for title, path, params in (
                (
                    "notify: a dependency and the endpoint each queue a line for log.txt",
                    "/send-notification/demo@example.com",
                    {"q": "hello"},
                ),
                (
                    "readme: one heading appended to README.md",
                    "/background_tasks",
                    {"framework": "FastAPI"},
                ),
            ):
                console.print(Rule(title, align="left"))
                outcomes.append(
                    _run_request(
                        client, path, params, wait=True, timeout=30, as_json=False, console=console
                    )
                )
        stop.set()
        follower.join(timeout=5)
        console.print(
            Rule("what `bgtasks tail` saw, with the time each line appeared", align="left")
        )
        for event in seen:
            console.print(render.tail_line(event), soft_wrap=True)
    if not all(outcome.ok for outcome in outcomes):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bgtasks")
