"""What the commands share: option types, the finite-number check, and printing helpers.

Light on purpose: every command imports it, so it loads typer and nothing heavier.
"""

from __future__ import annotations

import json
import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console


def finite(value: float | None) -> float | None:
    """Refuse NaN and the infinities: no range rule holds for them (NaN passes every
    comparison test), so a `--timeout nan` would never time out."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


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
TableOpt = Annotated[
    bool,
    typer.Option(
        "--table", help="Show the timeline as a table of its events instead of the picture."
    ),
]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        min=0.1, max=86400, callback=finite, help="Seconds to wait for the tasks before giving up."
    ),
]


def console() -> Console:
    """A console for stdout: no highlighting or emoji codes, so output is what was measured."""
    from rich.console import Console

    return Console(highlight=False, emoji=False)


def print_json(document: Any) -> None:
    """One JSON document on one line of stdout, flushed (JSON lines when following)."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")
    sys.stdout.flush()
