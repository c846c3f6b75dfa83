"""`stats`: counts, rates and latency percentiles from the server's /metrics."""

from __future__ import annotations

from typing import Annotated

import typer

from bgtasks_cli.options import JsonOpt, UrlOpt, console, finite, print_json


def stats(
    window: Annotated[
        float,
        typer.Option(
            min=1,
            max=3600,
            callback=finite,
            help="Seconds between the two readings of /metrics that rates and percentiles "
            "are taken over; Ctrl-C ends it early.",
        ),
    ] = 60.0,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Tasks by status since the server started, and their rates and latency percentiles
    over the next WINDOW seconds (a minute unless told): from two readings of the server's
    /metrics, every worker's, the window apart. Percentiles are estimated from histogram
    buckets, as Prometheus' histogram_quantile does.

    Example: `bgtasks stats --window 10 --json`
    """
    import contextlib
    import time

    from bgtasks_cli import scrapes
    from bgtasks_cli.client import WRONG_SERVER_HINT, Client
    from bgtasks_cli.errors import WrongServer
    from bgtasks_cli.state import resolve_url

    def read(client: Client) -> scrapes.Scrape:
        text = client.metrics()
        try:
            return scrapes.parse(text, time.monotonic())
        except scrapes.NotMetrics as exc:
            raise WrongServer(
                f"{client.base_url}/metrics is not a bgtasks server's metrics: {exc}",
                WRONG_SERVER_HINT,
            ) from None

    with Client(resolve_url(url)) as client:
        first = read(client)
        out = console()
        waiting = (
            out.status(f"reading /metrics again in {window:g} s (Ctrl-C: now)…")
            if out.is_terminal and not as_json
            else contextlib.nullcontext()
        )
        try:
            with waiting:
                while (left := first.at + window - time.monotonic()) > 0:
                    time.sleep(min(left, 0.2))
        except KeyboardInterrupt:
            pass  # the window ends now
        second = read(client)
    result = scrapes.compare(first, second, client.base_url)
    if as_json:
        print_json(scrapes.stats_json(result))
    else:
        out.print(scrapes.stats_table(result))
