# The pictures at 120 columns are wider than the code may be.
# ruff: noqa: E501
"""The timeline picture (`bgtasks_cli/picture.py`): its exact layout for fixed records at 40,
80 and 120 columns, and what must hold for any record (no line wider than the terminal, the
same picture with and without colour, no negative span, no clock read)."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console

from bgtasks_cli import picture
from bgtasks_cli.client import Fired, Outcome

T0 = 1_700_000_000.0
REQUEST_ID = "5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c"
WIDTHS = (40, 80, 120)


def at(ms: float | None) -> float | None:
    """A Unix time `ms` milliseconds after T0."""
    return None if ms is None else T0 + ms / 1000


def task(
    seq: int,
    line: str,
    *,
    queued: float,
    started: float | None,
    finished: float | None,
    status: str = "done",
    file: str = "log.txt",
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": f"3f2a9c1b-{seq + 1}",
        "request_id": REQUEST_ID,
        "seq": seq,
        "file": file,
        "line": line,
        "status": status,
        "queued_at": at(queued),
        "started_at": at(started),
        "finished_at": at(finished),
        "last_error": error,
        **extra,
    }


def request(
    path: str, tasks: list[dict[str, Any]], *, received: float, sent: float | None
) -> dict[str, Any]:
    return {
        "id": REQUEST_ID,
        "method": "POST",
        "path": path,
        "received_at": at(received),
        "response_sent_at": at(sent),
        "status_code": 200,
        "tasks": tasks,
    }


NO_SPACE = "OSError: [Errno 28] No space left on device"
# Each case: the server's record, the client's two times in ms after T0 (None: drawn as
# `bgtasks timeline ID` draws it, from the record alone) and `now` in ms after T0.
CASES: dict[str, tuple[dict[str, Any], tuple[float, float] | None, float | None]] = {
    # BGTASKS_DELAY=0: the whole request and both writes within 6 ms.
    "no_delay_notify": (
        request(
            "/send-notification/a@example.com",
            [
                task(0, "found query: hi\n", queued=2.9, started=4.3, finished=4.5),
                task(1, "message to a@example.com\n", queued=3.4, started=4.3, finished=5.9),
            ],
            received=1.5,
            sent=4.2,
        ),
        (0.0, 5.6),
        None,
    ),
    # The default 1 s per task: a 15 ms response, the last write 2 s later.
    "delayed_notify": (
        request(
            "/send-notification/a@example.com",
            [
                task(0, "found query: hi\n", queued=7.1, started=13.7, finished=1014.3),
                task(1, "message to a@example.com\n", queued=7.3, started=1014.3, finished=2015.2),
            ],
            received=6.8,
            sent=13.6,
        ),
        (0.0, 15.2),
        None,
    ),
    "failed_task": (
        request(
            "/background_tasks?framework=FastAPI",
            [
                task(
                    0,
                    "\n## FastAPI 框架精讲",
                    file="README.md",
                    status="failed",
                    queued=2.0,
                    started=3.2,
                    finished=1004.0,
                    error="[Errno 21] Is a directory: '/tmp/bgtasks-demo-x/README.md'",
                )
            ],
            received=1.2,
            sent=3.1,
        ),
        (0.0, 4.0),
        None,
    ),
    # Retries (coming): two failed attempts, 500 ms apart, then one that wrote.
    "two_failures_then_done": (
        request(
            "/send-notification/b@example.com",
            [
                task(
                    0,
                    "message to b@example.com\n",
                    queued=2.5,
                    started=3004.0,
                    finished=4005.0,
                    attempts=3,
                    last_error=None,
                    next_attempt_at=None,
                    failures=[
                        {
                            "attempt": 1,
                            "started_at": at(3),
                            "failed_at": at(1003),
                            "error": NO_SPACE,
                        },
                        {
                            "attempt": 2,
                            "started_at": at(1503),
                            "failed_at": at(2504),
                            "error": NO_SPACE,
                        },
                    ],
                )
            ],
            received=1.0,
            sent=3.5,
        ),
        (0.0, 4.4),
        None,
    ),
    # `bgtasks timeline ID` while the second task sleeps: no client times, drawn up to now.
    "still_running": (
        request(
            "/send-notification/c@example.com",
            [
                task(0, "found query: x\n", queued=0.6, started=1.9, finished=1002.4),
                task(
                    1,
                    "message to c@example.com\n",
                    status="running",
                    queued=0.8,
                    started=1002.5,
                    finished=None,
                ),
            ],
            received=0.0,
            sent=1.8,
        ),
        None,
        1500.0,
    ),
    # POST /dependency/background_tasks without q queues nothing.
    "no_tasks": (
        request("/dependency/background_tasks", [], received=0.9, sent=2.0),
        (0.0, 3.1),
        None,
    ),
}


def draw(name: str, width: int) -> str:
    """The case's picture as a terminal of `width` columns with NO_COLOR shows it."""
    record, client, now = CASES[name]
    text = picture.draw(
        record,
        width=width,
        client_sent_at=at(client[0]) if client else None,
        client_received_at=at(client[1]) if client else None,
        now=at(now),
    )
    console = Console(width=width, no_color=True, record=True, file=io.StringIO())
    console.print(text)
    return console.export_text()


EXPECTED = {
    ("no_delay_notify", 40): r"""
timeline of request
  5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/a@example.com →
  200
ms from client sent; 1 column = 0.18 ms
    ms 0              2.9            5.9
client ├─────────────────────────────┤
server         ├──────────────▲
task 1                 ░░░░░░░██
task 2                   ░░░░░██████████
├─┤ client: sent → got response
  ├─▲ server: request → last byte sent
  ░ waiting
  █ running (written at its end)
task 1 done
    'found query: hi\n' → log.txt
    waited 1.4 ms · ran 0.2 ms
task 2 done
    'message to a@example.com\n' →
    log.txt · waited 0.9 ms · ran 1.6 ms""",
    ("no_delay_notify", 80): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/a@example.com → 200
ms from client sent; 1 column = 0.082 ms
    ms 0                                  2.9                                5.9
client ├───────────────────────────────────────────────────────────────────┤
server                   ├────────────────────────────────▲
task 1                                    ░░░░░░░░░░░░░░░░░████
task 2                                          ░░░░░░░░░░░█████████████████████
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting
  █ running (written at its end)
task 1 done · 'found query: hi\n' → log.txt · waited 1.4 ms · ran 0.2 ms
task 2 done · 'message to a@example.com\n' → log.txt · waited 0.9 ms
    ran 1.6 ms""",
    ("no_delay_notify", 120): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/a@example.com → 200
ms from client sent; 1 column = 0.053 ms
    ms 0                                                      2.9                                                    5.9
client ├─────────────────────────────────────────────────────────────────────────────────────────────────────────┤
server                             ├───────────────────────────────────────────────────▲
task 1                                                        ░░░░░░░░░░░░░░░░░░░░░░░░░░░████
task 2                                                                  ░░░░░░░░░░░░░░░░░███████████████████████████████
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting  █ running (written at its end)
task 1 done · 'found query: hi\n' → log.txt · waited 1.4 ms · ran 0.2 ms
task 2 done · 'message to a@example.com\n' → log.txt · waited 0.9 ms · ran 1.6 ms""",
    ("delayed_notify", 40): r"""
timeline of request
  5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/a@example.com →
  200
ms from client sent;
  axis broken at ≈: 1 column = 1.5 ms
  before, 100 ms after
    ms 0      15.2≈                2,015
client ├─────────┤
server     ├────▲
task 1      ░░░░██≈███████████
task 2      ░░░░░░≈░░░░░░░░░░███████████
├─┤ client: sent → got response
  ├─▲ server: request → last byte sent
  ░ waiting
  █ running (written at its end)
task 1 done
    'found query: hi\n' → log.txt
    waited 6.6 ms · ran 1,001 ms
task 2 done
    'message to a@example.com\n' →
    log.txt · waited 1,007 ms
    ran 1,001 ms""",
    ("delayed_notify", 80): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/a@example.com → 200
ms from client sent; axis broken at ≈: 1 column = 0.66 ms before, 43 ms after
    ms 0                   15.2≈                                           2,015
client ├──────────────────────┤
server           ├──────────▲
task 1            ░░░░░░░░░░███≈████████████████████████
task 2            ░░░░░░░░░░░░░≈░░░░░░░░░░░░░░░░░░░░░░░█████████████████████████
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting
  █ running (written at its end)
task 1 done · 'found query: hi\n' → log.txt · waited 6.6 ms · ran 1,001 ms
task 2 done · 'message to a@example.com\n' → log.txt · waited 1,007 ms
    ran 1,001 ms""",
    ("delayed_notify", 120): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/a@example.com → 200
ms from client sent; axis broken at ≈: 1 column = 0.42 ms before, 27 ms after
    ms 0                                15.2≈                                                                      2,015
client ├───────────────────────────────────┤
server                 ├───────────────▲
task 1                  ░░░░░░░░░░░░░░░█████≈██████████████████████████████████████
task 2                  ░░░░░░░░░░░░░░░░░░░░≈░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░██████████████████████████████████████
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting  █ running (written at its end)
task 1 done · 'found query: hi\n' → log.txt · waited 6.6 ms · ran 1,001 ms
task 2 done · 'message to a@example.com\n' → log.txt · waited 1,007 ms · ran 1,001 ms""",
    ("failed_task", 40): r"""
timeline of request
  5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST
  /background_tasks?framework=FastAPI →
  200
ms from client sent;
  axis broken at ≈: 1 column = 0.4 ms
  before, 50 ms after
    ms 0       4.0≈                1,004
client ├─────────┤
server    ├────▲
task 1      ░░░███≈████████████████████✗
├─┤ client: sent → got response
  ├─▲ server: request → last byte sent
  ░ waiting
  █ running (written at its end)
  ✗ failed
task 1 failed
    '\n## FastAPI 框架精讲' → README.md
    waited 1.2 ms
    failed after 1,001 ms
    [Errno 21] Is a directory:
    '/tmp/bgtasks-demo-x/README.md'""",
    ("failed_task", 80): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /background_tasks?framework=FastAPI → 200
ms from client sent; axis broken at ≈: 1 column = 0.17 ms before, 21 ms after
    ms 0                    4.0≈                                           1,004
client ├──────────────────────┤
server        ├──────────▲
task 1             ░░░░░░██████≈███████████████████████████████████████████████✗
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting
  █ running (written at its end)  ✗ failed
task 1 failed · '\n## FastAPI 框架精讲' → README.md · waited 1.2 ms
    failed after 1,001 ms
    [Errno 21] Is a directory: '/tmp/bgtasks-demo-x/README.md'""",
    ("failed_task", 120): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /background_tasks?framework=FastAPI → 200
ms from client sent; axis broken at ≈: 1 column = 0.11 ms before, 14 ms after
    ms 0                                 4.0≈                                                                      1,004
client ├───────────────────────────────────┤
server            ├────────────────▲
task 1                   ░░░░░░░░░░░████████≈██████████████████████████████████████████████████████████████████████████✗
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting  █ running (written at its end)
  ✗ failed
task 1 failed · '\n## FastAPI 框架精讲' → README.md · waited 1.2 ms · failed after 1,001 ms
    [Errno 21] Is a directory: '/tmp/bgtasks-demo-x/README.md'""",
    ("two_failures_then_done", 40): r"""
timeline of request
  5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/b@example.com →
  200
ms from client sent;
  axis broken at ≈: 1 column = 0.49 ms
  before, 200 ms after
     ms 0      4.4≈                4,005
client  ├────────┤
server    ├────▲
task 1       ░████≈█████✗
  try 2                 ░░█████✗
  try 3                        ░░░██████
├─┤ client: sent → got response
  ├─▲ server: request → last byte sent
  ░ waiting
  █ running (written at its end)
  ✗ failed
task 1 done
    'message to b@example.com\n' →
    log.txt
  try 1 · waited 0.5 ms
      failed after 1,000 ms
      OSError: [Errno 28] No space left
      on device
  try 2 · waited 500 ms
      failed after 1,001 ms
      OSError: [Errno 28] No space left
      on device
  try 3 · waited 500 ms · ran 1,001 ms""",
    ("two_failures_then_done", 80): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/b@example.com → 200
ms from client sent; axis broken at ≈: 1 column = 0.19 ms before, 87 ms after
     ms 0                    4.4≈                                          4,005
client  ├──────────────────────┤
server       ├────────────▲
task 1               ░░░████████≈███████████✗
  try 2                                     ░░░░░░████████████✗
  try 3                                                       ░░░░░█████████████
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting
  █ running (written at its end)  ✗ failed
task 1 done · 'message to b@example.com\n' → log.txt
  try 1 · waited 0.5 ms · failed after 1,000 ms
      OSError: [Errno 28] No space left on device
  try 2 · waited 500 ms · failed after 1,001 ms
      OSError: [Errno 28] No space left on device
  try 3 · waited 500 ms · ran 1,001 ms""",
    ("two_failures_then_done", 120): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/b@example.com → 200
ms from client sent; axis broken at ≈: 1 column = 0.12 ms before, 55 ms after
     ms 0                                 4.4≈                                                                     4,005
client  ├───────────────────────────────────┤
server          ├────────────────────▲
task 1                      ░░░░░████████████≈██████████████████✗
  try 2                                                         ░░░░░░░░░███████████████████✗
  try 3                                                                                     ░░░░░░░░░███████████████████
├─┤ client: sent → got response  ├─▲ server: request → last byte sent  ░ waiting  █ running (written at its end)
  ✗ failed
task 1 done · 'message to b@example.com\n' → log.txt
  try 1 · waited 0.5 ms · failed after 1,000 ms · OSError: [Errno 28] No space left on device
  try 2 · waited 500 ms · failed after 1,001 ms · OSError: [Errno 28] No space left on device
  try 3 · waited 500 ms · ran 1,001 ms""",
    ("still_running", 40): r"""
timeline of request
  5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/c@example.com →
  200
ms from server got request;
  axis broken at ≈: 1 column = 0.2 ms
  before, 75 ms after
    ms 0      1.8≈                1,500
server ├────────▲
task 1    ░░░░░░░≈██████████████
task 2     ░░░░░░≈░░░░░░░░░░░░░████████…
├─▲ server: request → last byte sent
  ░ waiting
  █ running (written at its end)
  … not ended yet
task 1 done
    'found query: x\n' → log.txt
    waited 1.3 ms · ran 1,000 ms
task 2 running
    'message to c@example.com\n' →
    log.txt · waited 1,002 ms""",
    ("still_running", 80): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/c@example.com → 200
ms from server got request;
  axis broken at ≈: 1 column = 0.078 ms before, 33 ms after
    ms 0                    1.8≈                                          1,500
server ├──────────────────────▲
task 1         ░░░░░░░░░░░░░░░░≈████████████████████████████████
task 2           ░░░░░░░░░░░░░░≈░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░████████████████…
├─▲ server: request → last byte sent  ░ waiting  █ running (written at its end)
  … not ended yet
task 1 done · 'found query: x\n' → log.txt · waited 1.3 ms · ran 1,000 ms
task 2 running · 'message to c@example.com\n' → log.txt · waited 1,002 ms""",
    ("still_running", 120): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /send-notification/c@example.com → 200
ms from server got request; axis broken at ≈: 1 column = 0.05 ms before, 21 ms after
    ms 0                                 1.8≈                                                                     1,500
server ├───────────────────────────────────▲
task 1             ░░░░░░░░░░░░░░░░░░░░░░░░░≈██████████████████████████████████████████████████
task 2                 ░░░░░░░░░░░░░░░░░░░░░≈░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░█████████████████████████…
├─▲ server: request → last byte sent  ░ waiting  █ running (written at its end)  … not ended yet
task 1 done · 'found query: x\n' → log.txt · waited 1.3 ms · ran 1,000 ms
task 2 running · 'message to c@example.com\n' → log.txt · waited 1,002 ms""",
    ("no_tasks", 40): r"""
timeline of request
  5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /dependency/background_tasks → 200
ms from client sent; 1 column = 0.097 ms
    ms 0              1.5            3.1
client ├───────────────────────────────┤
server          ├───────────▲
├─┤ client: sent → got response
  ├─▲ server: request → last byte sent""",
    ("no_tasks", 80): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /dependency/background_tasks → 200
ms from client sent; 1 column = 0.043 ms
    ms 0                                  1.5                                3.1
client ├───────────────────────────────────────────────────────────────────────┤
server                      ├────────────────────────▲
├─┤ client: sent → got response  ├─▲ server: request → last byte sent""",
    ("no_tasks", 120): r"""
timeline of request 5b1f0c3a9d2e4f6a8b7c1d0e2f3a4b5c
POST /dependency/background_tasks → 200
ms from client sent; 1 column = 0.028 ms
    ms 0                                                      1.5                                                    3.1
client ├───────────────────────────────────────────────────────────────────────────────────────────────────────────────┤
server                                  ├──────────────────────────────────────▲
├─┤ client: sent → got response  ├─▲ server: request → last byte sent""",
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(CASES))
def test_the_picture_of_each_case_at_each_width(name: str, width: int) -> None:
    drawn = draw(name, width)
    assert drawn == EXPECTED[(name, width)].removeprefix("\n") + "\n"
    for line in drawn.splitlines():
        assert cell_len(line) <= width, line
        assert line == line.rstrip(), line


def test_colour_only_helps() -> None:
    """With colour the characters are the same: the marks and bars carry the meaning."""
    record, client, _ = CASES["delayed_notify"]
    assert client is not None  # the case has the client's times
    sent, received = client
    text = picture.draw(record, width=80, client_sent_at=at(sent), client_received_at=at(received))
    coloured = Console(width=80, force_terminal=True, color_system="truecolor", file=io.StringIO())
    with coloured.capture() as capture:
        coloured.print(text)
    assert "\x1b[" in capture.get()
    assert text.plain + "\n" == draw("delayed_notify", 80)
    assert {span.style for span in text.spans} >= {"green", "yellow", "bold"}


def test_a_short_response_beside_long_tasks_breaks_the_axis() -> None:
    broken, linear = draw("delayed_notify", 80), draw("no_delay_notify", 80)
    assert "axis broken at ≈" in broken and "≈" in row(broken, "ms")
    assert "≈" not in linear

    def response_in(ms: float) -> str:
        record = request(
            "/send-notification/a@example.com",
            [task(0, "message to a@example.com\n", queued=1, started=2, finished=100)],
            received=0.5,
            sent=ms - 0.5,
        )
        return picture.draw(record, width=80, client_sent_at=at(0), client_received_at=at(ms)).plain

    # The break comes when everything takes ten times the response or more.
    assert "axis broken" in response_in(10.0)
    assert "axis broken" not in response_in(10.5)


def row(text: str, label: str) -> str:
    """The picture's line for the row labelled `label` ("ms": the axis' numbers)."""
    if label == "ms":
        return next(line for line in text.splitlines() if line.lstrip().startswith("ms 0"))
    return next(line for line in text.splitlines() if line.startswith(label + " "))


def columns(text: str, label: str) -> list[int]:
    """The columns of the non-blank characters of the row labelled `label`."""
    return [i for i, ch in enumerate(row(text, label)) if i >= len(label) and ch != " "]


def test_events_recorded_out_of_causal_order_are_drawn_at_once() -> None:
    """Under load the client can note its response before the server notes the last byte, and a
    task's times can trail its request's: nothing is drawn before its cause."""
    record = request(
        "/send-notification/f@example.com",
        [task(0, "message to f@example.com\n", queued=0.9, started=0.8, finished=0.7)],
        received=1.0,
        sent=4.0,
    )
    text = picture.draw(record, width=80, client_sent_at=at(0), client_received_at=at(3.8)).plain
    client, server, task_row = (columns(text, label) for label in ("client", "server", "task 1"))
    assert client[-1] == server[-1]  # the client got the response as the server sent it
    assert row(text, "client")[client[-1]] == "┤" and row(text, "server")[server[-1]] == "▲"
    assert task_row == [server[0]]  # queued, started and written when the server got it
    assert row(text, "task 1")[task_row[0]] == "█"
    assert "waited 0.0 ms" in text and "ran 0.0 ms" in text


def test_a_task_not_ended_is_drawn_up_to_now_or_to_the_last_record() -> None:
    record, _, now = CASES["still_running"]
    until_now = picture.draw(record, width=80, now=at(now)).plain
    assert row(until_now, "ms").endswith(" 1,500") and row(until_now, "task 2").endswith("█…")
    until_last = picture.draw(record, width=80).plain
    # The axis ends at the last recorded moment: task 2's start, 1,002.5 ms after the request.
    assert row(until_last, "ms").endswith(" 1,003") and row(until_last, "task 2").endswith("█…")
    assert len(row(until_last, "task 2")) == len(row(until_now, "task 2"))
    assert columns(until_last, "task 1")[-1] > columns(until_now, "task 1")[-1]


def test_a_request_not_recorded_yet() -> None:
    text = picture.draw({"id": "abc", "tasks": []}, width=40).plain
    assert text == "timeline of request abc\nno times recorded yet"


def test_draw_outcome_uses_the_client_s_times() -> None:
    record, client, _ = CASES["delayed_notify"]
    assert client is not None  # the case has the client's times
    sent, received = client
    fired = Fired(
        method="POST",
        path=record["path"],
        url="http://127.0.0.1:1" + record["path"],
        status=200,
        body={"message": "Message sent"},
        request_id=REQUEST_ID,
        client_sent_at=at(sent) or 0.0,
        client_received_at=at(received) or 0.0,
    )
    assert picture.draw_outcome(Outcome(fired, record), width=80).plain + "\n" == draw(
        "delayed_notify", 80
    )


def test_drawing_reads_no_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("the picture read the clock")

    for name in ("time", "monotonic", "perf_counter", "time_ns"):
        monkeypatch.setattr(time, name, no_clock)
    for name in CASES:
        assert draw(name, 80) == EXPECTED[(name, 80)].removeprefix("\n") + "\n"


# --- any record -------------------------------------------------------------------------------

moment = st.one_of(st.none(), st.floats(min_value=-5_000, max_value=5_000))
STATUSES = ["queued", "running", "done", "failed", "recovered", "retrying", "cancelled", "odd"]


@st.composite
def records(draw_: st.DrawFn) -> tuple[dict[str, Any], float | None, float | None, float | None]:
    tasks = []
    for seq in range(draw_(st.integers(0, 4))):
        failures = [
            {
                "attempt": n + 1,
                "started_at": at(draw_(moment)),
                "failed_at": at(draw_(moment)),
                "error": draw_(st.text(max_size=60)),
            }
            for n in range(draw_(st.integers(0, 3)))
        ]
        queued = draw_(moment)
        tasks.append(
            task(
                seq,
                draw_(st.text(max_size=80)),
                queued=0.0 if queued is None else queued,
                started=draw_(moment),
                finished=draw_(moment),
                status=draw_(st.sampled_from(STATUSES)),
                error=draw_(st.one_of(st.none(), st.text(max_size=80))),
                failures=failures,
                next_attempt_at=at(draw_(moment)),
            )
        )
        if draw_(st.booleans()):
            tasks[-1]["queued_at"] = None
    record = request("/send-notification/" + draw_(st.text(max_size=40)), tasks, received=0, sent=0)
    record["received_at"], record["response_sent_at"] = at(draw_(moment)), at(draw_(moment))
    return record, at(draw_(moment)), at(draw_(moment)), at(draw_(moment))


@settings(max_examples=300, deadline=None)
@given(records(), st.integers(40, 200))
def test_any_record_fits_the_width(
    case: tuple[dict[str, Any], float | None, float | None, float | None], width: int
) -> None:
    record, sent, received, now = case
    text = picture.draw(
        record, width=width, client_sent_at=sent, client_received_at=received, now=now
    )
    for line in text.plain.splitlines():
        assert cell_len(line) <= width, (width, line)


def test_a_task_that_failed_before_it_started_shows_its_error() -> None:
    """With no delay a task whose file cannot be written fails at its claim, never started:
    the picture is where `bgtasks timeline` says why."""
    error = "NotARegularFile: README.md is a directory, not a regular file"
    record = request(
        "/background_tasks?framework=FastAPI",
        [
            task(
                0,
                "\n## FastAPI 框架精讲",
                file="README.md",
                status="failed",
                queued=2.0,
                started=None,
                finished=2.6,
                error=error,
            )
        ],
        received=1.2,
        sent=3.1,
    )
    text = picture.draw(record, width=80).plain
    assert text.splitlines()[-3:] == [
        "task 1 failed · '\\n## FastAPI 框架精讲' → README.md",
        "    failed after waiting 0.6 ms",
        f"    {error}",
    ]
