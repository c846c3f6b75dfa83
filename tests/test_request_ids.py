"""Which requests the registry records, under which id (issue 13, bugs 2 and 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from server.middleware import MAX_RECORDED_PATH
from server.paths import registry_path
from tests.helpers import LiveServer, wait_until
from tests.postgres import STORES

CHOSEN = {"x-request-id": "client-chosen-1"}

# The seed's contract holds on either store.
pytestmark = pytest.mark.parametrize("store", STORES, indirect=True)


def record(live: LiveServer, request_id: str) -> dict[str, Any] | None:
    response = httpx.get(f"{live.url}/requests/{request_id}")
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body


def ended(live: LiveServer, request_id: str, count: int) -> dict[str, Any] | None:
    body = record(live, request_id)
    tasks = body["tasks"] if body else []
    done = len(tasks) == count and all(t["status"] == "done" for t in tasks)
    return body if done and body and body["response_sent_at"] else None


@pytest.mark.parametrize(
    ("method", "path", "status", "recorded"),
    [
        ("POST", "/send-notification/b@example.com", 200, True),  # accepted too
        ("DELETE", "/send-notification/b@example.com", 405, False),
        ("PUT", "/send-notification/b@example.com", 405, False),
        ("POST", "/no-such-endpoint", 404, False),
        ("POST", "/send-notification/not-an-email", 422, True),
        ("POST", "/dependency/background_tasks", 200, True),  # queues nothing
    ],
)
def test_an_accepted_request_is_never_replaced_by_a_later_one_with_its_id(
    start_server: Callable[..., LiveServer], method: str, path: str, status: int, recorded: bool
) -> None:
    live = start_server(delay=0.3)
    first = httpx.post(f"{live.url}/send-notification/a@example.com?q=one", headers=CHOSEN)
    assert first.headers["x-request-id"] == "client-chosen-1"
    later = httpx.request(method, f"{live.url}{path}", headers=CHOSEN)  # while its tasks run
    assert later.status_code == status
    body = wait_until(lambda: ended(live, "client-chosen-1", 2), timeout=15)
    assert body["path"] == "/send-notification/a@example.com"
    lines = [t["line"] for t in body["tasks"]]
    assert lines == ["found query: one\n", "message to a@example.com\n"]
    later_id = later.headers["x-request-id"]
    if recorded:  # under an id of its own, which its response named
        assert later_id != "client-chosen-1"
        found = wait_until(lambda: record(live, later_id))
        assert found["path"] == path and found["status_code"] == status
    else:  # not recorded at all: its id is only echoed, and still names the first request
        assert later_id == "client-chosen-1"
        assert record(live, later_id) == body


def test_a_refused_request_s_id_can_be_used_again(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    bad = httpx.post(f"{live.url}/send-notification/not-an-email", headers=CHOSEN)
    assert (bad.status_code, bad.headers["x-request-id"]) == (422, "client-chosen-1")
    wait_until(lambda: record(live, "client-chosen-1"))
    good = httpx.post(f"{live.url}/send-notification/a@example.com", headers=CHOSEN)
    assert good.headers["x-request-id"] == "client-chosen-1"  # nothing accepted had it
    body = wait_until(lambda: ended(live, "client-chosen-1", 1))
    assert body["status_code"] == 200


def test_junk_requests_leave_the_registry_as_it_was(
    start_server: Callable[..., LiveServer], store: str | None
) -> None:
    if store is not None:
        pytest.skip("measures the SQLite registry's file; the rule is the middleware's")
    live = start_server()
    db = registry_path(live.data_dir)
    accepted = httpx.post(f"{live.url}/send-notification/a@example.com")
    wait_until(lambda: ended(live, accepted.headers["x-request-id"], 1))
    before = sum(p.stat().st_size for p in db.parent.glob("registry.db*"))
    junk = "/x" * 32_000  # a 64 KB path
    with httpx.Client(base_url=live.url) as client:
        for n in range(50):
            assert client.put(f"{junk}{n}").status_code in (404, 405)
            assert client.delete(f"/send-notification/a{n}@example.com").status_code == 405
    httpx.post(f"{live.url}/background_tasks", params={"framework": "x"})  # one more commit
    wait_until(lambda: live.read("README.md"))
    after = sum(p.stat().st_size for p in db.parent.glob("registry.db*"))
    assert after - before < 64_000  # not 50 × 64 KB of paths
    counts = httpx.get(f"{live.url}/tasks", params={"limit": 1000}).json()
    assert len(counts) == 2


def test_a_refused_request_keeps_only_the_start_of_a_long_path(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    path = "/send-notification/" + "a" * 60_000
    response = httpx.post(f"{live.url}{path}")
    assert response.status_code == 422
    body = wait_until(lambda: record(live, response.headers["x-request-id"]))
    assert body["path"] == path[:MAX_RECORDED_PATH]


def test_a_refused_path_with_nul_or_bytes_that_are_not_text_is_kept_escaped(
    start_server: Callable[..., LiveServer],
) -> None:
    """PostgreSQL's text cannot hold NUL: a refused request's path keeps it as an escape, and
    the registry goes on accepting work (one such request made every later commit fail)."""
    live = start_server()
    # uvicorn hands over a byte that is not UTF-8 as U+FFFD already.
    for raw, kept in [("%00", "\\x00"), ("%FF", "\ufffd")]:
        response = httpx.post(f"{live.url}/send-notification/a{raw}@example.com")
        assert response.status_code == 422
        request_id = response.headers["x-request-id"]
        body = wait_until(lambda rid=request_id: record(live, rid))  # type: ignore[misc]
        assert body["path"] == f"/send-notification/a{kept}@example.com"
    accepted = httpx.post(f"{live.url}/send-notification/a@example.com", timeout=10)
    assert accepted.status_code == 200
