"""`serve` and `demo`: run the service, for real or as a throwaway."""

from __future__ import annotations

import threading
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bgtasks_cli.options import console, finite
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

    given = {
        "data_dir": data_dir,
        "delay": delay,
        "drain_timeout": drain_timeout,
        "log_format": log_format and log_format.value,
    }
    settings = launcher.load_settings(**{k: v for k, v in given.items() if v is not None})
    out = console()
    directory = settings.data_dir.expanduser().resolve()
    launcher.preflight(host=host, port=port, data_dir=directory)
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
            )
        )
    launcher.serve(
        host=host,
        port=port,
        workers=workers,
        data_dir=directory,
        delay=settings.delay,
        drain_timeout=settings.drain_timeout,
        access_log=access_log,
        record_state=state_file,
        log_format=settings.log_format,
    )


def demo(
    delay: Annotated[
        float,
        typer.Option(min=0, max=10, callback=finite, help="Seconds of simulated work per task."),
    ] = 1.0,
) -> None:
    """Start a throwaway server, notify and append to README, and show that each response
    came back before its background writes finished. Cleans up after itself, Ctrl-C
    included.

    Example: `bgtasks demo`
    """
    from rich.rule import Rule

    from bgtasks_cli import launcher, render
    from bgtasks_cli.client import Client
    from bgtasks_cli.commands.firing import run_request
    from bgtasks_cli.tailer import FILE_CHOICES, Tailer

    # The server inherits the environment: check it here rather than let the server die of it.
    launcher.load_settings(delay=delay)
    out = console()
    outcomes: list[Outcome] = []
    seen: list[TailEvent] = []
    stop = threading.Event()
    follower = threading.Thread(target=lambda: None)
    server = launcher.DemoServer(delay=delay)
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
                    client, path, params, wait=True, timeout=30, as_json=False, out=out
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
    if not all(outcome.ok for outcome in outcomes):
        raise typer.Exit(1)
