"""The registry the rest of the server uses: its lifecycle, the group commit, and the reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.observe import NOBODY, Observer
from server.records import TaskRecord
from server.registry.batch import GroupCommit
from server.registry.events import task_event
from server.registry.files import DataFiles
from server.registry.owners import OwnerLocks, check_state_dir
from server.registry.recovery import recover_dead_owners, rewrite_lost_lines
from server.registry.store import RegistryError, Store, StoreFault
from server.status import TaskStatus

logger = logging.getLogger("bgtasks.registry")

WATCH_EVERY_S = 1.0
# A stream asks every process to record events for LISTEN_LEASE_S, and asks again every
# LISTEN_RENEW_S while it is open: a client that reconnects within the lease loses nothing.
LISTEN_LEASE_S = 300.0
LISTEN_RENEW_S = 30.0
LISTEN_POLL_S = 0.1  # how often each process looks whether a stream opened


class OwnerAlive(RegistryError):
    """The owner still holds what shows it alive: its work is its own."""


class Registry:
    """Persist requests and tasks, write their lines exactly once, and recover the work of
    owners that died (docs/protocol.md).

    `owner` is this process's id. Everything is used from the event loop.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        owner: str,
        store: Store,
        lock_timeout: float,
        observer: Observer = NOBODY,
    ) -> None:
        self.data_dir = data_dir
        self.owner = owner
        self.store = store
        self._owners = OwnerLocks(data_dir)
        self._owner_fd: int | None = None
        self._files = DataFiles(data_dir)
        self._observer = observer
        self._commits = GroupCommit(
            store, self._files, lock_timeout=lock_timeout, observer=observer
        )
        self._watcher: asyncio.Task[None] | None = None
        self._listening: asyncio.Task[None] | None = None
        self._recording_since = math.inf  # when this process last began to record events
        # Who runs the tasks adopted from owners that die while this process serves.
        self.on_adopted: Callable[[list[TaskRecord]], None] | None = None
        self.commit_intents = self._commits.commit_intents
        self.note_request = self._commits.note_request
        self.note_task = self._commits.note_task
        self.note_failure = self._commits.note_failure
        self.note_event = self._commits.note_event
        self.submit = self._commits.submit
        self.flush = self._commits.drain

    @property
    def committed(self) -> asyncio.Event:
        """Set at the next commit (a new one each time): what a stream of events waits on."""
        return self._commits.committed

    @property
    def fault(self) -> StoreFault | None:
        """Why the registry refuses all work, if it does (its store was found unusable)."""
        return self._commits.fault

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> list[TaskRecord]:
        """Show this process alive (its owner lock, before any task is recorded in its name),
        open the store and recover dead owners' work. Returns the tasks adopted from them,
        queued again: the caller runs them. Raises StoreFault if the store cannot be used."""
        check_state_dir(self.data_dir)
        self._owner_fd = self._owners.hold(self.owner)
        try:
            await self.store.open(self.owner)
            self._record_until(await self.store.listened_until())  # a stream may be open
            finished, adopted = await recover_dead_owners(
                self.store,
                self._files,
                self._owners,
                self.owner,
                at_start=True,
                observer=self._observer,
            )
        except BaseException:
            await self.close()
            raise
        for task in finished:
            self.note_event(task_event(task))
        if self.store.shared:
            self._watcher = asyncio.create_task(self._watch_dead_owners())
        self._listening = asyncio.create_task(self._watch_listeners())
        return adopted

    # -- events are recorded while a stream listens -----------------------------------------

    async def listen(self) -> None:
        """Have every process record events for the lease from now; return once all of them
        do (at once if they already did, or if this one is alone), so a stream opened now
        misses none of theirs."""
        until = time.time() + LISTEN_LEASE_S
        with self._watch():
            await self.store.listen(until)
        self._record_until(until)
        # Every other process looks within LISTEN_POLL_S of when this one saw the lease, and
        # a second period allows for a look that was slow.
        wait = self._recording_since + 2 * LISTEN_POLL_S - time.time()
        if wait > 0 and await self.store.live_owners() > 1:
            await asyncio.sleep(wait)

    def _record_until(self, until: float) -> None:
        now = time.time()
        if self._commits.recording_until <= now < until:
            self._recording_since = now
        self._commits.recording_until = max(self._commits.recording_until, until)

    async def _watch_listeners(self) -> None:
        """Every LISTEN_POLL_S, learn whether a stream in any process asked for events."""
        while True:
            await asyncio.sleep(LISTEN_POLL_S)
            with contextlib.suppress(RegistryError):  # the group commit reports store trouble
                self._record_until(await self.store.listened_until())

    async def _watch_dead_owners(self) -> None:
        """In a store other machines share, owners die while this one serves: every
        WATCH_EVERY_S, recover what they left and hand the adopted tasks to `on_adopted`."""
        failing = False
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                finished, adopted = await recover_dead_owners(
                    self.store,
                    self._files,
                    self._owners,
                    self.owner,
                    at_start=False,
                    observer=self._observer,
                )
            except RegistryError as exc:
                if not failing:
                    logger.warning("looking for dead owners' work failed (%s); trying on", exc)
                failing = True
                continue
            failing = False
            for task in finished:
                self.note_event(task_event(task))
            if adopted and self.on_adopted is not None:
                self.on_adopted(adopted)

    async def close(self) -> None:
        """Commit everything waiting, close the store and let go of the owner lock. Tasks
        not finished stay unfinished in the store, for the next start to recover."""
        for watcher in (self._watcher, self._listening):
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        self._watcher = self._listening = None
        if self._commits.fault is None:
            await self._commits.drain()
        await self.store.close()
        self._files.close()
        if self._owner_fd is not None:
            self._owners.release(self.owner, self._owner_fd)
            self._owner_fd = None

    # -- what the event loop hands over ----------------------------------------------------
    #
    # commit_intents(request), note_request(request), note_task(task), note_failure(failure),
    # submit(task, ended) and flush() are the group commit's own methods (see GroupCommit):
    # the event loop calls them for every request, where a layer of delegation would cost a
    # frame each time.

    # -- reads -----------------------------------------------------------------------------

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        with self._watch():
            return await self.store.get_request(request_id)

    async def list_tasks(self, status: TaskStatus | None, limit: int) -> list[dict[str, Any]]:
        with self._watch():
            return await self.store.list_tasks(status, limit)

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        with self._watch():
            return await self.store.get_task(task_id)

    async def cancel(self, task_id: str, at: float) -> bool:
        """Cancel the task if it is unfinished and its line not claimed (see Store.cancel)."""
        with self._watch():
            if not await self.store.cancel(task_id, at):
                return False
            found = await self.store.get_task(task_id)
        if found is not None:
            self.note_event(("task_cancelled", found["request_id"], task_id, at, None))
        return True

    async def requeue(self, task_id: str) -> TaskRecord | None:
        """A failed task with a fresh set of attempts, this process's to run (Store.requeue)."""
        with self._watch():
            task = await self.store.requeue(task_id, self.owner)
        if task is not None:
            details = {"file": task.file, "retried": True}
            self.note_event(("task_queued", task.request_id, task.id, time.time(), details))
        return task

    async def lost_lines(self, owner: str) -> tuple[dict[str, Any] | None, list[TaskRecord]]:
        """What is known of `owner`, and its lines that wait for another data directory."""
        with self._watch():
            return await self.store.lost_lines(owner)

    async def rewrite_lost_lines(self, owner: str) -> list[TaskRecord]:
        """Write here the lines dead `owner` claimed in a data directory gone for good (they
        may be written twice: see recovery.rewrite_lost_lines). RegistryError if it is alive."""
        with self._watch():
            if await self.is_alive(owner):
                raise OwnerAlive(f"owner {owner} is alive: its lines are its own to write")
            written = await rewrite_lost_lines(self.store, self._files, owner)
        for task in written:
            self.note_event(task_event(task))
        return written

    async def is_alive(self, owner: str) -> bool:
        """Whether `owner` runs: it holds its lock in this data directory, or the store (shared
        by other machines) says so."""
        if owner == self.owner or self._owners.holds(owner):
            return True
        with self._watch():
            return await self.store.is_alive(owner)

    async def count_unfinished(self) -> int:
        with self._watch():
            return await self.store.count_unfinished()

    @contextmanager
    def _watch(self) -> Iterator[None]:
        """A read that finds the store damaged stops all work, as a failed commit would."""
        if self.fault is not None:
            raise self.fault
        try:
            yield
        except StoreFault as exc:
            self._commits.fault = self._commits.fault or exc
            raise
