"""When to look again: on the server's events (`GET /events`), not on a timer.

The registry's records stay the truth the views render; an event only says that something
changed. A slow safety poll covers a stream that a proxy holds back, and a server without
`/events` (an older bgtasks) is polled as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from bgtasks_cli.sse import EventStream, NoEvents
from server.status import ENDED

if TYPE_CHECKING:
    from bgtasks_cli.client import Client, Fired

POLL_S = 0.05  # without a stream: how often to look
SAFETY_S = 1.0  # with a stream: look anyway after this long without an event
REDRAW_S = 0.1  # at most this many redraws a second, however many events come


def opened(client: Client, request_id: str | None = None) -> EventStream | None:
    """The server's event stream (of one request), open and read; None if there is none."""
    stream = client.events(request_id)
    try:
        stream.open()
    except (NoEvents, httpx.HTTPError):
        # An older server (404), or one the stream cannot reach: polling still works.
        stream.close()
        return None
    return stream.start()


def finished(record: dict[str, Any]) -> bool:
    """Whether the request's response time is recorded and its tasks all ended."""
    tasks = record.get("tasks", [])
    return bool(record.get("response_sent_at")) and all(t["status"] in ENDED for t in tasks)


def follow(
    client: Client, fired: Fired, *, timeout: float, poll: float = POLL_S
) -> Iterator[dict[str, Any]]:
    """Yield the request's record each time it changes, until `finished` or `timeout`
    seconds pass. The record is read once the stream is open (every later change then comes
    as an event), and again after each burst of events. Only a 404 means "not recorded
    yet"; any other failure is raised at once."""
    deadline = time.monotonic() + timeout
    stream = opened(client, fired.request_id)
    last: dict[str, Any] | None = None
    try:
        while True:
            record = client.request_record(fired.request_id) or {
                "id": fired.request_id,
                "tasks": [],
            }
            if record != last:
                last = record
                yield record
            left = deadline - time.monotonic()
            if finished(record) or left <= 0:
                return
            if stream is not None and stream.up:
                stream.wait(min(SAFETY_S, left))
            else:
                time.sleep(min(poll, left))
    finally:
        if stream is not None:
            stream.close()


def on_changes(
    client: Client,
    redraw: Callable[[], None],
    *,
    safety: float = SAFETY_S,
    throttle: float = REDRAW_S,
) -> None:
    """Call `redraw` each time the server's events say something changed, at most once per
    `throttle` seconds, and after `safety` seconds without one; forever (until Ctrl-C).
    Without a stream (an older server), every `safety` seconds."""
    stream = opened(client)
    try:
        drawn = time.monotonic()
        while True:
            if stream is not None and stream.up:
                stream.wait(safety)
            else:
                time.sleep(safety)
            # Events that come in a burst (one commit makes several) are one redraw.
            wait = drawn + throttle - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                if stream is not None:
                    stream.wait(0)
            redraw()
            drawn = time.monotonic()
    finally:
        if stream is not None:
            stream.close()
