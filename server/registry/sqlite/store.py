"""The registry in SQLite: one file in the data directory, shared by its processes.

One write connection, used on the event loop: each commit takes SQLite's write lock for a
millisecond or so, and a busy lock is retried by the caller rather than waited for here. A
read-only connection serves the HTTP API (in WAL mode readers never wait for the writer), and a
thread of its own copies the WAL back into the database (`Checkpointer`).
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from server.paths import registry_path
from server.records import TaskRecord
from server.registry.claims import Claim
from server.registry.events import Event, encode
from server.registry.owners import OwnerLocks
from server.registry.sqlite import commit as sql
from server.registry.sqlite import queries, recovery
from server.registry.sqlite.checkpoint import Checkpointer
from server.registry.sqlite.prune import prune
from server.registry.sqlite.schema import check_registry, connect, create_or_migrate, is_fault
from server.registry.store import Changes, DeadOwnerWork, StoreBusy, StoreFault
from server.status import TaskStatus

# The write connection runs on the event loop, so it never waits long for another process's
# lock at once: the group commit retries a busy registry until its lock timeout runs out.
BUSY_WAIT_S = 0.05
RETRY_S = 0.05
PRUNE_EVERY = 500


class SqliteStore:
    """`Store` on SQLite. Owners show they are alive with their lock files (rule 6)."""

    name = "sqlite"
    shared = False

    def __init__(self, data_dir: Path, *, retention: int, lock_timeout: float) -> None:
        self.data_dir = data_dir
        self.retention = retention
        self.lock_timeout = lock_timeout
        self.owner = ""
        self._path = registry_path(data_dir)
        # Each prune holds the loop while it deletes: prune every PRUNE_EVERY recorded
        # requests, or often enough to stay within ~10% over retention.
        self._prune_every = max(1, min(PRUNE_EVERY, retention // 10))
        self._since_prune = 0
        # Its RESTART may keep commits waiting that long for readers: well within their busy
        # timeout.
        wait = min(0.02, BUSY_WAIT_S / 2, lock_timeout / 4)
        self._checkpointer = Checkpointer(self._path, timeout=wait)
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._host = socket.gethostname()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, owner: str) -> None:
        self.owner = owner
        check_registry(self.data_dir)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._translated():
            # Siblings starting at once migrate in turn: wait for each other as long as needed.
            self._conn = connect(self._path, timeout=self.lock_timeout)
            create_or_migrate(self._conn)
            busy_ms = int(min(BUSY_WAIT_S, self.lock_timeout) * 1000)
            self._conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._reader = connect(self._path, readonly=True, timeout=self.lock_timeout)
        self._checkpointer.start()

    async def close(self) -> None:
        self._checkpointer.stop()
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        self._conn = self._reader = None

    # -- the group commit ------------------------------------------------------------------

    async def commit(
        self, changes: Changes, claims: Sequence[Sequence[TaskRecord]], events: Sequence[Event]
    ) -> list[Claim]:
        conn = self._writer()
        with self._translated():
            conn.execute("BEGIN IMMEDIATE")  # waits at most BUSY_WAIT_S: the caller retries
            try:
                if changes.intents:
                    sql.insert_intents(conn, self.owner, changes.intents)
                if changes.requests:
                    sql.record_requests(conn, changes.requests.values())
                made = sql.claim(conn, self.owner, claims) if claims else []
                if changes.tasks:
                    sql.update_tasks(conn, changes.tasks.values())
                if changes.ended_claims:
                    # Rule 5: a claim ends in the commit of its tasks' ends.
                    conn.executemany(
                        "UPDATE claims SET ended = 1 WHERE claim = ?",
                        [(claim,) for claim in changes.ended_claims],
                    )
                if changes.failures:
                    conn.executemany(
                        "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                        [
                            (f.task, f.attempt, f.started_at, f.failed_at, f.error)
                            for f in changes.failures
                        ],
                    )
                if events:
                    conn.execute(
                        "INSERT INTO events (at, body) VALUES (?, ?)", (time.time(), encode(events))
                    )
                self._since_prune += len(changes.requests)  # each request is noted once
                if self._since_prune >= self._prune_every:
                    self._since_prune = 0
                    prune(conn, self.retention)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return made

    # -- recovery and operators ------------------------------------------------------------

    async def is_alive(self, owner: str) -> bool:
        # Every owner of a SQLite registry runs on its data directory, and shows it is alive
        # there only by its lock file, which the caller holds.
        return False

    async def live_owners(self) -> int:
        return OwnerLocks(self.data_dir).alive()

    async def owners_with_unfinished_tasks(self) -> set[str]:
        with self._translated():
            return recovery.owners_with_unfinished_tasks(self._writer())

    async def dead_owner_work(self, owner: str) -> DeadOwnerWork:
        with self._translated():
            return recovery.dead_owner_work(self._writer(), owner)

    async def earliest_later_start(self, claim: Claim) -> int | None:
        with self._translated():
            return recovery.earliest_later_start(self._writer(), claim)

    async def claim_for(self, owner: str, tasks: Sequence[TaskRecord]) -> Claim:
        async with self._transaction() as conn:
            (made,) = sql.claim(conn, owner, [tasks])
        return made

    async def adopt(self, tasks: Sequence[TaskRecord], dead: str, owner: str) -> list[TaskRecord]:
        async with self._transaction() as conn:
            moved = recovery.adopt(conn, tasks, dead, owner)
        for task in moved:
            if task.status is not TaskStatus.RETRYING:
                task.status = TaskStatus.QUEUED
            task.started_at, task.adopted = None, True
        return moved

    async def end_recovery(
        self, owner: str, tasks: Sequence[TaskRecord], *, everywhere: bool = False
    ) -> None:
        async with self._transaction() as conn:  # one data directory: here is everywhere
            recovery.end_recovery(conn, owner, tasks)

    async def lost_lines(self, owner: str) -> tuple[dict[str, Any] | None, list[TaskRecord]]:
        # Every line of a SQLite registry is claimed in its own data directory.
        known = owner in OwnerLocks(self.data_dir).listed()
        return ({"owner": owner, "host": self._host} if known else None), []

    async def cancel(self, task_id: str, at: float) -> bool:
        async with self._transaction() as conn:
            return recovery.cancel(conn, task_id, at)

    async def requeue(self, task_id: str, owner: str) -> TaskRecord | None:
        async with self._transaction() as conn:
            return recovery.requeue(conn, task_id, owner)

    # -- reads -----------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        with self._translated():
            found = queries.get_task(self._read(), task_id)
        if found is not None:
            found["host"] = self._host
        return found

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        with self._translated():
            found = queries.get_request(self._read(), request_id)
        if found is not None:
            for task in found["tasks"]:
                task["host"] = self._host
        return found

    async def list_tasks(self, status: TaskStatus | None, limit: int) -> list[dict[str, Any]]:
        with self._translated():
            tasks = queries.list_tasks(self._read(), status, limit)
        for task in tasks:
            task["host"] = self._host  # every owner of this registry runs on this machine
        return tasks

    async def count_unfinished(self) -> int:
        with self._translated():
            return queries.count_unfinished(self._read())

    event_cursor = r"[0-9]{1,18}"  # a commit number

    async def listen(self, until: float) -> None:
        async with self._transaction() as conn:
            conn.execute(
                "INSERT INTO listening VALUES (1, ?)"
                " ON CONFLICT (one) DO UPDATE SET until = max(until, excluded.until)",
                (until,),
            )

    async def listened_until(self) -> float:
        with self._translated():
            row = self._read().execute("SELECT max(until) FROM listening").fetchone()
        return float(row[0] or 0.0)

    async def last_event_commit(self) -> str:
        with self._translated():
            return queries.last_event_commit(self._read())

    async def events_after(
        self, cursor: str, limit: int, *, inclusive: bool = False
    ) -> list[tuple[str, str]]:
        with self._translated():
            return queries.events_after(self._read(), cursor, limit, inclusive=inclusive)

    # -- helpers ---------------------------------------------------------------------------

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreFault("the task registry is not open")
        return self._conn

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreFault("the task registry is not open")
        return self._reader

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[sqlite3.Connection]:
        """One transaction of recovery's or an operator's. Its BEGIN IMMEDIATE is retried
        without blocking the loop while another process holds the write lock, for up to the
        lock timeout."""
        conn = self._writer()
        with self._translated():
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if is_fault(exc) or time.monotonic() >= deadline:
                        raise
                await asyncio.sleep(RETRY_S)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's errors as the registry's: a damaged or unusable file is a StoreFault, a
        busy (or full) one a StoreBusy."""
        try:
            yield
        except sqlite3.Error as exc:
            if is_fault(exc):
                raise StoreFault(f"task registry {self._path} is unusable: {exc}") from exc
            raise StoreBusy(f"task registry unavailable: {exc}") from exc
