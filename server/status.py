"""A task's status: one vocabulary for the registry, the HTTP API, the CLI and the README.

Light on purpose (no FastAPI, no pydantic): the CLI imports it.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    """Where a task is in its life. A task is written at most once, in `done` or `recovered`."""

    QUEUED = "queued"
    """Accepted (its intent is committed); waiting for its turn or a free slot."""
    RUNNING = "running"
    """Sleeping its delay, or its line handed to the registry to be written."""
    RETRYING = "retrying"
    """An attempt failed in a way that may pass; the next one is due at `next_attempt_at` (or
    comes once an earlier task of its request has ended)."""
    DONE = "done"
    """Its line was written by the process that accepted it."""
    FAILED = "failed"
    """Its line could not be written, in any of its attempts: `last_error` says why. Kept
    until it is retried or cancelled (the dead-letter state)."""
    RECOVERED = "recovered"
    """Its process died first; another process found its line written, or wrote it."""
    CANCELLED = "cancelled"
    """Cancelled before its line was claimed: it is never written."""


UNFINISHED: frozenset[TaskStatus] = frozenset(
    {TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING}
)
"""Still owed: a process must finish it (its own, or whoever recovers a dead one's work)."""
ENDED: frozenset[TaskStatus] = frozenset(TaskStatus) - UNFINISHED
"""Nothing more will happen to it."""
SUCCEEDED: frozenset[TaskStatus] = frozenset({TaskStatus.DONE, TaskStatus.RECOVERED})
"""Ended with its line in the file."""
