"""The timeline picture: one request and its tasks on one time axis, in characters.

A pure function of its arguments, like `render.py`: no I/O, no clock reads. The bar
characters and marks carry the meaning, so it reads the same with `NO_COLOR`; colour only
helps. When the response is short beside the tasks (5 ms against 2,000 ms), a linear axis would
hide the response, so the axis breaks at `≈` after the response and each part has its scale.

All times come from one clock, but an event can be recorded a little after its effect (the
client can note its response before the server notes the last byte). An event recorded before
its cause is drawn at its cause's moment, so no span is ever negative; marks closer than a
column are drawn in one column, as simultaneous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.text import Text

from server.status import UNFINISHED

if TYPE_CHECKING:
    from bgtasks_cli.client import Outcome

BREAK_RATIO = 10.0
"""The axis breaks when the whole picture spans at least this many times the response."""
MIN_TRACK = 16
"""Columns of axis kept even when the width is too small for them."""
LEFT_SHARE = 3
"""With a broken axis, 1/LEFT_SHARE of the columns (at least 8) go to the response."""

# How a span of each kind is drawn: its first, middle and last column, or one if that is all.
GLYPHS = {
    "client": ("├", "─", "┤", "│"),
    "server": ("├", "─", "▲", "▲"),
    "wait": ("░", "░", "░", "░"),
    "run": ("█", "█", "█", "█"),
}
STYLES = {"client": "bold", "server": "cyan", "wait": "yellow", "run": "green"}
MARKS = {"failed": "✗", "recovered": "↺", "cancelled": "⊘"}
"""The mark at the end of a task's last bar, by status (done has none)."""
MARK_STYLES = {"✗": "bold red", "↺": "green", "⊘": "magenta", "…": "dim"}
KEY = {
    "client": "├─┤ client: sent → got response",
    "server": "├─▲ server: request → last byte sent",
    "░": "░ waiting",
    "█": "█ running (written at its end)",
    "✗": "✗ failed",
    "↺": "↺ recovered after its server stopped",
    "⊘": "⊘ cancelled",
    "…": "… not ended yet",
}
"""What the picture's rows and glyphs mean; only those it shows are listed."""


@dataclass(slots=True)
class _Span:
    kind: str
    start: float
    end: float | None  # None: not ended, drawn to the right edge
    mark: str | None = None  # replaces the last glyph


@dataclass(slots=True)
class _Row:
    label: str
    spans: list[_Span]
    style: str = ""


@dataclass(slots=True)
class _Try:
    """One attempt of a task: waiting from `waited_from`, running from `started` (None: it
    never started) until `ended` (None: not ended)."""

    waited_from: float
    started: float | None
    ended: float | None
    mark: str | None
    error: str | None = None


def _later(at: Any, floor: float | None) -> float | None:
    """`at` as a time no earlier than `floor` (an effect is never drawn before its cause)."""
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        return None
    return float(at) if floor is None else max(float(at), floor)


def _or(at: float | None, default: float) -> float:
    return default if at is None else at


def _number(millis: float) -> str:
    return f"{millis:.1f}" if millis < 100 else f"{millis:,.0f}"


def _ms(seconds: float) -> str:
    return f"{_number(seconds * 1000)} ms"


def _scale(seconds: float) -> str:
    millis = seconds * 1000
    if millis >= 100:
        return f"{millis:,.0f}"
    return f"{millis:.2g}" if millis >= 0.001 else "< 0.001"


class _Axis:
    """Seconds from the origin to columns 0..width-1; with `split`, columns up to `left` - 1
    hold 0..split, `left` is the break and the columns after it hold split..end."""

    def __init__(self, width: int, end: float, split: float | None) -> None:
        self.width, self.end, self.split = width, end, split
        self.left = max(8, width // LEFT_SHARE) if split is not None else width
        self.right = width - self.left - 1

    def col(self, at: float) -> int:
        if self.split is None:
            fraction = at / self.end if self.end > 0 else 0.0
            return math.floor(fraction * (self.width - 1) + 0.5)
        if at <= self.split:
            return math.floor(at / self.split * (self.left - 1) + 0.5)
        fraction = (at - self.split) / (self.end - self.split)
        return self.left + 1 + math.floor(fraction * (self.right - 1) + 0.5)

    def ticks(self) -> Text:
        cells = [" "] * self.width

        def put(label: str, first: int) -> None:
            last = first + len(label) - 1
            if first >= 0 and all(c == " " for c in cells[max(0, first - 1) : last + 2]):
                cells[first : last + 1] = label

        end = _number(self.end * 1000)
        put(end, self.width - len(end))
        if self.split is not None:
            split = _number(self.split * 1000)
            put(split, self.left - len(split))
            cells[self.left] = "≈"
        else:
            middle = _number(self.end * 500)
            put(middle, (self.width - 1) // 2 - len(middle) // 2)
        put("0", 0)
        return Text("".join(cells).rstrip(), style="dim")

    def scale(self) -> str:
        if self.split is None:
            return f"1 column = {_scale(self.end / max(1, self.width - 1))} ms"
        before = _scale(self.split / (self.left - 1))
        after = _scale((self.end - self.split) / max(1, self.right - 1))
        return f"axis broken at ≈: 1 column = {before} ms before, {after} ms after"

    def paint(self, row: _Row) -> Text:
        """The row's spans; a "…" goes in the column after its span (one is kept for it at the
        right edge), any other mark in place of the span's last glyph."""
        cells: list[tuple[str, str]] = [(" ", "")] * (self.width + 1)
        for span in row.spans:
            start, end = self.col(span.start), self.col(_or(span.end, self.end))
            first, fill, last, alone = GLYPHS[span.kind]
            style = "red" if span.mark == "✗" else STYLES[span.kind]
            for col in range(start, end + 1):
                glyph = fill if start < col < end else first if col == start else last
                cells[col] = (alone if start == end else glyph, style)
            if span.mark:
                cells[end + (span.mark == "…")] = (span.mark, MARK_STYLES[span.mark])
            if self.split is not None and start < self.left < end:
                cells[self.left] = ("≈", style)
        text = Text(row.label, style=row.style)
        for glyph, style in cells:
            text.append(glyph, style)
        text.rstrip()
        return text


def _tries(task: Mapping[str, Any], floor: float | None) -> list[_Try]:
    """The task's attempts in order: its failed ones, then the last (or a wait still going)."""
    status = str(task.get("status", ""))
    previous = _later(task.get("queued_at"), floor)
    previous = floor if previous is None else previous
    if previous is None:
        return []
    tries: list[_Try] = []
    failures = sorted(task.get("failures") or [], key=lambda f: f.get("attempt", 0))
    for failure in failures:
        start = _or(_later(failure.get("started_at"), previous), previous)
        end = _or(_later(failure.get("failed_at"), start), start)
        tries.append(_Try(previous, start, end, "✗", str(failure.get("error"))))
        previous = end
    started = _later(task.get("started_at"), previous)
    finished = _later(task.get("finished_at"), _or(started, previous))
    # A failed last attempt is also the task's own started_at: its row is drawn already.
    last_start = _later(failures[-1].get("started_at"), None) if failures else None
    own_start = _later(task.get("started_at"), None)
    new_try = own_start is not None and (last_start is None or own_start > last_start)
    error = str(task.get("last_error")) if status == "failed" and task.get("last_error") else None
    if new_try and started is not None:
        mark = MARKS.get(status) if finished is not None else "…"
        tries.append(_Try(previous, started, finished, mark, error))
    elif status in UNFINISHED:
        tries.append(_Try(previous, None, _later(task.get("next_attempt_at"), previous), "…"))
    elif not tries:  # ended without starting, e.g. recovered or failed while queued
        tries.append(_Try(previous, None, _or(finished, previous), MARKS.get(status), error))
    return tries


def _task_rows(number: int, tries: list[_Try]) -> list[_Row]:
    """One row per attempt: the wait before it, then its run."""
    rows = []
    for i, one in enumerate(tries):
        if one.started is None:
            spans = [_Span("wait", one.waited_from, one.ended, one.mark)]
        else:
            spans = [
                _Span("wait", one.waited_from, one.started),
                _Span("run", one.started, one.ended, one.mark),
            ]
        rows.append(
            _Row(f"task {number}", spans) if i == 0 else _Row(f"  try {i + 1}", spans, "dim")
        )
    return rows


def _try_words(one: _Try, status: str, alone: bool) -> list[str]:
    """One attempt in words: how long it waited and ran, and how it ended."""
    if one.started is None:
        if one.mark == "…":
            return ["not started yet"]
        waited = _ms(_or(one.ended, one.waited_from) - one.waited_from)
        return [f"{status} after waiting {waited}", *([one.error] if one.error else [])]
    words = [f"waited {_ms(one.started - one.waited_from)}"]
    if one.ended is not None:
        ran = _ms(one.ended - one.started)
        verb = {"✗": "failed after", "↺": "recovered", "⊘": "cancelled after"}.get(one.mark or "")
        words.append(f"{verb or 'ran'} {ran}" + (" after it started" if one.mark == "↺" else ""))
    elif not alone:  # a task's only attempt: its status says it
        words.append("running")
    return [*words, one.error] if one.error else words


def _task_text(task: Mapping[str, Any], number: int, tries: list[_Try], width: int) -> list[Text]:
    """What a task's rows show, in words: status, what it writes, each attempt."""
    status = str(task.get("status", "?"))
    head = Text.assemble(f"task {number} ", (status, MARK_STYLES.get(MARKS.get(status, ""), "")))
    parts = [head, Text(f"{task.get('line', '')!r} → {task.get('file', '?')}")]
    if len(tries) == 1:
        parts += [Text(w) for w in _try_words(tries[0], status, alone=True)]
    lines = _fill(parts, width, " · ", indent=4)
    for i, one in enumerate(tries if len(tries) > 1 else []):
        style = "red" if one.mark == "✗" else ""
        words = [f"  try {i + 1}", *_try_words(one, status, alone=False)]
        lines += _fill([Text(w, style=style) for w in words], width, " · ", indent=6)
    return lines


def _words(text: Text, first: int, rest: int) -> list[Text]:
    """`text` cut between words into pieces of at most `first`, then `rest`, terminal cells
    (a word longer than that is cut where it must)."""
    plain, pieces, start, room = text.plain, [], 0, first
    while cell_len(plain[start:]) > room:
        cut, end, cells = None, start, 0
        for i in range(start, len(plain)):
            cells += cell_len(plain[i])
            if cells > room:
                break
            if plain[i] == " " and i > start:
                cut = i
            end = i + 1
        end = max(end, start + 1)
        pieces.append(text[start : _or(cut, end)])
        start, room = (end if cut is None else cut + 1), rest
    pieces.append(text[start:])
    return pieces


def _fill(parts: list[Text], width: int, sep: str = "  ", indent: int = 2) -> list[Text]:
    """`parts` in lines of at most `width` cells, broken between parts where they fit and
    between words where they do not; lines after the first are indented."""
    lines: list[Text] = []
    line = Text()
    for part in parts:
        joined = Text.assemble(line, sep, part) if line.plain else part
        if cell_len(joined.plain) <= width - (indent if lines else 0):
            line = joined
            continue
        if line.plain:
            lines.append(line)
        *done, line = _words(part, width - (indent if lines else 0), max(1, width - indent))
        lines += done
    lines.append(line)
    return [line if i == 0 else Text(" " * indent) + line for i, line in enumerate(lines)]


def draw(
    record: Mapping[str, Any],
    *,
    width: int,
    client_sent_at: float | None = None,
    client_received_at: float | None = None,
    now: float | None = None,
) -> Text:
    """The timeline of one request, at most `width` columns wide (40 or more reads well).

    `record` is the server's `GET /requests/{id}`; the client's two times (Unix seconds) add
    the round trip when known, and the axis counts from the first of them (else from when the
    server got the request). `now`, when given, is how far a task that has not ended is drawn;
    without it, up to the last recorded moment."""
    sent = _later(client_sent_at, None) if client_received_at is not None else None
    got_request = _later(record.get("received_at"), sent)
    floor = sent if got_request is None else got_request
    sent_last = _later(record.get("response_sent_at"), floor)
    got = _later(client_received_at, sent if sent_last is None else sent_last)
    tasks = sorted(record.get("tasks") or [], key=lambda t: t.get("seq", 0))
    numbers = [int(task.get("seq", i)) + 1 for i, task in enumerate(tasks)]
    tries = [_tries(task, floor) for task in tasks]
    rows: list[_Row] = []
    if sent is not None and got is not None:
        rows.append(_Row("client", [_Span("client", sent, got)], "bold"))
    if got_request is not None and sent_last is not None:
        rows.append(_Row("server", [_Span("server", got_request, sent_last)]))
    for number, attempts in zip(numbers, tries, strict=True):
        rows += _task_rows(number, attempts)
    lines = _fill([Text(f"timeline of request {record.get('id', '?')}", style="bold")], width)
    if record.get("method"):
        what = f"{record['method']} {record.get('path', '')} → {record.get('status_code')}"
        lines += _fill([Text(what)], width)
    known = [t for row in rows for s in row.spans for t in (s.start, s.end) if t is not None]
    if not known:
        return Text("\n").join([*lines, Text("no times recorded yet", style="dim")])
    origin = min(known) if sent is None else sent
    horizon = max(known)
    if now is not None and any(s.end is None for row in rows for s in row.spans):
        horizon = max(horizon, now)
    response = got if sent is not None else sent_last
    split = None if response is None else response - origin
    if split is not None and not (split > 0 and BREAK_RATIO * split <= horizon - origin):
        split = None
    label_width = max(len(row.label) for row in [*rows, _Row("ms", [])]) + 1
    # One column after the axis for the "…" of a span not ended.
    track = max(MIN_TRACK, width - label_width) - any(s.mark == "…" for r in rows for s in r.spans)
    axis = _Axis(track, horizon - origin, split)
    since = "client sent" if sent is not None else "server got request"
    header = [Text(f"ms from {since};", style="dim"), Text(axis.scale(), style="dim")]
    lines += _fill(header, width, " ")
    lines.append(Text("ms".rjust(label_width - 1) + " ", style="dim") + axis.ticks())
    used = {row.label for row in rows}
    for row in rows:
        for span in row.spans:
            span.start -= origin
            span.end = None if span.end is None else span.end - origin
        lines.append(axis.paint(_Row(row.label.ljust(label_width), row.spans, row.style)))
        used.update(lines[-1].plain[label_width:])
    lines += _fill([Text(KEY[k], style="dim") for k in KEY if k in used], width)
    for task, number, attempts in zip(tasks, numbers, tries, strict=True):
        lines += _task_text(task, number, attempts, width)
    return Text("\n").join(lines)


def draw_outcome(outcome: Outcome, *, width: int, now: float | None = None) -> Text:
    """The timeline of a request the CLI fired and followed (`notify`, `readme`, `demo`);
    `now` as for `draw` (for a request whose tasks did not end in time)."""
    return draw(
        outcome.record or {"id": outcome.fired.request_id},
        width=width,
        client_sent_at=outcome.fired.client_sent_at,
        client_received_at=outcome.fired.client_received_at,
        now=now,
    )
