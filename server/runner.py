"""Runs queued tasks: caps how many run at once, waits the simulated delay, appends the line."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from server.records import FAILED, QUEUED, RUNNING, RequestRecord, TaskRecord
from server.registry import Registry

logger = logging.getLogger("bgtasks.tasks")

SHOWN_IN_LOG = 50


class TaskRunner:
    """Creates task records for a request and runs them as FastAPI background tasks."""

    def __init__(self, registry: Registry, *, delay: float, max_running: int) -> None:
        self.registry = registry
        self.delay = delay
        self._slots = asyncio.Semaphore(max_running)
        self._ids = itertools.count(1)
        self.pending: dict[str, TaskRecord] = {}

    def new_task(self, request: RequestRecord, file: str, line: str) -> TaskRecord:
        task = TaskRecord(
            id=f"{self.registry.owner}-{next(self._ids)}",
            request_id=request.id,
            seq=len(request.tasks),
            file=file,
            line=line,
            queued_at=time.time(),
            data=line.encode(),
        )
        request.tasks.append(task)
        return task

    def accept(self, request: RequestRecord) -> None:
        """The request's response went out: its tasks are now this process's to finish."""
        for task in request.tasks:
            self.pending[task.id] = task

    async def run(self, task: TaskRecord) -> None:
        """Background task body. Never raises (a raise would close the client's connection),
        except for cancellation at a shutdown timeout, which leaves the task recoverable."""
        if task.id not in self.pending:
            return  # its request was refused: the intent was never committed
        async with self._slots:
            task.status, task.started_at = RUNNING, time.time()
            self.registry.note_task(task)
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self.registry.append(task)
            except Exception as exc:
                task.status, task.finished_at = FAILED, time.time()
                task.error = f"{type(exc).__name__}: {exc}"
                self.registry.note_task(task)
                logger.exception("task %s failed", task.describe())
            finally:
                if task.status not in (QUEUED, RUNNING):
                    self.pending.pop(task.id, None)

    def log_pending(self, reason: str) -> None:
        """Say which tasks this process still has to finish."""
        tasks = list(self.pending.values())
        if not tasks:
            logger.info("%s: no background tasks pending", reason)
            return
        shown = ", ".join(task.describe() for task in tasks[:SHOWN_IN_LOG])
        more = f" and {len(tasks) - SHOWN_IN_LOG} more" if len(tasks) > SHOWN_IN_LOG else ""
        logger.warning("%s: %d background tasks pending: %s%s", reason, len(tasks), shown, more)
