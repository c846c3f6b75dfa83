"""Failures that heal: attempts with backoff, dead tasks, retry and cancel (issue 16), against
real servers on both stores where the store matters."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import Settings
from server.registry.store import StoreBusy, StoreFault
from server.retries import RetryPolicy, retryable
from server.status import ENDED
from tests.helpers import LiveServer, ServerProcess, wait_until
from tests.postgres import STORES

pytestmark = pytest.mark.parametrize("store", STORES, indirect=True)


class Highest(random.Random):
    """A Random whose uniform draws are always the top of their range: the backoff's bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_backoff_doubles_up_to_its_cap_and_draws_below_it(store: str | None) -> None:
    policy = RetryPolicy(max_attempts=8, base=0.5, cap=3.0, rng=Highest())
    assert [policy.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    jittered = RetryPolicy(base=0.5, cap=60.0, rng=random.Random(7))
    for attempt in range(1, 12):
        bound = min(60.0, 0.5 * 2 ** (attempt - 1))
        draws = [jittered.backoff(attempt) for _ in range(200)]
        assert all(0.0 <= draw <= bound for draw in draws)
        assert max(draws) > bound / 2  # spread over the range, not stuck low


def test_which_failures_are_tried_again(store: str | None) -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(1, OSError(28, "No space left on device"))
    assert policy.should_retry(2, StoreBusy("task registry unavailable: database is locked"))
    assert not policy.should_retry(3, OSError("disk full"))  # the last attempt was the third
    assert not retryable(StoreFault("task registry damaged"))
    assert not retryable(RuntimeError("a bug"))


def record(live: LiveServer | ServerProcess, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{live.url}/requests/{request_id}").json()
    return body


def ended(live: LiveServer | ServerProcess, request_id: str) -> dict[str, Any] | None:
    body = record(live, request_id)
    tasks = body.get("tasks") or []
    return body if tasks and all(t["status"] in ENDED for t in tasks) else None


def test_rule_14_a_failed_attempt_leaves_nothing_and_its_retry_writes_the_line_once(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(retry_base=0.2, retry_max=0.4, max_attempts=20)
    (live.data_dir / "log.txt").mkdir(parents=True)
    response = httpx.post(f"{live.url}/send-notification/a@example.com", params={"q": "hi"})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    retrying = wait_until(
        lambda: (r := record(live, request_id))["tasks"][0]["status"] == "retrying" and r
    )
    first, second = retrying["tasks"]
    assert first["attempts"] >= 1 and "log.txt is a directory" in first["last_error"]
    assert first["next_attempt_at"] is not None
    assert second["status"] in ("queued", "retrying")  # it waits behind the first
    wait_until(lambda: record(live, request_id)["tasks"][0]["attempts"] >= 3)  # it retries on
    (live.data_dir / "log.txt").rmdir()  # the fault heals
    body = wait_until(lambda: ended(live, request_id), timeout=15)
    assert [t["status"] for t in body["tasks"]] == ["done", "done"]
    assert live.read("log.txt") == b"found query: hi\nmessage to a@example.com\n"
    first = body["tasks"][0]
    assert first["attempts"] >= 2 and first["next_attempt_at"] is None
    history = first["failures"]
    assert [f["attempt"] for f in history] == list(range(1, first["attempts"]))
    assert all("log.txt is a directory" in f["error"] for f in history)


def test_a_fault_that_stays_kills_the_task_and_an_operator_retries_it(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(retry_base=0.05, retry_max=0.1, max_attempts=3)
    (live.data_dir / "README.md").mkdir(parents=True)
    response = httpx.post(f"{live.url}/background_tasks", params={"framework": "Flask"})
    body = wait_until(lambda: ended(live, response.headers["x-request-id"]), timeout=15)
    (dead,) = body["tasks"]
    assert dead["status"] == "failed" and dead["attempts"] == 3
    assert len(dead["failures"]) == 2 and "README.md is a directory" in dead["last_error"]
    failed = httpx.get(f"{live.url}/tasks", params={"status": "failed"}).json()
    assert [t["id"] for t in failed] == [dead["id"]]
    (live.data_dir / "README.md").rmdir()
    retried = httpx.post(f"{live.url}/tasks/{dead['id']}/retry")
    assert retried.status_code == 200 and retried.json()["attempts"] == 0
    wait_until(
        lambda: record(live, response.headers["x-request-id"])["tasks"][0]["status"] == "done"
    )
    assert live.read("README.md") == "\n## Flask 框架精讲".encode()
    again = httpx.post(f"{live.url}/tasks/{dead['id']}/retry")
    assert again.status_code == 409 and "only a failed task" in again.json()["detail"]
    assert httpx.post(f"{live.url}/tasks/nope-1/retry").status_code == 404


def test_a_cancelled_task_is_never_written_and_an_ended_one_cannot_be_cancelled(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=1.0)
    asleep = httpx.post(f"{live.url}/send-notification/a@example.com", params={"q": "x"})
    tasks = wait_until(lambda: (r := record(live, asleep.headers["x-request-id"]))["tasks"] and r)
    first, second = tasks["tasks"]
    cancelled = httpx.post(f"{live.url}/tasks/{first['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    body = wait_until(
        lambda: (
            (r := record(live, asleep.headers["x-request-id"]))["tasks"][1]["status"] == "done"
            and r
        ),
        timeout=10,
    )
    assert body["tasks"][0]["status"] == "cancelled"
    assert live.read("log.txt") == b"message to a@example.com\n"  # only the other line
    refused = httpx.post(f"{live.url}/tasks/{second['id']}/cancel")
    assert refused.status_code == 409 and "already done" in refused.json()["detail"]


def test_changing_tasks_needs_loopback_or_the_token(store: str | None, tmp_path: Path) -> None:
    from server.app import create_app

    token = "s3cret-token-of-16+"
    app = create_app(
        Settings(data_dir=tmp_path / "data", delay=0, admin_token=token, database_url=store)
    )

    async def as_a_stranger() -> list[int]:
        registry = app.state.registry
        await registry.open()
        try:
            far = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
            async with httpx.AsyncClient(transport=far, base_url="http://bgtasks") as client:
                return [
                    (await client.post("/tasks/nope-1/cancel")).status_code,
                    (await client.post("/tasks/nope-1/retry", headers=bearer("wrong"))).status_code,
                    (await client.post("/tasks/nope-1/retry", headers=bearer(token))).status_code,
                ]
        finally:
            await registry.close()

    assert asyncio.run(as_a_stranger()) == [403, 403, 404]  # 404: let in, and no such task


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_tasks_retrying_at_a_kill_resume_their_attempts_after_the_restart(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "log.txt").mkdir(parents=True)
    env = {"BGTASKS_RETRY_BASE": "0.3", "BGTASKS_RETRY_MAX": "0.6", "BGTASKS_MAX_ATTEMPTS": "50"}
    server = server_process(data_dir=data, env=env)
    ids = [
        httpx.post(
            f"{server.url}/send-notification/u{n}@example.com", params={"q": f"q{n}"}
        ).headers["x-request-id"]
        for n in range(5)
    ]
    wait_until(lambda: all(record(server, i)["tasks"][0]["attempts"] >= 2 for i in ids))
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    shutil.rmtree(data / "log.txt")  # healed while nothing runs
    again = server_process(data_dir=data, env=env)
    for request_id in ids:
        body = wait_until(partial(ended, again, request_id), timeout=20)
        assert [t["status"] for t in body["tasks"]] == ["recovered", "recovered"]
        assert body["tasks"][0]["attempts"] >= 3  # it went on counting
    lines = (data / "log.txt").read_bytes().splitlines(keepends=True)
    expected = [f"found query: q{n}\n".encode() for n in range(5)]
    expected += [f"message to u{n}@example.com\n".encode() for n in range(5)]
    assert sorted(lines) == sorted(expected)  # each once
    for n in range(5):  # and each request's in order
        assert lines.index(f"found query: q{n}\n".encode()) < lines.index(
            f"message to u{n}@example.com\n".encode()
        )
