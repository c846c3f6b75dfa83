"""GET /events: what the registry committed, as server-sent events, against real servers on both
stores (issue 17)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import events as events_module
from tests.helpers import LiveServer, wait_until
from tests.loadgen import post_concurrently
from tests.postgres import STORES

pytestmark = pytest.mark.parametrize("store", STORES, indirect=True)


@dataclass(frozen=True)
class Sse:
    id: str
    event: str
    data: dict[str, Any]


def read_events(response: httpx.Response) -> Iterator[Sse]:
    """The events of an open `text/event-stream` response, as they come."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "event" in fields:
                yield Sse(fields.get("id", ""), fields["event"], json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


class Collector:
    """Reads a stream in a thread; `events` fills as they arrive."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[Sse] = []
        self.open = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=None))
        self._response = self._client.send(
            self._client.build_request("GET", url, headers=headers), stream=True
        )
        assert self._response.status_code == 200
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in read_events(self._response):
                self.events.append(event)
        except httpx.HTTPError:
            pass  # closed by the test

    def kinds(self, request_id: str) -> list[str]:
        return [e.event for e in self.events if e.data["request_id"] == request_id]

    def close(self) -> None:
        self._response.close()
        self._client.close()
        self._thread.join(timeout=5)


@pytest.fixture
def collect() -> Iterator[Callable[..., Collector]]:
    opened: list[Collector] = []

    def start(url: str, headers: dict[str, str] | None = None) -> Collector:
        collector = Collector(url, headers)
        opened.append(collector)
        return collector

    yield start
    for collector in opened:
        collector.close()


NOTIFY = [
    "request_received",
    "task_queued",
    "task_queued",
    "response_sent",
    "task_started",
    "task_done",
    "task_started",
    "task_done",
]


def test_a_notify_s_events_arrive_in_commit_order(
    start_server: Callable[..., LiveServer], collect: Callable[..., Collector]
) -> None:
    live = start_server(delay=0.1)
    stream = collect(f"{live.url}/events")
    response = httpx.post(f"{live.url}/send-notification/a@example.com", params={"q": "hi"})
    request_id = response.headers["x-request-id"]
    wait_until(lambda: stream.kinds(request_id) == NOTIFY)
    events = [e for e in stream.events if e.data["request_id"] == request_id]
    queued = [e.data["task_id"] for e in events if e.event == "task_queued"]
    assert [e.data["task_id"] for e in events if e.event == "task_done"] == queued
    assert events[0].data["path"] == "/send-notification/a@example.com"
    assert events[1].data["file"] == "log.txt"
    times = [e.data["at"] for e in events]
    assert times == sorted(times)  # the registry's own times, in order
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)


def test_a_stream_resumes_after_a_drop_without_losing_or_repeating_an_event(
    start_server: Callable[..., LiveServer], collect: Callable[..., Collector]
) -> None:
    live = start_server()
    seen: list[Sse] = []
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=10)) as client,
        client.stream("GET", f"{live.url}/events") as response,
    ):
        path = f"{live.url}/send-notification/a@example.com"
        first = httpx.post(path).headers["x-request-id"]
        for event in read_events(response):
            seen.append(event)
            if event.event == "task_done" and event.data["request_id"] == first:
                break  # the connection drops here ...
    missed = [  # ... while more is committed
        httpx.post(f"{live.url}/send-notification/u{n}@example.com").headers["x-request-id"]
        for n in range(3)
    ]
    resumed = collect(f"{live.url}/events", {"Last-Event-ID": seen[-1].id})
    wait_until(lambda: all("task_done" in resumed.kinds(rid) for rid in missed))
    assert not {e.id for e in seen} & {e.id for e in resumed.events}  # nothing twice
    for rid in missed:  # nothing lost
        assert resumed.kinds(rid) == [
            "request_received",
            "task_queued",
            "response_sent",
            "task_started",
            "task_done",
        ]


def test_a_stream_can_follow_one_request(
    start_server: Callable[..., LiveServer], collect: Callable[..., Collector]
) -> None:
    live = start_server()
    stream = collect(f"{live.url}/events?request_id=chosen-id-1")
    httpx.post(f"{live.url}/send-notification/other@example.com")
    httpx.post(
        f"{live.url}/send-notification/a@example.com", headers={"x-request-id": "chosen-id-1"}
    )
    wait_until(lambda: "task_done" in stream.kinds("chosen-id-1"))
    assert {e.data["request_id"] for e in stream.events} == {"chosen-id-1"}


def test_a_bad_last_event_id_is_a_422_naming_the_header(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    other_store_s = "7/0" if live.app.state.settings.database_url else "7.7/0"
    for value in ("nonsense", other_store_s, "9" * 30 + "/0"):
        response = httpx.get(f"{live.url}/events", headers={"Last-Event-ID": value})
        assert response.status_code == 422, value
        locations = [error["loc"] for error in response.json()["detail"]]
        assert locations == [["header", "last-event-id"]]


def test_nothing_is_recorded_while_no_stream_listens(
    start_server: Callable[..., LiveServer], collect: Callable[..., Collector]
) -> None:
    live = start_server()
    unheard = httpx.post(f"{live.url}/send-notification/a@example.com").headers["x-request-id"]
    wait_until(lambda: httpx.get(f"{live.url}/health").json()["unfinished_tasks"] == 0)
    beginning = "0.0/0" if live.app.state.settings.database_url else "0/0"
    stream = collect(f"{live.url}/events", {"Last-Event-ID": beginning})
    heard = httpx.post(f"{live.url}/send-notification/b@example.com").headers["x-request-id"]
    wait_until(lambda: "task_done" in stream.kinds(heard))
    assert stream.kinds(unheard) == []


def test_another_process_s_commits_reach_the_stream(
    start_server: Callable[..., LiveServer], collect: Callable[..., Collector], tmp_path: Path
) -> None:
    """Two servers on one registry (SQLite: one data directory, as `--workers 2`; PostgreSQL:
    one database, each its own data directory): one's stream has the other's events."""
    one = start_server(data_dir=tmp_path / "one")
    two = start_server(
        data_dir=tmp_path / ("one" if one.app.state.settings.database_url is None else "two")
    )
    stream = collect(f"{one.url}/events")  # its headers: every process records
    request_id = httpx.post(f"{two.url}/send-notification/a@example.com").headers["x-request-id"]
    wait_until(lambda: "task_done" in stream.kinds(request_id))


def test_a_client_that_stops_reading_is_dropped_and_the_server_keeps_serving(
    start_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "SEND_TIMEOUT_S", 1.0)
    live = start_server()
    host, port = live.url.removeprefix("http://").split(":")
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((host, int(port)))
    stuck.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads a byte
    try:
        # Far more events than the kernel's buffers on both sides hold (~1.5 KB a request).
        local = "u" * 180
        paths = [f"/send-notification/{local}{n}@example.com?q=q{n}" for n in range(4000)]
        assert post_concurrently(live.url, paths, concurrency=100) == [200] * len(paths)
        assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
        wait_until(lambda: httpx.get(f"{live.url}/health").json()["unfinished_tasks"] == 0)
        stuck.settimeout(10)
        # The server gave up on it: the connection ends once its buffered bytes are read.
        received = 0
        while chunk := stuck.recv(1 << 20):
            received += len(chunk)
        assert received < 4000 * 1500  # it did not get them all: it was dropped
    finally:
        stuck.close()
