"""Crash recovery: finishing what dead owners left (rules 6 to 11).

A dead owner's unfinished tasks are of two kinds. Those it claimed may already be in its data
files, whole or in part: they are resolved by reading the bytes at the claimed offsets (rules
7 to 9) and writing only what is missing, claimed in the dead owner's name (rule 10). Those it
never claimed were written nowhere: they are adopted, and run again by the adopter from the
start (rule 11).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from server.observe import NOBODY, Observer
from server.records import TaskRecord
from server.registry.claims import bytes_present, place_claimed
from server.registry.files import DataFiles
from server.registry.owners import OwnerLocks
from server.registry.store import Store
from server.status import TaskStatus

logger = logging.getLogger("bgtasks.registry")


async def recover_dead_owners(
    store: Store, files: DataFiles, owners: OwnerLocks, me: str, observer: Observer = NOBODY
) -> list[TaskRecord]:
    """Finish the claimed lines of every dead owner and adopt its other unfinished tasks for
    `me`. Returns the adopted tasks, queued again: the caller runs them."""
    candidates = await store.owners_with_unfinished_tasks() | owners.listed()
    adopted: list[TaskRecord] = []
    for owner in sorted(candidates - {me}):
        fd = owners.take_if_dead(owner)
        if fd is None:
            continue  # rule 6: alive, or a sibling is recovering it
        try:
            if await store.is_alive(owner):
                continue
            adopted += await _recover_owner(store, files, owner, me, observer)
        finally:
            owners.release(owner, fd)
    return adopted


async def _recover_owner(
    store: Store, files: DataFiles, owner: str, me: str, observer: Observer
) -> list[TaskRecord]:
    work = await store.dead_owner_work(owner)
    claimed = place_claimed(work.claims, work.tasks, work.ended_lengths)
    later = {claim.number: await store.earliest_later_start(claim) for claim in work.claims}
    by_file: dict[str, list[TaskRecord]] = {}
    for task in claimed:
        by_file.setdefault(task.file, []).append(task)
    finished: list[TaskRecord] = []
    for name, tasks in by_file.items():
        try:
            finished += await _resolve(store, files, owner, name, tasks, later)
        except OSError as exc:
            for task in tasks:
                task.status, task.finished_at = TaskStatus.FAILED, time.time()
                task.error = f"recovery failed: {type(exc).__name__}: {exc}"
                finished.append(task)
    await store.end_recovery(owner, finished)
    for task in finished:
        outcome = task.status if task.error is None else task.error
        ids = {"task_id": task.id, "request_id": task.request_id}
        logger.warning(
            "recovered task %s of a stopped server: %s", task.describe(), outcome, extra=ids
        )
    claimed_keys = {task.pk for task in claimed}
    unclaimed = [task for task in work.tasks if task.pk not in claimed_keys]
    moved = await store.adopt(unclaimed, owner, me)
    observer.recovered(finished, moved)
    if moved:
        logger.warning("adopted %d unclaimed tasks of stopped server %s", len(moved), owner)
    return moved


async def _resolve(
    store: Store,
    files: DataFiles,
    owner: str,
    name: str,
    tasks: list[TaskRecord],
    later: Mapping[int, int | None],
) -> list[TaskRecord]:
    """Finish a dead owner's claimed lines in one file: keep what is there, write the rest."""
    fd, inode, size = files.lock(name)
    try:
        to_write: list[tuple[TaskRecord, int]] = []  # (task, bytes already present)
        complete: list[TaskRecord] = []
        for task in tasks:
            present = bytes_present(
                task,
                inode=inode,
                size=size,
                later_start=later.get(task.claim) if task.claim is not None else None,
                read=lambda length, offset: os.pread(fd, length, offset),
            )
            if present == len(task.data):
                complete.append(task)
            else:
                to_write.append((task, present))
        # A line cut short can only be the last thing in the file: finish it first, in place.
        to_write.sort(key=lambda pair: pair[1] == 0)
        offset = size
        for task, present in to_write:
            task.inode, task.offset = inode, offset - present
            offset += len(task.data) - present
        if to_write:
            await store.claim_for(owner, [task for task, _ in to_write])  # rule 10
        for task, present in to_write:
            rest = task.data[present:]
            if os.write(fd, rest) != len(rest):
                raise OSError(f"short write while recovering {task.id}")
        now = time.time()
        done = [*complete, *(task for task, _ in to_write)]
        for task in done:
            task.status, task.finished_at, task.error = TaskStatus.RECOVERED, now, None
        return done
    finally:
        files.unlock(name)
