"""The events a group commit's changes make: a request received, its tasks queued, a
response sent, a task started, an attempt failed, a task done, failed, recovered or cancelled.
Made as plain tuples, encoded once per commit: they are made on every commit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from server.records import RequestRecord, TaskRecord
from server.status import TaskStatus

Event = tuple[str, str, str | None, float | None, dict[str, Any] | None]
"""(kind, request id, task id, when, details): cheap to make on every commit."""


_ENDED_KINDS = {
    TaskStatus.DONE: "task_done",
    TaskStatus.FAILED: "task_failed",
    TaskStatus.RECOVERED: "task_recovered",
    TaskStatus.CANCELLED: "task_cancelled",
}


def received_event(request: RequestRecord) -> Event:
    details = {"method": request.method, "path": request.path}
    return "request_received", request.id, None, request.received_at, details


def intent_events(request: RequestRecord) -> Iterable[Event]:
    yield received_event(request)
    for task in request.tasks:
        yield "task_queued", request.id, task.id, task.queued_at, {"file": task.file}


def response_event(request: RequestRecord) -> Event:
    details = {"status_code": request.status_code}
    return "response_sent", request.id, None, request.response_sent_at, details


def task_event(task: TaskRecord) -> Event:
    """The event a task's new state makes."""
    if task.status is TaskStatus.RUNNING:
        return "task_started", task.request_id, task.id, task.started_at, {"attempt": task.attempts}
    if task.status is TaskStatus.RETRYING:
        failed: dict[str, Any] = {
            "attempt": task.attempts,
            "error": task.last_error,
            "next_attempt_at": task.next_attempt_at,
        }
        return "task_attempt_failed", task.request_id, task.id, task.started_at, failed
    kind = _ENDED_KINDS.get(task.status, f"task_{task.status.value}")
    ended = {"attempts": task.attempts, "error": task.last_error} if task.last_error else None
    return kind, task.request_id, task.id, task.finished_at, ended


def encode(events: Sequence[Event]) -> str:
    """One commit's events as its event-log row holds them."""
    return json.dumps(events, separators=(",", ":"))
