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
    DONE = "done"
    """Its line was written by the process that accepted it."""
    FAILED = "failed"
    """Its line could not be written; `error` says why."""
    RECOVERED = "recovered"
    """Its process died first; another process found its line written, or wrote it."""


UNFINISHED: frozenset[TaskStatus] = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})
"""Still owed: a process must finish it (its own, or whoever recovers a dead one's work)."""
ENDED: frozenset[TaskStatus] = frozenset(TaskStatus) - UNFINISHED
"""Nothing more will happen to it."""
SUCCEEDED: frozenset[TaskStatus] = frozenset({TaskStatus.DONE, TaskStatus.RECOVERED})
"""Ended with its line in the file."""
