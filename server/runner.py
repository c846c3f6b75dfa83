"""Runs queued tasks: caps how many run at once, waits the simulated delay, submits the line.

FastAPI's BackgroundTasks calls `start` once per request after the response went out; `start`
returns at once, so Starlette's request cycle ends instead of keeping every sleeping request's
scope, Request and closures alive (with thousands of tasks asleep, collecting those objects
caused long garbage-collection pauses). No task gets a coroutine, a job or a future of its own
either: a task takes a slot, waits its delay on a timer of the event loop, and hands its line to
the registry, which reports the end. A request's tasks run in the order they were queued, as
BackgroundTasks would run them: with a delay one after another, each once the one before has
ended; with none, all submitted at once, which the registry writes in that order. `drain` waits
for all of them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time

from server.observe import NOBODY, Observer
from server.records import RequestRecord, TaskRecord
from server.registry import Registry
from server.status import TaskStatus

logger = logging.getLogger("bgtasks.tasks")

SHOWN_IN_LOG = 50

_Step = tuple[list[TaskRecord], int]  # a request's accepted tasks, and which one


class TaskRunner:
    """Creates a request's task records and runs them, in order, once its response is out."""

    def __init__(
        self,
        registry: Registry,
        *,
        delay: float,
        max_running: int,
        observer: Observer = NOBODY,
    ) -> None:
        self.registry = registry
        self.observer = observer
        self.delay = delay
        self.max_running = max_running
        self._ids = itertools.count(1)
        self._started = 0  # tasks `start` took on that have not ended
        self._running = 0  # of those, the ones holding a slot: asleep, or their line submitted
        self._stopped = False  # drain gave up: start nothing more
        self._waiting: collections.deque[_Step] = collections.deque()  # for a slot, in turn
        self._timers: dict[str, asyncio.TimerHandle] = {}  # tasks asleep, by id
        self._all_ended = asyncio.Event()
        # Accepted and not ended: the tasks this process owes.
        self.unfinished: dict[str, TaskRecord] = {}

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
        """The request's intents are committed: its tasks are now this process's to finish."""
        for task in request.tasks:
            self.unfinished[task.id] = task
        self.observer.accepted(request)

    async def start(self, request: RequestRecord) -> None:
        """The BackgroundTasks entry of a request: start its accepted tasks, in order."""
        tasks = [task for task in request.tasks if task.id in self.unfinished]
        if tasks:  # else the request was refused: its intents were never committed
            self._begin(tasks)

    def adopt(self, tasks: list[TaskRecord]) -> None:
        """Run tasks taken over from dead owners, each request's in order, as if their
        requests had just been accepted."""
        by_request: dict[str, list[TaskRecord]] = {}
        for task in sorted(tasks, key=lambda task: (task.request_id, task.seq)):
            by_request.setdefault(task.request_id, []).append(task)
            self.unfinished[task.id] = task
        self.observer.adopted(tasks)
        for request_tasks in by_request.values():
            self._begin(request_tasks)

    def _begin(self, tasks: list[TaskRecord]) -> None:
        self._started += len(tasks)
        self._all_ended.clear()
        for index in range(len(tasks) if not self.delay else 1):
            self._admit((tasks, index))

    async def drain(self, timeout: float | None) -> None:
        """Wait for every accepted task to end; after `timeout` seconds stop waiting. Tasks
        still asleep or waiting for a slot stay unfinished in the registry, for the next start
        to recover."""
        if not self._started:
            return
        self.log_unfinished("shutting down, waiting for them")
        await self.registry.flush()  # now, rather than at the next turn of the loop
        try:
            await asyncio.wait_for(self._all_ended.wait(), timeout)
        except TimeoutError:
            self._stopped = True
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            self._waiting.clear()

    def _admit(self, step: _Step) -> None:
        if self._waiting or self._running >= self.max_running:
            self._waiting.append(step)
        else:
            self._launch(step)

    def _launch(self, step: _Step) -> None:
        tasks, index = step
        task = tasks[index]
        self._running += 1
        task.status = TaskStatus.RUNNING
        if not self.delay:
            # With no delay the write is all it does: it starts when its line is claimed.
            self.registry.submit(task, functools.partial(self._ended, step))
            return
        task.started_at = time.time()
        self.registry.note_task(task)
        loop = asyncio.get_running_loop()
        self._timers[task.id] = loop.call_later(self.delay, self._wake, step)

    def _wake(self, step: _Step) -> None:
        tasks, index = step
        del self._timers[tasks[index].id]
        self.registry.submit(tasks[index], functools.partial(self._ended, step))

    def _ended(self, step: _Step, error: BaseException | None) -> None:
        """The registry's report on a submitted line (the first one counts)."""
        tasks, index = step
        task = tasks[index]
        if self.unfinished.pop(task.id, None) is None:
            return
        self._started -= 1
        self._running -= 1
        if error is not None:
            self._failed(task, error)
        self.observer.ended(task)
        if self._stopped:
            return
        if self.delay and index + 1 < len(tasks):
            self._admit((tasks, index + 1))
        while self._waiting and self._running < self.max_running:
            self._launch(self._waiting.popleft())
        if not self._started:
            self._all_ended.set()

    def _failed(self, task: TaskRecord, error: BaseException) -> None:
        task.status, task.finished_at = TaskStatus.FAILED, time.time()
        task.error = f"{type(error).__name__}: {error}"
        self.registry.note_task(task)
        ids = {"task_id": task.id, "request_id": task.request_id}
        logger.error("task %s failed", task.describe(), exc_info=error, extra=ids)

    def log_unfinished(self, reason: str) -> None:
        """Say which tasks this process still has to finish."""
        tasks = list(self.unfinished.values())
        if not tasks:
            logger.info("%s: no background tasks unfinished", reason)
            return
        shown = ", ".join(task.describe() for task in tasks[:SHOWN_IN_LOG])
        more = f" and {len(tasks) - SHOWN_IN_LOG} more" if len(tasks) > SHOWN_IN_LOG else ""
        logger.warning("%s: %d background tasks unfinished: %s%s", reason, len(tasks), shown, more)
