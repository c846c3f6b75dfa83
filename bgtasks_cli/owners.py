"""`bgtasks recover`: what the registry knows of a server process (an owner), and the lines it
claimed in a data directory other than the server's, over `GET /owners/{id}` and
`POST /owners/{id}/rewrite`. No printing here: `format_*` give the text, the command prints it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from bgtasks_cli.ids import short_id

TWICE = (
    "these lines may also be in the lost data directory: if that host comes back, each may be"
    " in two data directories"
)


def _when(at: Any) -> str:
    if not isinstance(at, int | float):
        return "-"
    return dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _line(line: dict[str, Any]) -> Text:
    return Text.assemble(
        "  ",
        (str(line["id"]), "bold"),
        f"  req {short_id(str(line['request_id']))}  {line['line']!r} → {line['file']}",
    )


def format_owner(owner: dict[str, Any]) -> RenderableType:
    """The owner (its host, process, data directory, when it started, alive or not) and the
    lines that wait for its data directory, with what to do about them."""
    alive = owner.get("alive")
    head = Text.assemble(("owner ", "bold"), (str(owner["owner"]), "bold cyan"))
    for label, key in (("host", "host"), ("pid", "pid"), ("data dir", "data_dir")):
        if owner.get(key) is not None:
            head.append(f" · {label} {owner[key]}")
    if owner.get("started_at") is not None:
        head.append(f" · started {_when(owner['started_at'])}")
    head.append(" · ")
    head.append("alive" if alive else "not running", style="green" if alive else "yellow")
    waiting = owner.get("waiting") or []
    if not waiting:
        return Group(head, Text("no lines of it wait for another data directory"))
    n = len(waiting)
    parts: list[RenderableType] = [
        head,
        Text(f"{n} line{'s' * (n != 1)} it claimed in its own data directory wait for it:"),
        *(_line(line) for line in waiting),
    ]
    if alive:
        parts.append(Text("it is alive: it writes them itself", style="dim"))
    else:
        parts.append(
            Text(
                f"if that host is gone for good, `bgtasks recover --owner {owner['owner']}"
                " --rewrite` writes them here; each may then be in two data directories",
                style="dim",
            )
        )
    return Group(*parts)


def format_rewritten(result: dict[str, Any]) -> RenderableType:
    """The lines written here for a lost owner, and the plain warning that goes with them."""
    lines = result.get("rewritten") or []
    if not lines:
        return Text(f"owner {result['owner']} had no lines waiting: nothing was rewritten")
    n = len(lines)
    return Group(
        Text.assemble(
            ("rewrote ", "green"),
            f"{n} line{'s' * (n != 1)} of owner {result['owner']} in this data directory:",
        ),
        *(_line(line) for line in lines),
        Text(f"warning: {TWICE}", style="bold yellow"),
    )
