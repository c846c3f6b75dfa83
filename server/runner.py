"""Runs queued tasks: caps how many run at once, waits the simulated delay, submits the line,
and tries a failed attempt again after a backoff.

FastAPI's BackgroundTasks calls `start` once per request after the response went out; `start`
returns at once, so Starlette's request cycle ends instead of keeping every sleeping request's
scope, Request and closures alive (with thousands of tasks asleep, collecting those objects
caused long garbage-collection pauses). No task gets a coroutine, a job or a future of its own
either: a task takes a slot, waits its delay on a timer of the event loop, and hands its line to
the registry, which reports the end.

A request's tasks run in the order they were queued, as BackgroundTasks would run them: with a
delay one after another, each once the one before has ended; with none, all submitted at once,
which the registry writes in that order. While a task is retrying, the request's later tasks
wait for it to end (done, or failed for good). `drain` waits for all of them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time
from collections.abc import Callable

from server.observe import NOBODY, Observer
from server.records import RequestRecord, TaskRecord
from server.registry import Registry, TaskDropped
from server.registry.store import Failure
from server.retries import RetryPolicy, describe
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
        retries: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        observer: Observer = NOBODY,
    ) -> None:
        self.registry = registry
        self.observer = observer
        self.delay = delay
        self.max_running = max_running
        self.retries = retries or RetryPolicy()
        self._clock = clock
        self._ids = itertools.count(1)
        self._started = 0  # tasks `start` took on that have not ended
        self._running = 0  # of those, the ones holding a slot: asleep, or their line submitted
        self._stopped = False  # drain gave up: start nothing more
        self._waiting: collections.deque[_Step] = collections.deque()  # for a slot, in turn
        # Tasks asleep in their delay or waiting to retry, by id: the timer, and the task's step.
        self._timers: dict[str, tuple[asyncio.TimerHandle, _Step]] = {}
        self._retrying: dict[str, str] = {}  # request id -> its task that retries first
        self._held: dict[str, collections.deque[_Step]] = {}  # request id -> its tasks behind
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
        """Run tasks taken over (from dead owners, or from the failed tasks an operator
        retries), each request's in order, as if their requests had just been accepted; a
        task that was retrying waits until its next attempt is due."""
        by_request: dict[str, list[TaskRecord]] = {}
        for task in sorted(tasks, key=lambda task: (task.request_id, task.seq)):
            by_request.setdefault(task.request_id, []).append(task)
            self.unfinished[task.id] = task
        self.observer.adopted(tasks)
        for request_tasks in by_request.values():
            self._begin(request_tasks)

    def forget(self, task_id: str) -> None:
        """A task of this process was cancelled: if it is asleep or waiting to retry, it ends
        now (its claim would leave it out anyway)."""
        found = self._timers.pop(task_id, None)
        if found is None or task_id not in self.unfinished:
            return
        timer, step = found
        timer.cancel()
        if self.unfinished[task_id].status is TaskStatus.RETRYING:
            self._running += 1  # it holds no slot, and _ended gives one back
        self._ended(step, TaskDropped(f"task {task_id} was cancelled"))

    def _begin(self, tasks: list[TaskRecord]) -> None:
        self._started += len(tasks)
        self._all_ended.clear()
        first = tasks[0]
        due = (first.next_attempt_at or 0.0) - self._clock()
        if first.status is TaskStatus.RETRYING and due > 0:  # resumed: its next attempt waits
            self._retrying[first.request_id] = first.id
            if not self.delay and len(tasks) > 1:
                self._held[first.request_id] = collections.deque(
                    (tasks, index) for index in range(1, len(tasks))
                )
            self._sleep(due, self._retry_due, (tasks, 0))
            return
        for index in range(len(tasks) if not self.delay else 1):
            self._admit((tasks, index))

    async def drain(self, timeout: float | None, stop: asyncio.Event | None = None) -> None:
        """Wait for every accepted task to end; stop waiting after `timeout` seconds, or as soon
        as `stop` is set (a second Ctrl-C). Tasks still asleep, waiting for a slot or waiting
        to retry stay unfinished in the registry, for the next start to recover."""
        if not self._started:
            return
        if stop is None or not stop.is_set():
            self.log_unfinished("shutting down, waiting for them")
        await self.registry.flush()  # now, rather than at the next turn of the loop
        waits = [asyncio.ensure_future(self._all_ended.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not self._started:
            return
        self._stopped = True
        for timer, _ in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._waiting.clear()
        self._held.clear()
        await self.registry.flush()  # lines already handed over are written; their tasks end

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
        task.attempts += 1
        task.next_attempt_at = None
        if not self.delay:
            # With no delay the write is all it does: it starts when its line is claimed.
            task.started_at = None
            self.registry.submit(task, functools.partial(self._ended, step))
            return
        task.started_at = time.time()
        self.registry.note_task(task)
        self._sleep(self.delay, self._wake, step)

    def _sleep(self, seconds: float, then: Callable[[_Step], None], step: _Step) -> None:
        tasks, index = step
        timer = asyncio.get_running_loop().call_later(seconds, then, step)
        self._timers[tasks[index].id] = (timer, step)

    def _wake(self, step: _Step) -> None:
        tasks, index = step
        del self._timers[tasks[index].id]
        self.registry.submit(tasks[index], functools.partial(self._ended, step))

    def _retry_due(self, step: _Step) -> None:
        tasks, index = step
        del self._timers[tasks[index].id]
        self._admit(step)

    def _ended(self, step: _Step, error: BaseException | None) -> None:
        """The registry's report on a submitted line (the first one counts)."""
        tasks, index = step
        task = tasks[index]
        if task.id not in self.unfinished:
            return
        self._running -= 1
        retry = (
            error is not None
            and not isinstance(error, TaskDropped)
            and self.retries.should_retry(task.attempts, error)
        )
        if retry:
            assert error is not None
            self._retry_later(step, error)
        else:
            self._finish(step, error)
        while self._waiting and self._running < self.max_running:
            self._launch(self._waiting.popleft())
        if not self._started:
            self._all_ended.set()

    def _retry_later(self, step: _Step, error: BaseException) -> None:
        """This attempt failed in a way that may pass: record it, and try again after a
        backoff, or (if an earlier task of its request is retrying) once that one has ended."""
        tasks, index = step
        task = tasks[index]
        now = self._clock()
        task.status, task.last_error = TaskStatus.RETRYING, describe(error)
        failure = Failure(task.pk or 0, task.attempts, task.started_at, now, task.last_error)
        self.registry.note_failure(failure)
        self.observer.attempt_failed(task)
        ahead = self._retrying.setdefault(task.request_id, task.id)
        if self._stopped:
            task.next_attempt_at = now  # the next start tries it at once
        elif ahead != task.id:
            task.next_attempt_at = None
            self._held.setdefault(task.request_id, collections.deque()).append(step)
        else:
            wait = self.retries.backoff(task.attempts)
            task.next_attempt_at = now + wait
            self._sleep(wait, self._retry_due, step)
        self.registry.note_task(task)
        logger.warning(
            "task %s: attempt %d of %d failed (%s); %s",
            task.describe(),
            task.attempts,
            self.retries.max_attempts,
            task.last_error,
            "it waits for an earlier task of its request"
            if task.next_attempt_at is None
            else f"the next in {task.next_attempt_at - now:.1f} s",
        )

    def _finish(self, step: _Step, error: BaseException | None) -> None:
        """The task ended: done, dropped, or failed for good. Its request goes on."""
        tasks, index = step
        task = tasks[index]
        del self.unfinished[task.id]
        self._started -= 1
        if isinstance(error, TaskDropped):
            logger.warning("%s; this process does not write it", error)
        elif error is not None:
            self._failed(task, error)
        self.observer.ended(task)
        if self._retrying.get(task.request_id) == task.id:
            del self._retrying[task.request_id]
        if self._stopped:
            return
        held = self._held.get(task.request_id)
        if held:  # the next task that waited behind this one tries again now
            following = held.popleft()
            if not held:
                del self._held[task.request_id]
            self._retrying[task.request_id] = following[0][following[1]].id
            self._admit(following)
        elif self.delay and index + 1 < len(tasks):
            self._admit((tasks, index + 1))

    def _failed(self, task: TaskRecord, error: BaseException) -> None:
        task.status, task.finished_at = TaskStatus.FAILED, time.time()
        task.last_error = describe(error)
        self.registry.note_task(task)
        ids = {"task_id": task.id, "request_id": task.request_id}
        logger.error(
            "task %s failed after %d attempts",
            task.describe(),
            task.attempts,
            exc_info=error,
            extra=ids,
        )

    def log_unfinished(self, reason: str) -> None:
        """Say which tasks this process still has to finish."""
        tasks = list(self.unfinished.values())
        if not tasks:
            logger.info("%s: no background tasks unfinished", reason)
            return
        shown = ", ".join(task.describe() for task in tasks[:SHOWN_IN_LOG])
        more = f" and {len(tasks) - SHOWN_IN_LOG} more" if len(tasks) > SHOWN_IN_LOG else ""
        logger.warning("%s: %d background tasks unfinished: %s%s", reason, len(tasks), shown, more)
