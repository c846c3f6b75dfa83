"""`serve` and `demo`: run the service, for real or as a throwaway."""

from __future__ import annotations

import threading
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bgtasks_cli.errors import EXIT_FAILED, InvalidInput
from bgtasks_cli.options import TableOpt, console, finite, print_json
from server import __version__

if TYPE_CHECKING:
    from bgtasks_cli.client import Outcome
    from bgtasks_cli.tailer import TailEvent

DEMO_REQUESTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    (
        "notify: a dependency and the endpoint each queue a line for log.txt",
        "/send-notification/demo@example.com",
        {"q": "hello"},
    ),
    ("readme: one heading appended to README.md", "/background_tasks", {"framework": "FastAPI"}),
)
# What the demo's end points to next.
DEMO_NEXT: tuple[tuple[str, str], ...] = (
    (
        "bgtasks demo --crash",
        "what kill -9 mid-task does to acknowledged work, with and without bgtasks",
    ),
    ("bgtasks demo --fail", "a task that fails, is tried again, and heals once its fault goes"),
)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class LogFormat(StrEnum):
    text = "text"
    json = "json"


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
        float | None,
        typer.Option(
            min=0,
            max=3600,
            callback=finite,
            help="Seconds each task waits before writing. Default: BGTASKS_DELAY, else 1.",
            show_default=False,
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=86400,
            callback=finite,
            help="On stop, wait at most this long for running tasks; the rest stay in the "
            "registry and finish at the next start. Default: BGTASKS_DRAIN_TIMEOUT, else "
            "wait for all.",
            show_default=False,
        ),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=100,
            help="Attempts a task gets before it is failed for good. Default: "
            "BGTASKS_MAX_ATTEMPTS, else 5.",
            show_default=False,
        ),
    ] = None,
    retry_base: Annotated[
        float | None,
        typer.Option(
            max=3600,
            callback=finite,
            help="Seconds: the longest wait before a second attempt, doubling for each after "
            "(a random wait up to it). Default: BGTASKS_RETRY_BASE, else 0.5.",
            show_default=False,
        ),
    ] = None,
    retry_max: Annotated[
        float | None,
        typer.Option(
            max=86400,
            callback=finite,
            help="Seconds: the longest wait between two attempts. Default: "
            "BGTASKS_RETRY_MAX, else 60.",
            show_default=False,
        ),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            metavar="URL",
            help="Keep the registry in this PostgreSQL database (postgresql://USER@HOST:PORT/DB), "
            "shared by servers on many machines. Default: BGTASKS_DATABASE_URL, else SQLite in "
            "the data directory.",
            show_default=False,
        ),
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(
            help="`text`: readable lines; `json`: one JSON object per line (ts, level, event, "
            "request_id, task_id, ...) for log shippers, the banner included. "
            "Default: BGTASKS_LOG_FORMAT, else text.",
            show_default=False,
        ),
    ] = None,
    state_file: Annotated[
        bool,
        typer.Option(hidden=True, help="Record where the server listens for other commands."),
    ] = True,
) -> None:
    """Start the service with uvicorn (Ctrl-C stops it after the pending tasks finish).

    The settings (`BGTASKS_*` and these options), the registry, the data directory and the
    port are checked before anything starts.

    Example: `bgtasks serve --port 8000 --delay 1`
    """
    from bgtasks_cli import launcher, render

    if database is not None and not database.startswith(("postgresql://", "postgres://")):
        raise InvalidInput(
            f"--database {launcher.redact(database)!r} is not a PostgreSQL URL: it must start"
            " with postgresql://",
            launcher.DATABASE_HINT,
        )
    given = {
        "data_dir": data_dir,
        "delay": delay,
        "drain_timeout": drain_timeout,
        "log_format": log_format and log_format.value,
        "max_attempts": max_attempts,
        "retry_base": retry_base,
        "retry_max": retry_max,
        "database_url": database,
    }
    settings = launcher.load_settings(**{k: v for k, v in given.items() if v is not None})
    out = console()
    directory = settings.data_dir.expanduser().resolve()
    launcher.preflight(host=host, port=port, data_dir=directory, database_url=settings.database_url)
    url = launcher.url_for(host, port)
    if settings.log_format == "json":
        launcher.announce_json(
            host=host, url=url, data_dir=directory, workers=workers, settings=settings
        )
    else:
        if not launcher.is_loopback(host):
            out.print(
                f"[bold yellow]Warning:[/] binding {host} exposes the service beyond this machine."
            )
        out.print(
            render.banner(
                url=url,
                data_dir=directory,
                delay=settings.delay,
                workers=workers,
                drain_timeout=settings.drain_timeout,
                version=__version__,
                retries=(settings.max_attempts, settings.retry_base, settings.retry_max),
                database=settings.database_url and launcher.redact(settings.database_url),
            )
        )
    launcher.serve(
        host=host,
        port=port,
        workers=workers,
        data_dir=directory,
        delay=settings.delay,
        drain_timeout=settings.drain_timeout,
        retries=(settings.max_attempts, settings.retry_base, settings.retry_max),
        access_log=access_log,
        record_state=state_file,
        log_format=settings.log_format,
        database_url=settings.database_url,
    )


def demo(
    delay: Annotated[
        float,
        typer.Option(
            min=0,
            max=10,
            callback=finite,
            help="Seconds of simulated work per task (with --crash: 0.2 to 10).",
        ),
    ] = 1.0,
    crash: Annotated[
        bool,
        typer.Option(
            "--crash",
            help="Instead: FastAPI's tutorial code beside bgtasks, both killed with kill -9 "
            "before their tasks run and started again; count each side's lost and doubled "
            "lines. Exit 0 if bgtasks lost and doubled none, else 1.",
        ),
    ] = False,
    fail: Annotated[
        bool,
        typer.Option(
            "--fail",
            help="Instead: a task whose file cannot be written (the demo makes it a "
            "directory), each attempt failing live, then the fault removed and the task "
            "healed. Exit 0 if it healed, else 1.",
        ),
    ] = False,
    table: TableOpt = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='With --crash: print only the report, {"plain": {...}, "bgtasks": {...}}; '
            "with --fail: what the demo did and the request's record. Progress goes to "
            "stderr.",
        ),
    ] = False,
) -> None:
    """Start a throwaway server and show that each response comes back before its tasks
    write.

    Notifies and appends to README, then draws each request's timeline (`--table`: a table
    of its events) and what `bgtasks tail` saw. `--crash` shows instead what `kill -9` does
    to acknowledged work; `--fail` what a failing task looks like and how it heals. Cleans
    up after itself, Ctrl-C included (exit 130).

    Example: `bgtasks demo`, `bgtasks demo --crash` or `bgtasks demo --fail`
    """
    if crash and fail:
        raise typer.BadParameter("--crash and --fail are two demos: give one", param_hint="--fail")
    if as_json and not (crash or fail):
        raise typer.BadParameter("--json goes with --crash or --fail", param_hint="--json")
    if table and crash:
        raise typer.BadParameter(
            "--table is for the timelines; --crash shows no timeline", param_hint="--table"
        )
    from rich.rule import Rule
    from rich.table import Table

    from bgtasks_cli import fail_demo, launcher

    # The servers inherit the environment: check it here rather than let them die of it.
    launcher.load_settings(delay=delay, **(fail_demo.RETRIES if fail else {}))
    if crash:
        _crash_demo(delay, as_json=as_json)
        return
    if fail:
        _fail_demo(delay, as_json=as_json, table=table)
        return
    outcomes = _timelines_demo(delay, table=table)
    out = console()
    out.print(Rule("more demos", align="left"))
    more = Table.grid(padding=(0, 2))  # a long description wraps under itself
    more.add_column(style="bold", no_wrap=True)
    more.add_column()
    for command, what in DEMO_NEXT:
        more.add_row(f"  {command}", what)
    out.print(more)
    if not all(outcome.ok for outcome in outcomes):
        raise typer.Exit(EXIT_FAILED)


def _timelines_demo(delay: float, *, table: bool) -> list[Outcome]:
    """`demo`: the seed's requests against a throwaway server, and what `tail` saw."""
    from rich.rule import Rule

    from bgtasks_cli import render
    from bgtasks_cli.client import Client
    from bgtasks_cli.demo_server import DemoServer
    from bgtasks_cli.following import run_request
    from bgtasks_cli.tailer import FILE_CHOICES, Tailer

    out = console()
    outcomes: list[Outcome] = []
    seen: list[TailEvent] = []
    stop = threading.Event()
    follower = threading.Thread(target=lambda: None)
    server = DemoServer(delay=delay)
    try:
        with out.status("starting a demo server…"):
            server.start()
        out.print(
            f"demo server at {server.url} · data dir {server.data_dir} · {delay:g} s per task"
        )
        tailer = Tailer(server.data_dir, FILE_CHOICES["all"], backlog=0)
        tailer.initial()
        follower = threading.Thread(
            target=lambda: seen.extend(tailer.follow(stop)), name="demo-tail", daemon=True
        )
        follower.start()
        with Client(server.url) as client:
            for title, path, params in DEMO_REQUESTS:
                out.print(Rule(title, align="left"))
                outcome = run_request(
                    client, path, params, wait=True, timeout=30, as_json=False, out=out, table=table
                )
                outcomes.append(outcome)
        stop.set()
        follower.join(timeout=5)
        out.print(Rule("what `bgtasks tail` saw, with the time each line appeared", align="left"))
        for event in seen:
            out.print(render.tail_line(event), soft_wrap=True)
    finally:
        # Whatever happened (Ctrl-C included): stop following, stop the server, remove it all.
        stop.set()
        if follower.is_alive():
            follower.join(timeout=5)
        server.stop()
    return outcomes


def _fail_demo(delay: float, *, as_json: bool, table: bool) -> None:
    """`demo --fail`: the live view on stdout (on stderr with `as_json`, the JSON document
    then on stdout); exit 1 unless the task healed, 130 on Ctrl-C."""
    from rich.console import Console

    from bgtasks_cli import fail_demo

    progress = Console(stderr=True, highlight=False, emoji=False) if as_json else console()
    try:
        report = fail_demo.run(delay, out=progress, table=table)
    except KeyboardInterrupt:
        # fail_demo.run has stopped the server and removed its directory by now.
        Console(stderr=True, highlight=False).print(
            "interrupted: the demo server is stopped and its files removed", markup=False
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        print_json(fail_demo.report_json(report))
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def _crash_demo(delay: float, *, as_json: bool) -> None:
    """`demo --crash`: the report on stdout (as JSON with `as_json`, the progress then on
    stderr); exit 1 unless bgtasks lost and doubled nothing, 130 on Ctrl-C."""
    from rich.console import Console
    from rich.text import Text

    from bgtasks_cli import crash_demo

    out = console()
    progress = Console(stderr=True, highlight=False, emoji=False) if as_json else out
    try:
        report = crash_demo.run(delay=delay, console=progress)
    except KeyboardInterrupt:
        # crash_demo.run has stopped and removed everything it started by now.
        Console(stderr=True, highlight=False).print(
            Text("interrupted: every server the demo started is stopped and its files removed")
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        print_json(crash_demo.report_json(report))
    else:
        out.print(crash_demo.render(report))
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
