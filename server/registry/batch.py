"""The group commit: what the event loop hands the registry is committed together, one
transaction at a time, and a claim's lines are written only once it is committed.

Three kinds of work wait for a commit: a request's intents (its response waits for them, rule
1), lines submitted to be written (each waits for its claim, rule 2), and notes of state
changes nobody waits for. Anything someone waits for is committed at once if the last commit
started COMMIT_GAP_S ago, else when it is; so under load one commit serves many requests, and
an idle server adds no wait. Notes ride along, or go within NOTE_WINDOW_S. While a commit runs
(a networked store waits for its server) the next batch gathers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.observe import NOBODY, Observer
from server.records import RequestRecord, TaskRecord
from server.registry.claims import Claim, place_lines
from server.registry.events import (
    Event,
    intent_events,
    received_event,
    response_event,
    task_event,
)
from server.registry.files import DataFiles, append_lines
from server.registry.store import (
    Changes,
    Failure,
    RegistryError,
    Store,
    StoreBusy,
    StoreFault,
    TaskDropped,
)
from server.status import SUCCEEDED, TaskStatus

logger = logging.getLogger("bgtasks.registry")

COMMIT_GAP_S = 0.001
NOTE_WINDOW_S = 0.05
RETRY_S = 0.05

Ended = Callable[[BaseException | None], None]
"""Called once a submitted line was written (None) or could not be (the error)."""
Submission = tuple[TaskRecord, Ended]


@dataclass(slots=True)
class Batch:
    """Everything waiting for the next group commit."""

    changes: Changes = field(default_factory=Changes)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)  # one per intent
    submissions: list[Submission] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes or self.submissions)

    @property
    def urgent(self) -> bool:
        """Someone waits for it: a response, or a line."""
        return bool(self.changes.intents or self.submissions)


class GroupCommit:
    """Gathers work into batches and commits them, one at a time, through `store`."""

    def __init__(
        self, store: Store, files: DataFiles, *, lock_timeout: float, observer: Observer = NOBODY
    ) -> None:
        self.store = store
        self.observer = observer
        self.files = files
        self.lock_timeout = lock_timeout
        self.next = Batch()
        self.fault: StoreFault | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._urgent = False
        self._last_start = 0.0
        self._committing: asyncio.Task[None] | None = None
        self._stalled_since: float | None = None
        # Set (and replaced) at each commit: what a stream of events waits on.
        self.committed = asyncio.Event()
        # Events are made only while a stream listens (Unix seconds; see Registry.listen):
        # making them costs an eighth of a notification's CPU.
        self.recording_until = 0.0

    # -- what the registry hands over ------------------------------------------------------

    async def commit_intents(self, request: RequestRecord) -> None:
        """Durably record `request` and its queued tasks (rule 1); returns after the group
        commit. The request may come back renamed (its client-chosen id was taken). Raises
        RegistryError: the work was not accepted."""
        if self.fault is not None:
            raise self.fault
        future = asyncio.get_running_loop().create_future()
        self.next.changes.intents.append(request)
        self.next.waiters.append(future)
        self.schedule(0.0)
        await future

    def note_request(self, request: RequestRecord) -> None:
        """Record the request's status and response time at the next commit (not awaited)."""
        if self.fault is None:
            self.next.changes.requests[request.id] = request
            self.schedule(NOTE_WINDOW_S)

    def note_task(self, task: TaskRecord) -> None:
        """Record the task's current state at the next commit (not awaited)."""
        if self.fault is None:
            self.next.changes.tasks[task.id] = task
            self.schedule(NOTE_WINDOW_S)

    def note_failure(self, failure: Failure) -> None:
        """Record a failed attempt in its task's history at the next commit (not awaited)."""
        if self.fault is None:
            self.next.changes.failures.append(failure)
            self.schedule(NOTE_WINDOW_S)

    def note_event(self, event: Event) -> None:
        """Record an event of a change made outside the group commit, with the next commit."""
        if self.fault is None and time.time() < self.recording_until:
            self.next.changes.events.append(event)
            self.schedule(NOTE_WINDOW_S)

    def submit(self, task: TaskRecord, ended: Ended) -> None:
        """At the next group commit, claim an offset for the task's line, commit the claim,
        write the line and mark the task done; then call `ended(None)`, or `ended(error)`
        (OSError or RegistryError) if the line was not written. Lines submitted in turn are
        written in that order."""
        if self.fault is not None:
            ended(self.fault)
            return
        self.next.submissions.append((task, ended))
        self.schedule(0.0)

    async def drain(self) -> None:
        """Commit (and write) whatever is waiting now, without waiting for the timer. A commit
        that writes lines leaves their ends for one more."""
        for _ in range(3):
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            if self._committing is not None:
                await asyncio.shield(self._committing)
            if not self.next:
                return
            self._start(asyncio.get_running_loop())
            if self._committing is not None:
                await asyncio.shield(self._committing)

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self, within: float) -> None:
        """Make sure a commit starts within `within` seconds, but no sooner than COMMIT_GAP_S
        after the last one started."""
        if self._handle is not None and (self._urgent or within >= NOTE_WINDOW_S):
            return  # hot path: what is scheduled is already as soon as this call could ask
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside the loop: `drain` commits what is waiting
        due = max(loop.time() + within, self._last_start + COMMIT_GAP_S)
        if self._handle is not None:
            if self._due <= due:
                return
            self._handle.cancel()
        self._due, self._urgent = due, within == 0.0
        self._handle = loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        if self._committing is None:  # else the running commit schedules the next one
            self._start(asyncio.get_running_loop())

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.next:
            return
        batch, self.next = self.next, Batch()
        self._last_start = loop.time()
        self._committing = loop.create_task(self._run(batch))

    async def _run(self, batch: Batch) -> None:
        try:
            await self._commit_and_write(batch)
        except Exception as exc:  # a bug: never leave a waiter hanging or a note behind
            logger.exception("registry commit failed")
            error = RegistryError(f"task registry commit failed: {exc}")
            self._refuse(batch, error)
            self._keep_notes(batch)
        finally:
            self._committing = None
            if self.next:
                self.schedule(0.0 if self.next.urgent else NOTE_WINDOW_S)

    # -- one commit ------------------------------------------------------------------------

    async def _commit_and_write(self, batch: Batch) -> None:
        by_file: dict[str, list[Submission]] = {}
        for submission in batch.submissions:
            by_file.setdefault(submission[0].file, []).append(submission)
        locked: list[tuple[str, int, list[Submission]]] = []
        claimed = False
        try:
            # One fixed order across every process, or two of them can deadlock on the files.
            claimed_at = time.time()
            for name, submissions in sorted(by_file.items()):
                try:
                    fd, inode, size = await self.files.lock(name)
                except OSError as exc:
                    for _, ended in submissions:
                        ended(exc)
                    continue
                tasks = [task for task, _ in submissions]
                place_lines(tasks, inode, size)  # rule 3
                for task in tasks:
                    if task.started_at is None:  # no delay: its write is its start
                        task.started_at = claimed_at
                locked.append((name, fd, submissions))
            lines = [[task for task, _ in items] for _, _, items in locked]
            recording = claimed_at < self.recording_until
            events = _events(batch.changes, lines, claimed_at) if recording else []
            try:
                began = time.perf_counter()
                claims = await self.store.commit(batch.changes, lines, events)  # rules 1 and 2
            except StoreBusy as exc:
                self._stalled(exc, batch, [item for _, _, items in locked for item in items])
                return
            except StoreFault as exc:
                self._faulted(exc, batch, [item for _, _, items in locked for item in items])
                return
            self._stalled_since = None
            self.committed.set()  # streams of events wake
            self.committed = asyncio.Event()
            self.observer.committed(time.perf_counter() - began, _size(batch))
            claimed = bool(claims)
            for request in batch.changes.intents:
                request.accepted = True
            for future in batch.waiters:
                _settle(future, None)
            for (_, fd, submissions), claim in zip(locked, claims, strict=True):
                if claim.keys:  # else every one of its tasks was dropped: no claim was made
                    self.next.changes.ended_claims.append(claim.number)  # rule 5, next commit
                _write(fd, claim, submissions)
        finally:
            for name, _, _ in locked:
                self.files.unlock(name)
            if claimed:
                # Every line of these claims has ended, written or not (a failure is noted by
                # whoever `ended` reported it to): the claims end in the commit of those ends.
                for _, _, submissions in locked:
                    for task, _ in submissions:
                        if task.status in SUCCEEDED:
                            self.next.changes.tasks[task.id] = task
                self.schedule(NOTE_WINDOW_S)

    def _stalled(self, exc: StoreBusy, batch: Batch, submissions: list[Submission]) -> None:
        """The commit failed but may succeed later (another process holds the lock): retry
        shortly, and after `lock_timeout` refuse the waiting intents and lines. State changes
        are never dropped."""
        now = time.monotonic()
        if self._stalled_since is None:
            self._stalled_since = now
            logger.warning("%s; retrying", exc)
        if now - self._stalled_since >= self.lock_timeout:
            self._refuse(Batch(batch.changes, batch.waiters, submissions), exc)
            self._stalled_since = now
        else:
            self.next.changes.intents[:0] = batch.changes.intents
            self.next.waiters[:0] = batch.waiters
            # Lines already refused (their file could not be opened) are not retried.
            self.next.submissions[:0] = submissions
        self._keep_notes(batch)
        self.schedule(RETRY_S)

    def _faulted(self, exc: StoreFault, batch: Batch, submissions: list[Submission]) -> None:
        """The store cannot be used: refuse this batch and everything after it."""
        if self.fault is None:
            logger.error("%s; refusing all work until it is repaired and the server restarted", exc)
        self.fault = exc
        self._refuse(Batch(batch.changes, batch.waiters, submissions), exc)
        later, self.next = self.next, Batch()
        self._refuse(later, exc)

    @staticmethod
    def _refuse(batch: Batch, error: BaseException) -> None:
        for future in batch.waiters:
            _settle(future, error)
        for _, ended in batch.submissions:
            ended(error)

    def _keep_notes(self, batch: Batch) -> None:
        """Carry an uncommitted batch's state changes over to the next one: they are never
        dropped (a claim left open would hold the prune's floor until the next start)."""
        changes = self.next.changes
        for key, request in batch.changes.requests.items():
            changes.requests.setdefault(key, request)
        for key, task in batch.changes.tasks.items():
            changes.tasks.setdefault(key, task)
        changes.ended_claims.extend(batch.changes.ended_claims)
        changes.failures.extend(batch.changes.failures)
        changes.events.extend(batch.changes.events)


def _events(changes: Changes, lines: list[list[TaskRecord]], claimed_at: float) -> list[Event]:
    """The events this commit's changes make, in the order they happened."""
    events = list(changes.events)
    for request in changes.intents:
        events.extend(intent_events(request))
    for request in changes.requests.values():
        if not request.accepted:  # recorded only now: it queued nothing
            events.append(received_event(request))
        events.append(response_event(request))
    for tasks in lines:
        for task in tasks:
            if task.started_at == claimed_at:  # no delay: its claim is its start
                events.append(task_event(task))
    events.extend(task_event(task) for task in changes.tasks.values())
    events.sort(key=_when)  # one commit holds moments a hair apart, noted in any order
    return events


def _when(event: Event) -> float:
    return event[3] if event[3] is not None else math.inf


def _write(fd: int, claim: Claim, submissions: list[Submission]) -> None:
    """Write a claim's lines (rule 4), mark the ones that landed, and report each one's end.
    A task the claim left out is another owner's now (rule 13): it is not written here, and
    the claim's lines are placed without it."""
    if len(claim.keys) != len(submissions):
        kept = set(claim.keys)
        for task, ended in submissions:
            if task.pk not in kept:
                ended(TaskDropped(f"task {task.id} was cancelled or adopted by another process"))
        submissions = [item for item in submissions if item[0].pk in kept]
        if not submissions:
            return
        place_lines([task for task, _ in submissions], claim.inode, claim.start)
    for task, _ in submissions:
        task.claim = claim.number
    landed, error = append_lines(fd, claim.start, [task.data for task, _ in submissions])
    now = time.time()
    for task, _ in submissions[:landed]:
        task.status = TaskStatus.RECOVERED if task.adopted else TaskStatus.DONE
        task.finished_at = now
    for _, ended in submissions[:landed]:
        ended(None)
    for _, ended in submissions[landed:]:
        ended(error)


def _size(batch: Batch) -> int:
    changes = batch.changes
    return (
        len(changes.intents) + len(changes.requests) + len(changes.tasks) + len(batch.submissions)
    )


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return  # cancelled at a shutdown timeout
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
