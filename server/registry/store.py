"""The seam between the claims protocol and a database: what the protocol needs from storage.

`SqliteStore` (server/registry/sqlite/) is its implementation today: one file in the data
directory, shared by the processes on one machine, whose liveness is their owner locks. The
seam is drawn for a store shared by processes on many machines too (PostgreSQL): there, a
process's liveness is a lock the database holds for its session, and a task can change owner
while its old owner still runs (a partition), so a claim lists only the tasks its owner still
owns (rule 13).

Every method is a coroutine: a networked store waits for its server, while SQLite does its
work at once on the event loop (each statement takes microseconds to a millisecond).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.records import RequestRecord, TaskRecord
from server.registry.claims import Claim
from server.registry.events import Event
from server.status import TaskStatus


class RegistryError(RuntimeError):
    """The registry could not record work: nothing of it was accepted."""


class StoreBusy(RegistryError):
    """A commit could not be made now (another process holds the lock, the connection is
    down); nothing of it was committed and it can be retried."""


class StoreFault(RegistryError):
    """The store cannot be used (damaged, not a registry, read-only) until it is repaired."""


class TaskDropped(RegistryError):
    """The task is no longer this owner's to write: it was cancelled, or another process
    adopted it while this one was cut off from the store (rule 13)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt of a task, kept for the task's history."""

    task: int  # its key
    attempt: int
    started_at: float | None
    failed_at: float
    error: str


@dataclass(slots=True)
class Changes:
    """What one transaction records, besides the claims."""

    intents: list[RequestRecord] = field(default_factory=list)
    """Requests whose tasks were accepted: their rows and their tasks' rows (rule 1)."""
    requests: dict[str, RequestRecord] = field(default_factory=dict)
    """Requests whose response went out: its time and status, or the whole row."""
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    """Tasks whose state changed: started, done, failed."""
    ended_claims: list[int] = field(default_factory=list)
    """Claims every line of which has ended (rule 5)."""
    failures: list[Failure] = field(default_factory=list)
    """Failed attempts, for the tasks' histories."""
    events: list[Event] = field(default_factory=list)
    """Events of changes made outside the group commit (recovery, cancels) to record with it;
    the group commit adds the events of its own changes."""

    def __bool__(self) -> bool:
        return bool(
            self.intents
            or self.requests
            or self.tasks
            or self.ended_claims
            or self.failures
            or self.events
        )


@dataclass(slots=True)
class DeadOwnerWork:
    """What a dead owner left unfinished."""

    tasks: list[TaskRecord]
    """Its unfinished tasks, in key order (the order their intents were committed in)."""
    claims: list[Claim]
    """Its claims that have not ended, oldest first."""
    ended_lengths: dict[int, int]
    """For the keys in those claims whose task ended: its line's length in bytes (rule 7)."""


class Store(Protocol):
    """Storage for the registry. Requests and tasks are rows; claims are rows of their own."""

    name: str
    """What `GET /health` calls it: "sqlite" or "postgresql"."""
    shared: bool
    """Processes on other machines use it too: dead owners' work is looked for all along, not
    only when a process starts."""

    async def open(self, owner: str) -> None:
        """Create the schema or migrate an older one, and register `owner` as alive. Raises
        StoreFault (with a one-line reason) if the store cannot be used."""

    async def close(self) -> None:
        """Let go of every connection. Unfinished tasks stay, for a later recovery."""

    async def commit(
        self, changes: Changes, claims: Sequence[Sequence[TaskRecord]], events: Sequence[Event]
    ) -> list[Claim]:
        """Record `changes`, `events` (as one row of the event log) and one claim per list of
        lines (one file each, placed back to
        back, rule 3) in one transaction. Gives each intent's tasks their keys (`pk`), in the
        order of the intents, and renames an intent whose client-chosen id an accepted request
        already has. Returns the claims made, in the order given; a claim lists only the tasks
        this owner still owns and that were not cancelled meanwhile (rule 13). A task's state
        is never written over once it was cancelled. Raises StoreBusy or StoreFault, having
        committed nothing."""

    async def is_alive(self, owner: str) -> bool:
        """Whether `owner`, whose owner lock in this data directory the caller holds (so it is
        dead here, or never ran here), is alive elsewhere."""

    async def live_owners(self) -> int:
        """How many owners are alive."""

    async def owners_with_unfinished_tasks(self) -> set[str]:
        """Every owner that has tasks not yet ended."""

    async def dead_owner_work(self, owner: str) -> DeadOwnerWork:
        """What `owner` (dead) left: its unfinished tasks and open claims."""

    async def earliest_later_start(self, claim: Claim) -> int | None:
        """The lowest start of the claims on `claim`'s file and inode made after it (rule 8)."""

    async def claim_for(self, owner: str, tasks: Sequence[TaskRecord]) -> Claim:
        """Commit a claim of lines placed back to back in one file, in `owner`'s name: a
        recoverer claims what it writes for the dead owner (rule 10)."""

    async def adopt(self, tasks: Sequence[TaskRecord], dead: str, owner: str) -> list[TaskRecord]:
        """Make `owner` the owner of `dead`'s unclaimed `tasks` (rule 11), each task once
        whoever else tries: returns the ones this call moved, queued again."""

    async def end_recovery(
        self, owner: str, tasks: Sequence[TaskRecord], *, everywhere: bool = False
    ) -> None:
        """Record the recovered (or failed) `tasks` of dead `owner` and end its open claims in
        this data directory (or in every one: `everywhere`)."""

    async def lost_lines(self, owner: str) -> tuple[dict[str, Any] | None, list[TaskRecord]]:
        """What is known of `owner` (its host and data directory; None if nothing), and its
        unfinished tasks whose lines are claimed in another data directory than this one: they
        wait for that directory (in key order)."""

    async def cancel(self, task_id: str, at: float) -> bool:
        """Cancel the task if it is unfinished and its line not claimed: it ends `cancelled`
        (at `at`) and is never written. Whether it was."""

    async def requeue(self, task_id: str, owner: str) -> TaskRecord | None:
        """Give a failed task a fresh set of attempts under `owner`, queued again; returns it
        for `owner` to run, or None if it is not failed."""

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        """A task, as the HTTP API returns it."""

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        """A request with its tasks and their failed attempts, as the HTTP API returns it."""

    async def list_tasks(self, status: TaskStatus | None, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` tasks (with `status`, if given), newest first."""

    async def count_unfinished(self) -> int:
        """How many tasks have not ended."""

    event_cursor: str
    """The shape of this store's cursors in the event log, as a regular expression."""

    async def listen(self, until: float) -> None:
        """Ask every process sharing the store to record events until `until` (Unix seconds):
        a stream of them is open."""

    async def listened_until(self) -> float:
        """Until when events are to be recorded (0.0 if no stream ever asked)."""

    async def last_event_commit(self) -> str:
        """Where the event log ends now: a cursor for `events_after`."""

    async def events_after(
        self, cursor: str, limit: int, *, inclusive: bool = False
    ) -> list[tuple[str, str]]:
        """The event log's rows committed after `cursor` (and its own, if `inclusive`), oldest
        first, at most `limit`: (each one's cursor, its events encoded)."""


def task_from_row(row: Any) -> TaskRecord:
    """A task as either store reads it back (a `sqlite3.Row` or a dict: both index by name)."""
    return TaskRecord(
        id=row["id"],
        request_id=row["request_id"],
        seq=row["seq"],
        file=row["file"],
        line=row["line"],
        queued_at=row["queued_at"],
        status=TaskStatus(row["status"]),
        started_at=row["started_at"],
        last_error=row["last_error"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        data=row["line"].encode(),
        pk=row["pk"],
    )
