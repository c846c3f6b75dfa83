"""`bgtasks demo --fail`: what a failing task looks like, and how it heals.

A throwaway `bgtasks serve` (`DemoServer`) with small retry settings; before the
request, the demo makes a fault in the server's temporary data directory: a directory where
`log.txt` should be, so no line can be written to it. A notification is fired and followed live:
the client has its 200 at once, each attempt that fails is shown with its error as it fails,
and the request's other task waits its turn behind the failing one. After a couple of failed
attempts the demo removes the fault and says so, with the time; the next attempt writes the
line, then the other task runs. The picture and the verdict follow.

The fault it makes heals, so the demo stays short (a few seconds at `--delay 0.2`). A fault
that stays ends its task `failed` after its last attempt; `bgtasks tasks --status failed`
lists such tasks and `bgtasks retry --failed` runs them again (the demo's end says so).

Everything is in the demo server's temporary directory, removed with it at the end, on
failure and on Ctrl-C.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.text import Text

from bgtasks_cli.render import clock, outcome_json

if TYPE_CHECKING:
    from rich.console import Console

    from bgtasks_cli.client import Outcome

RETRIES: dict[str, Any] = {"max_attempts": 8, "retry_base": 0.3, "retry_max": 1.0}
"""The demo server's retry settings: quick backoffs, and attempts to spare after the fault is
removed (the one under way when it goes may still fail)."""
FAILURES_BEFORE_HEALING = 2
FAULT = "log.txt"
PATH, PARAMS = "/send-notification/demo@example.com", {"q": "hello"}
FOLLOW_TIMEOUT = 60.0
NEXT = (
    "A fault that stays ends its task failed after its last attempt, kept until it is retried:"
    " `bgtasks tasks --status failed` lists such tasks, `bgtasks retry --failed` runs them again."
)


@dataclass(slots=True)
class FailReport:
    """What the demo did, and the request's outcome."""

    delay: float
    made_at: float
    removed_at: float | None
    removed_after: int  # failed attempts seen when the fault was removed
    outcome: Outcome

    @property
    def ok(self) -> bool:
        """The fault was removed and every task of the request then succeeded."""
        return self.removed_at is not None and self.outcome.ok


def serve_options() -> list[str]:
    """`serve`'s options for the demo server's retry settings."""
    options = []
    for name, value in RETRIES.items():
        options += ["--" + name.replace("_", "-"), repr(value)]
    return options


def run(delay: float, *, out: Console, table: bool = False) -> FailReport:
    """Run the demo, its progress and the request's live view on `out`. Stops the server and
    removes its directory at the end, also on failure and Ctrl-C."""
    from bgtasks_cli.client import Client
    from bgtasks_cli.demo_server import DemoServer
    from bgtasks_cli.following import run_request

    server = DemoServer(delay=delay, options=serve_options())
    try:
        with out.status("starting a demo server…"):
            server.start()
        out.print(
            Text(
                f"demo server at {server.url} · data dir {server.data_dir} · {delay:g} s per"
                f" task · up to {RETRIES['max_attempts']} attempts, the backoff"
                f" {RETRIES['retry_base']:g} s doubling to {RETRIES['retry_max']:g} s"
            )
        )
        fault = server.data_dir / FAULT
        fault.mkdir()
        made_at = time.time()
        say(out, made_at, f"the fault: {FAULT} is a directory, so no line can be written to it")
        removed: list[tuple[float, int]] = []

        def heal(record: dict[str, Any]) -> None:
            failed = sum(len(task.get("failures") or []) for task in record.get("tasks", []))
            if not removed and failed >= FAILURES_BEFORE_HEALING:
                fault.rmdir()
                removed.append((time.time(), failed))
                say(
                    out,
                    removed[0][0],
                    f"fault removed after {failed} failed attempts: {FAULT} is writable again",
                )

        with Client(server.url) as client:
            outcome = run_request(
                client,
                PATH,
                PARAMS,
                wait=True,
                timeout=FOLLOW_TIMEOUT,
                as_json=False,
                out=out,
                table=table,
                max_attempts=RETRIES["max_attempts"],
                on_record=heal,
            )
        out.print(Text(NEXT, style="dim"))
    finally:
        server.stop()
    removed_at, after = removed[0] if removed else (None, 0)
    return FailReport(delay, made_at, removed_at, after, outcome)


def say(out: Console, at: float, message: str) -> None:
    """One line of what the demo itself did, with the time it did it."""
    out.print(Text.assemble((clock(at), "bold yellow"), "  ", (message, "yellow")))


def report_json(report: FailReport) -> dict[str, Any]:
    """`demo --fail --json`: what the demo did, and the request as `notify --json` gives it
    (the server's record with each task's attempts and failures)."""
    return {
        "ok": report.ok,
        "settings": {"delay": report.delay, **RETRIES},
        "fault": {
            "file": FAULT,
            "what": "a directory where the data file should be",
            "made_at": report.made_at,
            "removed_at": report.removed_at,
            "removed_after_failures": report.removed_after,
        },
        "request": outcome_json(report.outcome),
    }
