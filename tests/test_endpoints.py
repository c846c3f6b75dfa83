"""The seed's contract, byte for byte, and input validation, against a real server."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest

from server.lines import INTRO
from tests.helpers import LiveServer, wait_until
from tests.postgres import STORES

# The seed's contract holds on either store.
pytestmark = pytest.mark.parametrize("store", STORES, indirect=True)


def finished(live: LiveServer, request_id: str, count: int) -> bool:
    body = httpx.get(f"{live.url}/requests/{request_id}").json()
    tasks = body.get("tasks", [])
    return len(tasks) == count and all(t["status"] == "done" for t in tasks)


def test_send_notification_writes_the_seeds_bytes(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    response = httpx.post(f"{live.url}/send-notification/foo@example.com", params={"q": "hello"})
    assert response.status_code == 200
    assert response.content == b'{"message":"Message sent"}'
    wait_until(lambda: finished(live, response.headers["x-request-id"], 2))
    assert live.read("log.txt") == b"found query: hello\nmessage to foo@example.com\n"


def test_notification_without_q_writes_one_line(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    response = httpx.post(f"{live.url}/send-notification/Foo.Bar@Example.COM")
    assert response.json() == {"message": "Message sent"}
    wait_until(lambda: finished(live, response.headers["x-request-id"], 1))
    # The address is written exactly as sent: validation does not normalise it.
    assert live.read("log.txt") == b"message to Foo.Bar@Example.COM\n"


def test_readme_endpoints_write_heading_and_intro(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    first = httpx.post(f"{live.url}/background_tasks", params={"framework": "FastAPI"})
    assert first.content == '{"message":"任务已在后台运行"}'.encode()
    wait_until(lambda: finished(live, first.headers["x-request-id"], 1))
    second = httpx.post(f"{live.url}/dependency/background_tasks", params={"q": "intro"})
    assert second.content == '{"message":"README.md更新成功"}'.encode()
    wait_until(lambda: finished(live, second.headers["x-request-id"], 1))
    expected = f"\n## FastAPI 框架精讲\n\n> {INTRO}"
    assert live.read("README.md") == expected.encode()


def test_intro_without_q_writes_nothing_and_says_so(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    response = httpx.post(f"{live.url}/dependency/background_tasks")
    assert response.status_code == 200
    assert "nothing was queued" in response.json()["message"]
    url = f"{live.url}/requests/{response.headers['x-request-id']}"
    # A request that queued nothing is recorded with the next group commit, a moment later.
    body = wait_until(lambda: (r := httpx.get(url)).status_code == 200 and r.json())
    assert body["status_code"] == 200 and body["tasks"] == []
    assert live.read("README.md") == b""


@pytest.mark.parametrize(
    ("path", "params", "field", "rule"),
    [
        ("/send-notification/not-an-email", {}, "email", "valid email"),
        ("/send-notification/a@example.com", {"q": ""}, "q", "at least 1"),
        ("/send-notification/a@example.com", {"q": "x" * 501}, "q", "at most 500"),
        (
            "/send-notification/a@example.com",
            {"q": "a\nmessage to evil@example.com"},
            "q",
            "control characters",
        ),
        ("/send-notification/a@example.com", {"q": "a\rb"}, "q", "control characters"),
        ("/send-notification/a@example.com", {"q": "a\x00b"}, "q", "control characters"),
        ("/background_tasks", {"framework": "Vue\n## Forged"}, "framework", "control characters"),
        ("/background_tasks", {"framework": "a\r"}, "framework", "control characters"),
        ("/background_tasks", {}, "framework", "required"),
        ("/dependency/background_tasks", {"q": "x\ny"}, "q", "control characters"),
    ],
)
def test_bad_input_is_a_422_naming_field_and_rule(
    start_server: Callable[..., LiveServer],
    path: str,
    params: dict[str, str],
    field: str,
    rule: str,
) -> None:
    live = start_server()
    response = httpx.post(f"{live.url}{path}", params=params)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(e["loc"][-1] == field and rule in e["msg"].lower() for e in errors), errors
    # A good request afterwards lands alone: the refused one queued nothing.
    ok = httpx.post(f"{live.url}/send-notification/ok@example.com")
    wait_until(lambda: finished(live, ok.headers["x-request-id"], 1))
    assert live.read("log.txt") == b"message to ok@example.com\n"
    assert live.read("README.md") == b""


def test_email_with_encoded_newline_is_refused(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    response = httpx.post(f"{live.url}/send-notification/a%0A@example.com")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "email"]


def test_request_id_is_echoed_or_generated(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    mine = httpx.post(
        f"{live.url}/send-notification/a@example.com", headers={"X-Request-ID": "client-42"}
    )
    assert mine.headers["x-request-id"] == "client-42"
    wait_until(lambda: finished(live, "client-42", 1))
    bad = httpx.post(
        f"{live.url}/send-notification/a@example.com", headers={"X-Request-ID": "no spaces allowed"}
    )
    generated = bad.headers["x-request-id"]
    assert uuid.UUID(generated).version == 7  # a fresh UUIDv7 (RFC 9562)
    assert httpx.get(f"{live.url}/health").headers["x-request-id"]


def test_read_api(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    response = httpx.post(f"{live.url}/send-notification/a@example.com", params={"q": "x"})
    request_id = response.headers["x-request-id"]
    wait_until(lambda: finished(live, request_id, 2))
    request = httpx.get(f"{live.url}/requests/{request_id}").json()
    assert request["method"] == "POST"
    assert request["path"] == "/send-notification/a@example.com"
    assert request["status_code"] == 200
    assert [t["line"] for t in request["tasks"]] == [
        "found query: x\n",
        "message to a@example.com\n",
    ]
    tasks = httpx.get(f"{live.url}/tasks", params={"status": "done", "limit": 1}).json()
    assert len(tasks) == 1 and tasks[0]["line"] == "message to a@example.com\n"  # newest first
    assert httpx.get(f"{live.url}/tasks", params={"status": "failed"}).json() == []
    assert httpx.get(f"{live.url}/tasks", params={"status": "bogus"}).status_code == 422
    assert httpx.get(f"{live.url}/tasks", params={"limit": 0}).status_code == 422
    assert httpx.get(f"{live.url}/requests/nope").status_code == 404
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok" and health["unfinished_tasks"] == 0
    assert health["data_dir"] == str(live.data_dir)


def test_openapi_documents_the_contract(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    spec = httpx.get(f"{live.url}/openapi.json").json()
    assert {
        "/send-notification/{email}",
        "/background_tasks",
        "/dependency/background_tasks",
        "/requests/{request_id}",
        "/tasks",
        "/health",
    } <= set(spec["paths"])
    assert httpx.get(f"{live.url}/docs").status_code == 200
