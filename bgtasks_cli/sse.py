"""The server's event stream (`GET /events`), read in a thread: it only says *when* to look.

Server-sent events are parsed here (`event:`, `id:`, `data:` lines; no extra dependency).
`EventStream.open` returns once the response headers arrived: from then on, the server
delivers every later commit's event. A dropped stream is reopened with `Last-Event-ID`, so
none is lost while the server's log still holds it. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

# The server pings every 15 s: a stream silent for longer than this is dead, not quiet.
READ_TIMEOUT_S = 45.0
RECONNECT_S = (0.1, 0.5, 1.0, 2.0)  # waits between attempts to reopen a dropped stream


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One event: its kind (`task_done`...), its id, and its JSON data."""

    kind: str
    id: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamState:
    """The stream went down (`up` False: with why) or came back (`up` True)."""

    up: bool
    reason: str = ""


class NoEvents(Exception):
    """The server answers, but serves no event stream (an older bgtasks: 404)."""


def parse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """The events in a `text/event-stream`'s lines. Comments (pings) and events without
    JSON object data are skipped."""
    kind, event_id = "message", ""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                with contextlib.suppress(ValueError):
                    body = json.loads("\n".join(data))
                    if isinstance(body, dict):
                        yield ServerEvent(kind, event_id, body)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            event_id = value


Item = ServerEvent | StreamState


class EventStream:
    """`GET /events` (with `params`, e.g. one request_id) on `http`, read in a thread.

    `open()` connects in the caller's thread and returns once the headers arrived, raising
    NoEvents if the server has no stream and httpx.TransportError if nothing answers;
    `start()` (after `open()`, or alone: then it connects in the thread, and a failure is a
    `StreamState(up=False)`) begins reading. `wait()` returns what arrived.
    """

    def __init__(self, http: httpx.Client, params: dict[str, str] | None = None) -> None:
        self._http = http
        self._params = params or {}
        self._items: queue.Queue[Item] = queue.Queue()
        self._closed = threading.Event()
        self._response: httpx.Response | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.last_id: str | None = None
        self.up = False
        self._said_down = False

    def open(self) -> None:
        headers = {"last-event-id": self.last_id} if self.last_id else {}
        request = self._http.build_request(
            "GET",
            "/events",
            params=self._params,
            headers={"accept": "text/event-stream", **headers},
            timeout=httpx.Timeout(self._http.timeout.connect, read=READ_TIMEOUT_S),
        )
        response = self._http.send(request, stream=True)
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if response.status_code != 200 or media != "text/event-stream":
            response.close()
            raise NoEvents(f"GET /events answered {response.status_code} ({media or 'no type'})")
        with self._lock:
            if self._closed.is_set():
                response.close()
                return
            self._response = response
        self.up = True

    def start(self) -> EventStream:
        self._thread = threading.Thread(target=self._read, name="bgtasks-events", daemon=True)
        self._thread.start()
        return self

    def pending(self) -> bool:
        return not self._items.empty()

    def wait(self, timeout: float) -> list[Item]:
        """What arrived, waiting up to `timeout` seconds for the first item: [] if nothing."""
        try:
            items = [self._items.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._items.get_nowait())
        return items

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            response, self._response = self._response, None
        if response is not None:
            _interrupt(response)
            response.close()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            if self._response is None:
                try:
                    self.open()
                except (httpx.HTTPError, NoEvents) as exc:
                    self._down(str(exc) or type(exc).__name__)
                    self._closed.wait(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
                    attempt += 1
                    continue
                if self._response is None:
                    return  # closed while it opened
                if self._said_down:
                    self._said_down = False
                    self._items.put(StreamState(up=True))
            attempt = 0
            response = self._response
            try:
                for event in parse(response.iter_lines()):
                    self.last_id = event.id or self.last_id
                    self._items.put(event)
                reason = "the server ended the stream"
            except (httpx.HTTPError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            with self._lock:
                if self._response is response:
                    self._response = None
            response.close()
            if not self._closed.is_set():
                self._down(reason)

    def _down(self, reason: str) -> None:
        """Say once that the stream is down, until it is up again."""
        self.up = False
        if not self._said_down:
            self._said_down = True
            self._items.put(StreamState(up=False, reason=reason))


def _interrupt(response: httpx.Response) -> None:
    """Wake the thread blocked reading `response`: closing a socket another thread reads
    does not, on Linux; shutting it down does."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
