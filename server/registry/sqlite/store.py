"""The registry in SQLite: one file in the data directory, shared by its processes.

One write connection, used on the event loop: each commit takes SQLite's write lock for a
millisecond or so, and a busy lock is retried by the caller rather than waited for here. A
read-only connection serves the HTTP API (in WAL mode readers never wait for the writer), and a
thread of its own copies the WAL back into the database (`Checkpointer`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.paths import registry_path
from server.records import RequestRecord, TaskRecord, new_request_id
from server.registry.claims import Claim
from server.registry.events import Event, encode
from server.registry.owners import OwnerLocks
from server.registry.sqlite import queries
from server.registry.sqlite.checkpoint import Checkpointer
from server.registry.sqlite.prune import prune
from server.registry.sqlite.schema import check_registry, connect, create_or_migrate, is_fault
from server.registry.store import Changes, DeadOwnerWork, StoreBusy, StoreFault
from server.status import UNFINISHED, TaskStatus

# The write connection runs on the event loop, so it never waits long for another process's
# lock at once: the group commit retries a busy registry until its lock timeout runs out.
BUSY_WAIT_S = 0.05
RETRY_S = 0.05
PRUNE_EVERY = 500
_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))


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
            conn.execute("BEGIN IMMEDIATE")
            try:
                if changes.intents:
                    self._insert_intents(conn, changes.intents)
                if changes.requests:
                    self._record_requests(conn, changes.requests.values())
                made = self._claim(conn, self.owner, claims) if claims else []
                if changes.tasks:
                    _update_tasks(conn, changes.tasks.values())
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

    def _insert_intents(self, conn: sqlite3.Connection, intents: list[RequestRecord]) -> None:
        # A client may choose its request's id; one an accepted request already has (or
        # another intent of this batch) is replaced by a fresh one, so that no accepted
        # request is ever hidden by a later one.
        chosen = [request.id for request in intents if request.id_from_client]
        if chosen:
            marks = ", ".join("?" * len(chosen))
            taken = {
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM requests WHERE first_task IS NOT NULL AND id IN ({marks})",
                    chosen,
                )
            }
            for request in intents:
                if request.id in taken:
                    request.rename(new_request_id())
                taken.add(request.id)
        # Keys are given here, not by SQLite, so that later updates find each row by its key
        # and a request's tasks are the keys first_task..last_task; the write lock is held, so
        # no other process takes the same ones.
        last = conn.execute("SELECT coalesce(max(pk), 0) FROM tasks").fetchone()[0]
        for pk, task in enumerate((t for r in intents for t in r.tasks), start=last + 1):
            task.pk = pk
        conn.executemany(
            # Sent at: not yet, the response waits for this commit.
            "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
            [
                (
                    r.id,
                    r.method,
                    r.path,
                    r.received_at,
                    r.status_code,
                    r.tasks[0].pk,
                    r.tasks[-1].pk,
                )
                for r in intents
            ],
        )
        conn.executemany(
            "INSERT INTO tasks (pk, id, request_id, seq, owner, file, line, status, queued_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
            [
                (t.pk, t.id, t.request_id, t.seq, self.owner, t.file, t.line, t.queued_at)
                for r in intents
                for t in r.tasks
            ],
        )

    @staticmethod
    def _record_requests(conn: sqlite3.Connection, requests: Iterable[RequestRecord]) -> None:
        sent: list[tuple[Any, ...]] = []
        other: list[tuple[Any, ...]] = []
        for r in requests:
            if r.accepted:  # it has had its row since its intents
                sent.append((r.response_sent_at, r.status_code, r.id))
            else:
                other.append(
                    (r.id, r.method, r.path, r.received_at, r.response_sent_at, r.status_code)
                )
        if sent:
            conn.executemany(
                "UPDATE requests SET response_sent_at = ?, status_code = ? WHERE id = ?", sent
            )
        if other:
            # Recorded whole, in place of an earlier request with the same id only if that one
            # was not accepted either.
            conn.executemany(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)"
                " ON CONFLICT (id) DO UPDATE SET method = excluded.method, path = excluded.path,"
                " received_at = excluded.received_at, response_sent_at ="
                " excluded.response_sent_at, status_code = excluded.status_code"
                " WHERE requests.first_task IS NULL",
                other,
            )

    @staticmethod
    def _claim(
        conn: sqlite3.Connection, owner: str, claims: Sequence[Sequence[TaskRecord]]
    ) -> list[Claim]:
        """Rules 2, 3 and 13: a claims row per list of lines, numbered in the order claims are
        made, leaving out any task cancelled meanwhile (a claim left with none is not made:
        number 0). An owner's tasks change hands only once it is dead, so no other is left
        out."""
        keys = [task.pk for tasks in claims for task in tasks]
        marks = ", ".join("?" * len(keys))
        cancelled = {
            row[0]
            for row in conn.execute(
                f"SELECT pk FROM tasks WHERE pk IN ({marks}) AND status = 'cancelled'", keys
            )
        }
        made: list[Claim] = []
        number = conn.execute("SELECT coalesce(max(claim), 0) FROM claims").fetchone()[0]
        for tasks in claims:
            kept = tuple(task.pk or 0 for task in tasks if task.pk not in cancelled)
            first = tasks[0]
            if kept:
                number += 1
            made.append(
                Claim(
                    number if kept else 0,
                    owner,
                    first.file,
                    first.inode or 0,
                    first.offset or 0,
                    kept,
                )
            )
        conn.executemany(
            "INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, 0)",
            [(c.number, c.owner, c.file, c.inode, c.start, _json(c.keys)) for c in made if c.keys],
        )
        return made

    # -- operators ------------------------------------------------------------------------

    async def cancel(self, task_id: str, at: float) -> bool:
        conn = self._writer()
        with self._translated():
            await self._begin(conn)
            try:
                cursor = conn.execute(
                    "UPDATE tasks SET status = 'cancelled', finished_at = ?, next_attempt_at = NULL"
                    f" WHERE id = ? AND status IN ({_UNFINISHED}) AND pk NOT IN (SELECT j.value"
                    " FROM claims, json_each(claims.tasks) AS j WHERE NOT claims.ended)",
                    (at, task_id),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return cursor.rowcount > 0

    async def requeue(self, task_id: str, owner: str) -> TaskRecord | None:
        conn = self._writer()
        with self._translated():
            await self._begin(conn)
            try:
                row = conn.execute(
                    "UPDATE tasks SET status = 'queued', owner = ?, attempts = 0,"
                    " next_attempt_at = NULL, started_at = NULL, finished_at = NULL"
                    " WHERE id = ? AND status = 'failed' RETURNING *",
                    (owner, task_id),
                ).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return None if row is None else _task_from_row(row)

    # -- recovery --------------------------------------------------------------------------

    async def is_alive(self, owner: str) -> bool:
        # Every owner of a SQLite registry runs on its data directory, and shows it is alive
        # there only by its lock file, which the caller holds.
        return False

    async def live_owners(self) -> int:
        return OwnerLocks(self.data_dir).alive()

    async def owners_with_unfinished_tasks(self) -> set[str]:
        conn = self._writer()
        with self._translated():
            rows = conn.execute(f"SELECT DISTINCT owner FROM tasks WHERE status IN ({_UNFINISHED})")
            return {row[0] for row in rows}

    async def dead_owner_work(self, owner: str) -> DeadOwnerWork:
        conn = self._writer()
        with self._translated():
            rows = conn.execute(
                f"SELECT * FROM tasks WHERE owner = ? AND status IN ({_UNFINISHED}) ORDER BY pk",
                (owner,),
            ).fetchall()
            claims = [
                Claim(row[0], owner, row[1], row[2], row[3], tuple(json.loads(row[4])))
                for row in conn.execute(
                    "SELECT claim, file, inode, start, tasks FROM claims"
                    " WHERE owner = ? AND NOT ended ORDER BY claim",
                    (owner,),
                )
            ]
            tasks = [_task_from_row(row) for row in rows]
            unfinished = {task.pk for task in tasks}
            ended_lengths: dict[int, int] = {}
            for claim in claims:
                for key in claim.keys:
                    if key in unfinished or key in ended_lengths:
                        continue
                    row = conn.execute(
                        "SELECT line FROM tasks WHERE pk = ? AND owner = ? AND file = ?",
                        (key, owner, claim.file),
                    ).fetchone()
                    if row is not None:
                        ended_lengths[key] = len(row[0].encode())
        return DeadOwnerWork(tasks, claims, ended_lengths)

    async def earliest_later_start(self, claim: Claim) -> int | None:
        conn = self._writer()
        with self._translated():
            row = conn.execute(
                "SELECT min(start) FROM claims WHERE file = ? AND inode = ? AND claim > ?",
                (claim.file, claim.inode, claim.number),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    async def claim_for(self, owner: str, tasks: Sequence[TaskRecord]) -> Claim:
        conn = self._writer()
        with self._translated():
            await self._begin(conn)
            try:
                (claim,) = self._claim(conn, owner, [tasks])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return claim

    async def adopt(self, tasks: Sequence[TaskRecord], dead: str, owner: str) -> list[TaskRecord]:
        conn = self._writer()
        moved: list[TaskRecord] = []
        with self._translated():
            await self._begin(conn)
            try:
                for task in tasks:
                    # A retrying task keeps its attempts and when its next one is due.
                    cursor = conn.execute(
                        "UPDATE tasks SET owner = ?, started_at = NULL, status = CASE status"
                        " WHEN 'retrying' THEN 'retrying' ELSE 'queued' END"
                        f" WHERE pk = ? AND owner = ? AND status IN ({_UNFINISHED})",
                        (owner, task.pk, dead),
                    )
                    if cursor.rowcount:
                        moved.append(task)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        for task in moved:
            if task.status is not TaskStatus.RETRYING:
                task.status = TaskStatus.QUEUED
            task.started_at, task.adopted = None, True
        return moved

    async def end_recovery(self, owner: str, tasks: Sequence[TaskRecord]) -> None:
        conn = self._writer()
        with self._translated():
            await self._begin(conn)
            try:
                conn.executemany(
                    "UPDATE tasks SET status = ?, finished_at = ?, last_error = ? WHERE pk = ?",
                    [(t.status.value, t.finished_at, t.last_error, t.pk) for t in tasks],
                )
                conn.execute("UPDATE claims SET ended = 1 WHERE owner = ? AND NOT ended", (owner,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

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

    async def last_event_commit(self) -> str:
        with self._translated():
            row = self._read().execute("SELECT coalesce(max(commit_number), 0) FROM events")
            return str(row.fetchone()[0])

    async def events_after(
        self, cursor: str, limit: int, *, inclusive: bool = False
    ) -> list[tuple[str, str]]:
        first = int(cursor) if inclusive else int(cursor) + 1
        with self._translated():
            rows = self._read().execute(
                "SELECT commit_number, body FROM events WHERE commit_number >= ?"
                " ORDER BY commit_number LIMIT ?",
                (first, limit),
            )
            return [(str(number), body) for number, body in rows]

    # -- helpers ---------------------------------------------------------------------------

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreFault("the task registry is not open")
        return self._conn

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreFault("the task registry is not open")
        return self._reader

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, retried without blocking the loop while another process holds the
        write lock, for up to the lock timeout (recovery's transactions)."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if is_fault(exc) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(RETRY_S)

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


def _update_tasks(conn: sqlite3.Connection, tasks: Iterable[TaskRecord]) -> None:
    """Store each task's state, never over a cancellation. The lines of one claim end together
    and mostly have keys that follow each other, so `done` is one statement per run of
    consecutive keys with the same times (docs/performance.md: ~1% of a notify request's
    instructions)."""
    runs: list[list[Any]] = []  # [started_at, finished_at, attempts, first key, last key]
    other: list[tuple[Any, ...]] = []
    for t in tasks:
        if t.status is TaskStatus.DONE and t.pk is not None:
            run = runs[-1] if runs else None
            if (
                run
                and run[4] == t.pk - 1
                and run[0] == t.started_at
                and run[1] == t.finished_at
                and run[2] == t.attempts
            ):
                run[4] = t.pk
            else:
                runs.append([t.started_at, t.finished_at, t.attempts, t.pk, t.pk])
        else:
            other.append(
                (
                    t.status.value,
                    t.started_at,
                    t.finished_at,
                    t.last_error,
                    t.attempts,
                    t.next_attempt_at,
                    t.pk,
                )
            )
    if runs:
        conn.executemany(
            "UPDATE tasks SET status = 'done', started_at = ?, finished_at = ?, attempts = ?,"
            " next_attempt_at = NULL WHERE pk BETWEEN ? AND ?",
            runs,
        )
    if other:
        conn.executemany(
            "UPDATE tasks SET status = ?, started_at = ?, finished_at = ?, last_error = ?,"
            " attempts = ?, next_attempt_at = ? WHERE pk = ? AND status <> 'cancelled'",
            other,
        )


def _json(keys: tuple[int, ...]) -> str:
    return json.dumps(keys, separators=(",", ":"))


def _span(request: RequestRecord) -> tuple[int | None, int | None]:
    """A request's first and last task keys."""
    return request.tasks[0].pk, request.tasks[-1].pk


def _task_from_row(row: sqlite3.Row) -> TaskRecord:
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
