"""In-memory records of requests and their tasks; the registry persists them."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.status import TaskStatus


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
    error: str | None = None
    data: bytes = b""
    # The registry's row key, given when the intent is committed.
    pk: int | None = None
    # Where the line was claimed in the file, committed before the write (for crash recovery).
    inode: int | None = None
    offset: int | None = None
    claim: int | None = None

    def describe(self) -> str:
        return f"{self.id} ({self.line!r} -> {self.file})"


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One HTTP request that may have queued tasks."""

    id: str
    method: str
    path: str
    received_at: float
    status_code: int | None = None
    response_sent_at: float | None = None
    tasks: list[TaskRecord] = field(default_factory=list)
    # Its tasks' intents are committed: the registry has its row, and its tasks are accepted.
    # (A request can queue tasks and still fail, e.g. a 422 after a dependency ran.)
    accepted: bool = False
