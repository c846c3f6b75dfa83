"""What background tasks do relative to the response, against a real uvicorn server."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from server.records import TaskRecord
from server.registry import Ended
from tests.helpers import LiveServer, wait_until
from tests.loadgen import post_concurrently
from tests.postgres import STORES

# The seed's contract holds on either store.
pytestmark = pytest.mark.parametrize("store", STORES, indirect=True)


def request_of(live: LiveServer, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{live.url}/requests/{request_id}").json()
    return body


def all_ended(live: LiveServer, request_id: str) -> dict[str, Any] | None:
    body = request_of(live, request_id)
    ended = body["tasks"] and all(t["status"] in ("done", "failed") for t in body["tasks"])
    return body if ended and body.get("response_sent_at") else None


def unfinished(live: LiveServer) -> int:
    count: int = httpx.get(f"{live.url}/health").json()["unfinished_tasks"]
    return count


def test_response_returns_before_the_slow_writes(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(delay=1.0)
    sent = time.time()
    response = httpx.post(f"{live.url}/send-notification/a@example.com", params={"q": "hi"})
    received = time.time()
    assert response.status_code == 200
    assert received - sent < 1.0  # generous: the response does not wait for the 1 s task
    assert live.read("log.txt") == b""  # nothing written yet when the response is in hand
    body = wait_until(lambda: all_ended(live, response.headers["x-request-id"]), timeout=15)
    first, second = body["tasks"]
    assert [first["status"], second["status"]] == ["done", "done"]
    assert body["response_sent_at"] < first["started_at"] + 0.5
    assert body["response_sent_at"] < first["finished_at"] < second["started_at"]
    assert second["finished_at"] - body["response_sent_at"] >= 2.0  # two 1 s tasks, in order
    assert first["queued_at"] <= second["queued_at"] <= body["response_sent_at"]
    assert live.read("log.txt") == b"found query: hi\nmessage to a@example.com\n"


def test_a_second_request_is_answered_while_the_first_ones_tasks_sleep(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=1.0)
    with httpx.Client(base_url=live.url) as client:
        first = client.post("/send-notification/a@example.com")
        started = time.monotonic()
        second = client.post("/send-notification/b@example.com")  # same keep-alive connection
        assert time.monotonic() - started < 0.9
    assert first.status_code == second.status_code == 200


def header(head: bytes, name: bytes) -> bytes:
    """The value of the header `name` in a response's head; the test fails without it."""
    found = re.search(rb"^" + re.escape(name) + rb":\s*(\S+)", head, re.I | re.M)
    assert found, f"no {name.decode()} header in {head!r}"
    return found.group(1)


def http_exchange(sock: socket.socket, path: str) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on a kept-alive socket and read one response."""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(header(head, b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return int(head.split()[1]), head


def test_a_failing_task_is_recorded_and_does_not_break_anything(
    start_server: Callable[..., LiveServer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = start_server(max_attempts=1)  # one failure, at once (retries: tests/test_retries.py)
    registry = live.app.state.registry
    real_submit = registry.submit

    def flaky_submit(task: TaskRecord, ended: Ended) -> None:
        if task.line.startswith("found query: boom"):
            ended(OSError("injected disk fault"))
            return
        real_submit(task, ended)

    monkeypatch.setattr(registry, "submit", flaky_submit)
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as sock:
        status, head = http_exchange(sock, "/send-notification/a@example.com?q=boom")
        assert status == 200
        request_id = header(head, b"x-request-id").decode()
        body = wait_until(lambda: all_ended(live, request_id))
        failed, done = body["tasks"]
        assert failed["status"] == "failed"
        assert "injected disk fault" in failed["last_error"]
        assert done["status"] == "done"  # the request's other task still ran
        status, _ = http_exchange(sock, "/send-notification/b@example.com")
        assert status == 200  # the same keep-alive connection still works
    wait_until(lambda: live.read("log.txt").count(b"\n") == 2)
    assert live.read("log.txt") == b"message to a@example.com\nmessage to b@example.com\n"
    logged = [r for r in caplog.records if "failed" in r.getMessage() and r.exc_info]
    assert len(logged) == 1  # logged once, with its traceback


def test_data_file_replaced_by_a_directory_fails_the_task_and_serving_goes_on(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(max_attempts=1)
    (live.data_dir / "README.md").mkdir()
    response = httpx.post(f"{live.url}/background_tasks", params={"framework": "Flask"})
    assert response.status_code == 200
    body = wait_until(lambda: all_ended(live, response.headers["x-request-id"]))
    assert body["tasks"][0]["status"] == "failed"
    assert "README.md is a directory, not a regular file" in body["tasks"][0]["last_error"]
    ok = httpx.post(f"{live.url}/send-notification/a@example.com")
    assert wait_until(lambda: all_ended(live, ok.headers["x-request-id"]))
    assert live.read("log.txt") == b"message to a@example.com\n"


LINE = re.compile(rb"(found query: q(\d+)|message to u(\d+)@example\.com)\n")


def test_a_thousand_concurrent_notifications_give_two_thousand_whole_lines(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    count = 1000

    paths = [f"/send-notification/u{i}@example.com?q=q{i}" for i in range(count)]
    assert post_concurrently(live.url, paths) == [200] * count
    # Intents are committed before each response: once none is unfinished, every task has
    # ended and nothing more will be written, so the file is complete (no sleep to guess it).
    wait_until(lambda: unfinished(live) == 0, timeout=60)
    lines = live.read("log.txt").splitlines(keepends=True)
    assert len(lines) == 2 * count
    assert all(LINE.fullmatch(line) for line in lines)
    queries = sorted(
        int(m.group(2)) for line in lines if (m := LINE.fullmatch(line)) and m.group(2)
    )
    emails = sorted(int(m.group(3)) for line in lines if (m := LINE.fullmatch(line)) and m.group(3))
    assert queries == emails == list(range(count))
    # Each request's own two lines are in order: its query line comes before its message line.
    position = {line: n for n, line in enumerate(lines)}
    assert all(
        position[f"found query: q{i}\n".encode()]
        < position[f"message to u{i}@example.com\n".encode()]
        for i in range(count)
    )
