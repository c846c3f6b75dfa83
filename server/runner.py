"""Runs queued tasks: caps how many run at once, waits the simulated delay, appends the line.

FastAPI's BackgroundTasks calls `start` once per request after the response went out. With a
delay, `start` hands the request's tasks to a job the runner owns and returns at once, so
Starlette's request cycle ends instead of keeping every sleeping request's scope, Request and
closures alive (with ~2,000 tasks asleep, garbage collection of those objects cost 200 ms
pauses). The job runs the request's tasks one after another, in the order they were queued, as
BackgroundTasks would; `drain` waits for every job at shutdown. With no delay there is nothing to
wait for but the write: `start` submits the lines to the registry in order and the registry
reports each one's end, with no job, future or wake-up per task (~3% of the CPU instructions
of a notify request).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from typing import Any

from server.records import FAILED, QUEUED, RUNNING, RequestRecord, TaskRecord
from server.registry import Registry

logger = logging.getLogger("bgtasks.tasks")

SHOWN_IN_LOG = 50


class TaskRunner:
    """Creates a request's task records and runs them, in order, once its response is out."""

    def __init__(self, registry: Registry, *, delay: float, max_running: int) -> None:
        self.registry = registry
        self.delay = delay
        self._slots = asyncio.Semaphore(max_running)
        self._ids = itertools.count(1)
        self._jobs: set[asyncio.Task[None]] = set()
        self._submitted = 0  # lines submitted without a job, not yet ended
        self._all_ended = asyncio.Event()
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

    async def start(self, request: RequestRecord) -> None:
        """The BackgroundTasks entry of a request: submit its accepted tasks' lines in order, or
        with a delay, run them in a job of our own."""
        tasks = [task for task in request.tasks if task.id in self.pending]
        if not tasks:
            return  # the request was refused: its intents were never committed
        if not self.delay:
            for task in tasks:
                await self._slots.acquire()  # returns at once below the cap
                task.status, task.started_at = RUNNING, time.time()
                self._submitted += 1
                self._all_ended.clear()
                self.registry.submit(task, functools.partial(self._ended, task))
            return
        job = asyncio.get_running_loop().create_task(self._run_all(tasks))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _run_all(self, tasks: list[TaskRecord]) -> None:
        for task in tasks:
            await self.run(task)

    async def drain(self, timeout: float | None) -> None:
        """Wait for every job and submitted line; after `timeout` seconds cancel the rest, which
        stay unfinished in the registry for the next start to recover."""
        if not self._jobs and not self._submitted:
            return
        self.log_pending("shutting down, waiting for them")
        waits: set[asyncio.Future[Any]] = set(self._jobs)
        if self._submitted:
            self.registry.flush()  # now, rather than at the next turn of the loop
            waits.add(asyncio.ensure_future(self._all_ended.wait()))
        _, late = await asyncio.wait(waits, timeout=timeout)
        for job in late:
            job.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def run(self, task: TaskRecord) -> None:
        """One task's body. Never raises, except for cancellation at a drain timeout, which
        leaves the task recoverable."""
        async with self._slots:
            task.status, task.started_at = RUNNING, time.time()
            try:
                if self.delay:
                    # Without a delay the claim, in the same commit, records it running.
                    self.registry.note_task(task)
                    await asyncio.sleep(self.delay)
                await self.registry.append(task)
            except Exception as exc:
                self._failed(task, exc)
            finally:
                if task.status not in (QUEUED, RUNNING):
                    self.pending.pop(task.id, None)

    def _ended(self, task: TaskRecord, error: BaseException | None) -> None:
        """The registry's report on a line submitted without a job (the first one counts)."""
        if self.pending.pop(task.id, None) is None:
            return
        self._slots.release()
        self._submitted -= 1
        if not self._submitted:
            self._all_ended.set()
        if error is not None:
            self._failed(task, error)

    def _failed(self, task: TaskRecord, error: BaseException) -> None:
        task.status, task.finished_at = FAILED, time.time()
        task.error = f"{type(error).__name__}: {error}"
        self.registry.note_task(task)
        logger.error("task %s failed", task.describe(), exc_info=error)

    def log_pending(self, reason: str) -> None:
        """Say which tasks this process still has to finish."""
        tasks = list(self.pending.values())
        if not tasks:
            logger.info("%s: no background tasks pending", reason)
            return
        shown = ", ".join(task.describe() for task in tasks[:SHOWN_IN_LOG])
        more = f" and {len(tasks) - SHOWN_IN_LOG} more" if len(tasks) > SHOWN_IN_LOG else ""
        logger.warning("%s: %d background tasks pending: %s%s", reason, len(tasks), shown, more)
