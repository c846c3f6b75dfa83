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
    store: Store,
    files: DataFiles,
    owners: OwnerLocks,
    me: str,
    *,
    at_start: bool,
    observer: Observer = NOBODY,
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """Finish the claimed lines of every dead owner and adopt its other unfinished tasks for
    `me`. Returns the tasks it finished (recovered, or failed), and the adopted ones, queued
    again: the caller runs those."""
    candidates = await store.owners_with_unfinished_tasks() | owners.listed()
    finished: list[TaskRecord] = []
    adopted: list[TaskRecord] = []
    for owner in sorted(candidates - {me}):
        fd = owners.take_if_dead(owner, patient=at_start)
        if fd is None:
            continue  # rule 6: alive, or a sibling is recovering it
        try:
            if await store.is_alive(owner):
                continue
            done, moved = await _recover_owner(store, files, owner, me, observer)
            finished += done
            adopted += moved
        except OSError as exc:
            # Nothing of it is recorded: what was written is under claims in its name (rule
            # 10), so the next recovery reads it back (rules 8 and 9) and writes the rest.
            logger.warning(
                "could not recover the work of stopped server %s (%s: %s); the next"
                " recovery tries again",
                owner,
                type(exc).__name__,
                exc,
            )
        finally:
            owners.release(owner, fd)
    return finished, adopted


async def rewrite_lost_lines(store: Store, files: DataFiles, owner: str) -> list[TaskRecord]:
    """Write, in this data directory, the lines dead `owner` claimed in a data directory that
    is gone for good: claimed here in its name (rule 10) and ended `recovered`; its claims there
    end. They may already be in the lost directory's files: this can write a line twice. The
    later tasks of their requests then become adoptable (rule 11)."""
    _, tasks = await store.lost_lines(owner)
    for task in tasks:
        task.claim = None  # its bytes cannot be read from here: write it whole
    by_file: dict[str, list[TaskRecord]] = {}
    for task in tasks:
        by_file.setdefault(task.file, []).append(task)
    written: list[TaskRecord] = []
    for name, file_tasks in by_file.items():
        written += await _resolve(store, files, owner, name, file_tasks, {})
    await store.end_recovery(owner, written, everywhere=True)
    for task in written:
        logger.warning("rewrote task %s of lost server %s here", task.describe(), owner)
    return written


async def _recover_owner(
    store: Store, files: DataFiles, owner: str, me: str, observer: Observer
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    work = await store.dead_owner_work(owner)
    claimed = place_claimed(work.claims, work.tasks, work.ended_lengths)
    later = {claim.number: await store.earliest_later_start(claim) for claim in work.claims}
    by_file: dict[str, list[TaskRecord]] = {}
    for task in claimed:
        by_file.setdefault(task.file, []).append(task)
    finished: list[TaskRecord] = []
    for name, tasks in by_file.items():
        finished += await _resolve(store, files, owner, name, tasks, later)  # OSError: later
    await store.end_recovery(owner, finished)
    for task in finished:
        outcome = task.status if task.last_error is None else task.last_error
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
    return finished, moved


async def _resolve(
    store: Store,
    files: DataFiles,
    owner: str,
    name: str,
    tasks: list[TaskRecord],
    later: Mapping[int, int | None],
) -> list[TaskRecord]:
    """Finish a dead owner's claimed lines in one file: keep what is there, write the rest."""
    fd, inode, size = await files.lock(name)
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
        end = size
        for task, present in to_write:
            rest = task.data[present:]
            try:
                if os.write(fd, rest) != len(rest):
                    raise OSError(f"short write while recovering {task.id}")
            except OSError:
                os.ftruncate(fd, end)  # no part of a line stays for others to write after
                raise
            end += len(rest)
        now = time.time()
        done = [*complete, *(task for task, _ in to_write)]
        for task in done:
            task.status, task.finished_at, task.last_error = TaskStatus.RECOVERED, now, None
        return done
    finally:
        files.unlock(name)
