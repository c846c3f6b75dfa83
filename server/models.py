"""The HTTP API's documents: what the seed endpoints answer and what the registry shows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server import __version__
from server.status import TaskStatus

NOTIFICATION_SENT = "Message sent"


class Message(BaseModel):
    message: str = Field(examples=[NOTIFICATION_SENT])


class Detail(BaseModel):
    detail: str


class FailureOut(BaseModel):
    attempt: int = Field(description="Which attempt failed, from 1.")
    started_at: float | None = None
    failed_at: float
    error: str


class TaskOut(BaseModel):
    id: str = Field(examples=["3f2a9c1b-7"])
    request_id: str
    seq: int = Field(description="Position among the request's tasks; they run in this order.")
    file: str = Field(examples=["log.txt"])
    line: str = Field(examples=["message to user@example.com\n"])
    status: TaskStatus
    queued_at: float = Field(description="Unix time, seconds.")
    started_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = Field(
        None, description="Why its latest attempt failed, if one did (the attempt's error)."
    )
    attempts: int = Field(0, description="How many attempts have started.")
    next_attempt_at: float | None = Field(
        None, description="While it is retrying: when its next attempt is due."
    )
    owner: str | None = Field(None, description="The server process that runs it (its id).")
    host: str | None = Field(None, description="The machine that process runs on.")


class TaskWithFailures(TaskOut):
    failures: list[FailureOut] = Field(
        default_factory=list, description="Its failed attempts, oldest first."
    )


class RequestOut(BaseModel):
    id: str
    method: str | None = None
    path: str | None = None
    received_at: float | None = None
    response_sent_at: float | None = Field(
        None, description="When the response's last byte was handed to the server."
    )
    status_code: int | None = None
    tasks: list[TaskWithFailures]


class Health(BaseModel):
    status: Literal["ok", "unavailable"] = "ok"
    version: str = Field(examples=[__version__])
    store: str = Field(examples=["sqlite"], description="Where the registry is kept.")
    data_dir: str
    delay: float
    unfinished_tasks: int | None = Field(None, description="None while the registry is unusable.")
    owners: int | None = Field(
        None, description="Server processes alive on this registry (None while it is unusable)."
    )
    pid: int
    error: str | None = Field(None, description="Why the registry is unusable, if it is.")
