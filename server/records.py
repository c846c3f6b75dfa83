"""In-memory records of requests and their tasks; the registry persists them."""

from __future__ import annotations

from dataclasses import dataclass, field

import uuid_utils

from server.status import TaskStatus


def new_request_id() -> str:
    """A fresh request id: a UUIDv7 (RFC 9562), which begins with its creation time, so the
    registry's indexes grow at one end instead of being rewritten all over."""
    return str(uuid_utils.uuid7())


@dataclass(slots=True, eq=False)
class TaskRecord:
    """One background task: append `line` to `file` in the data directory."""

    id: str
    request_id: str
    seq: int
    file: str
    line: str
    queued_at: float
    status: TaskStatus = TaskStatus.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = None
    # How many attempts have started, and when the next one is due while it is retrying.
    attempts: int = 0
    next_attempt_at: float | None = None
    data: bytes = b""
    # The registry's row key, given when the intent is committed.
    pk: int | None = None
    # Taken over from a dead owner: it ends `recovered` rather than `done`.
    adopted: bool = False
    # Where its line was claimed (for crash recovery): the claim's number, file and offset.
    claim: int | None = None
    inode: int | None = None
    offset: int | None = None

    def describe(self) -> str:
        return f"{self.id} ({self.line!r} -> {self.file})"


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One HTTP request to a seed endpoint; it may have queued tasks."""

    id: str
    method: str
    path: str
    received_at: float
    status_code: int | None = None
    response_sent_at: float | None = None
    tasks: list[TaskRecord] = field(default_factory=list)
    # The client chose the id (X-Request-ID): it may already be taken in the registry.
    id_from_client: bool = False
    # Its tasks' intents are committed: the registry has its row, and its tasks are accepted.
    # (A request can queue tasks and still fail, e.g. a 422 after a dependency ran.)
    accepted: bool = False

    def rename(self, request_id: str) -> None:
        """Take another id (the client's was taken by an accepted request)."""
        self.id = request_id
        for task in self.tasks:
            task.request_id = request_id
