"""The claims protocol: how a line is written exactly once, even across `kill -9`.

The rules are numbered in docs/protocol.md, with the code that keeps each and the test that
proves it; comments in this package cite them as "rule N". This module holds the protocol's
pure parts: where a claim's lines go, where recovery finds a dead owner's lines, and whether
the bytes found there are the line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from server.records import TaskRecord


@dataclass(frozen=True, slots=True)
class Claim:
    """Lines about to be written to one file: back to back from `start`, in the order of
    `keys` (rule 3). Committed before the write (rule 2); numbered in the order claims are
    made; `owner` is the process the lines are written for (rule 10)."""

    number: int
    owner: str
    file: str
    inode: int
    start: int
    keys: tuple[int, ...]


def place_lines(tasks: Iterable[TaskRecord], inode: int, start: int) -> int:
    """Give each task, in order, its place in a claim starting at `start` (rule 3). Returns
    where the claim ends."""
    offset = start
    for task in tasks:
        task.inode, task.offset = inode, offset
        offset += len(task.data)
    return offset


def place_claimed(
    claims: Iterable[Claim], tasks: Iterable[TaskRecord], ended_lengths: Mapping[int, int]
) -> list[TaskRecord]:
    """Give each of a dead owner's unfinished tasks the place of its latest claim, if any, and
    return the tasks that were claimed. `claims` are the owner's open claims, oldest first;
    `ended_lengths` the line lengths (in bytes) of the claimed tasks that already ended.

    A claim's lines follow each other from its start (rule 3), and a line that ended still
    took its room (rule 7). A key that is neither unfinished nor ended was pruned: its length
    is unknown, so where the claim's later lines went is too, and they count as unclaimed
    (the prune never removes the tasks of an open claim, so this is a safety net)."""
    by_key = {task.pk: task for task in tasks}
    claimed: dict[int, TaskRecord] = {}
    for claim in claims:
        offset = claim.start
        for key in claim.keys:
            task = by_key.get(key)
            if task is not None:
                task.claim, task.inode, task.offset = claim.number, claim.inode, offset
                claimed[key] = task  # a later claim of the same task replaces this one
                offset += len(task.data)
            elif key in ended_lengths:
                offset += ended_lengths[key]
            else:
                break
    return sorted(claimed.values(), key=lambda task: task.pk or 0)


def bytes_present(
    task: TaskRecord,
    *,
    inode: int,
    size: int,
    later_start: int | None,
    read: Callable[[int, int], bytes],
) -> int:
    """How many leading bytes of a claimed task's line are already where it was claimed, in
    the file now at its name (`inode`, `size`); `later_start` is the lowest start of the claims
    on that inode made after the task's claim. `read(length, offset)` reads the file."""
    if task.claim is None or task.offset is None or task.inode != inode:
        return 0  # never claimed, or claimed in a file that has since been replaced
    if later_start is not None and later_start <= task.offset:
        # Rule 8: a later claim found the file ending at or before this line's offset, so the
        # line was not (all) there, and what is there now is someone else's.
        return 0
    found = read(len(task.data), task.offset)
    if found == task.data:
        return len(found)
    if found and task.data.startswith(found) and task.offset + len(found) == size:
        return len(found)  # rule 9: cut short, and nothing was written after it
    return 0
