"""The registry the rest of the server uses: its lifecycle, the group commit, and the reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.observe import NOBODY, Observer
from server.records import TaskRecord
from server.registry.batch import GroupCommit
from server.registry.files import DataFiles
from server.registry.owners import OwnerLocks, check_state_dir
from server.registry.recovery import recover_dead_owners
from server.registry.store import Store, StoreFault
from server.status import TaskStatus


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
        self.commit_intents = self._commits.commit_intents
        self.note_request = self._commits.note_request
        self.note_task = self._commits.note_task
        self.submit = self._commits.submit
        self.flush = self._commits.drain

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
            return await recover_dead_owners(
                self.store, self._files, self._owners, self.owner, self._observer
            )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Commit everything waiting, close the store and let go of the owner lock. Tasks
        not finished stay unfinished in the store, for the next start to recover."""
        if self._commits.fault is None:
            await self._commits.drain()
        await self.store.close()
        self._files.close()
        if self._owner_fd is not None:
            self._owners.release(self.owner, self._owner_fd)
            self._owner_fd = None

    # -- what the event loop hands over ----------------------------------------------------
    #
    # commit_intents(request), note_request(request), note_task(task), submit(task, ended)
    # and flush() are the group commit's own methods (see GroupCommit): the event loop calls
    # them for every request, where a layer of delegation would cost a frame each time.

    # -- reads -----------------------------------------------------------------------------

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        with self._watch():
            return await self.store.get_request(request_id)

    async def list_tasks(self, status: TaskStatus | None, limit: int) -> list[dict[str, Any]]:
        with self._watch():
            return await self.store.list_tasks(status, limit)

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
