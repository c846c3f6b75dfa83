"""The registry in PostgreSQL: one database shared by server processes on many machines.

Each process keeps two connections. The first carries its group commits and recovery, one
transaction at a time; a group commit is sent in pipeline mode with no BEGIN, so everything up
to the pipeline's one Sync is a single implicit transaction and a single round trip. Its
session also holds an advisory lock keyed by the owner's id for as long as the process lives:
the database itself says who is alive (rule 6). The second connection serves the HTTP API's
reads. A process whose session was cut may still be running; the claim statement takes only
tasks it still owns, and drops those another process adopted meanwhile (rule 13).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import dict_row

from server.records import RequestRecord, TaskRecord, new_request_id
from server.registry.claims import Claim
from server.registry.events import Event, encode
from server.registry.owners import data_dir_id
from server.registry.postgres import queries, recovery
from server.registry.postgres import statements as sql
from server.registry.postgres.connection import LOCKS, connect, lock_key, shielded, translated
from server.registry.postgres.schema import NAMESPACE, create_or_migrate
from server.registry.store import Changes, DeadOwnerWork, StoreFault, task_from_row
from server.status import UNFINISHED, TaskStatus

PRUNE_EVERY = 500
_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))


class PostgresStore:
    """`Store` on PostgreSQL, shared by every process of every host that uses the database."""

    name = "postgresql"
    shared = True

    def __init__(
        self, url: str, data_dir: Path, *, retention: int, lock_timeout: float = 5.0
    ) -> None:
        self.url = url
        self.data_dir = data_dir
        self.retention = retention
        self.lock_timeout = lock_timeout
        self.owner = ""
        self._here = ""  # this data directory's id, in the claims made in it
        self._conn: AsyncConnection[Any] | None = None
        self._reader: AsyncConnection[Any] | None = None
        self._lock_held = False
        self._writing = asyncio.Lock()  # one transaction at a time on the commit connection
        self._reconnecting = asyncio.Lock()
        self._since_prune = 0
        self._prune_every = max(1, min(PRUNE_EVERY, retention // 10))

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, owner: str) -> None:
        self.owner = owner
        self._here = data_dir_id(self.data_dir)
        with translated("open", self.url):
            conn = await self._connected()
            await create_or_migrate(conn)
            if not self._lock_held:
                raise StoreFault(f"another live process already has owner id {owner}")
            await conn.execute(
                "INSERT INTO bgtasks.owners VALUES (%s, %s, %s, %s, %s)",
                (owner, socket.gethostname(), os.getpid(), self._here, time.time()),
            )
            self._reader = await self._new_reader()

    async def close(self) -> None:
        # The owner's row stays, so that its tasks still show its host; its lock goes with
        # its session.
        for conn in (self._conn, self._reader):
            if conn is not None:
                await conn.close()
        self._conn = self._reader = None

    async def _connected(self) -> AsyncConnection[Any]:
        """The commit connection, made again if it was lost, and this owner's lock taken on
        it if it is not yet held."""
        if self._conn is None or self._conn.broken or self._conn.closed:
            self._lock_held = False
            name = f"bgtasks {self.owner} commits"
            self._conn = await connect(self.url, name, timeout=self.lock_timeout)
        if self.owner and not self._lock_held:
            # After a cut the old session may hold it until the server notices: try again at
            # each commit (meanwhile the claim statement keeps every line safe).
            cursor = await self._conn.execute(
                "SELECT pg_try_advisory_lock(%s::int, %s::int)", (NAMESPACE, lock_key(self.owner))
            )
            row = await cursor.fetchone()
            self._lock_held = bool(row and row[0])
        return self._conn

    # -- the group commit ------------------------------------------------------------------

    async def commit(
        self, changes: Changes, claims: Sequence[Sequence[TaskRecord]], events: Sequence[Event]
    ) -> list[Claim]:
        with translated("commit", self.url):
            async with self._writing:
                conn = await self._connected()
                async with conn.pipeline():  # one implicit transaction, up to the Sync
                    inserted = await self._insert_intents(conn, changes.intents)
                    if changes.requests:
                        await self._record_requests(conn, changes.requests.values())
                    made = [await self._claim(conn, self.owner, tasks) for tasks in claims]
                    if changes.tasks:
                        rows = [
                            (
                                t.pk,
                                t.status.value,
                                t.started_at,
                                t.finished_at,
                                t.last_error,
                                t.attempts,
                                t.next_attempt_at,
                            )
                            for t in changes.tasks.values()
                        ]
                        await conn.execute(sql.UPDATE_TASKS, (*sql.columns(rows, 7), self.owner))
                    if changes.failures:
                        failures = [
                            (f.task, f.attempt, f.started_at, f.failed_at, f.error)
                            for f in changes.failures
                        ]
                        await conn.execute(sql.INSERT_FAILURES, sql.columns(failures, 5))
                    if changes.ended_claims:
                        await conn.execute(sql.END_CLAIMS, (changes.ended_claims,))
                    if events:
                        await conn.execute(
                            "INSERT INTO bgtasks.events (at, body) VALUES (%s, %s)",
                            (time.time(), encode(events)),
                        )
                    self._since_prune += len(changes.requests)
                    if self._since_prune >= self._prune_every:
                        self._since_prune = 0
                        await queries.prune(conn, self.retention)
                if inserted is not None:
                    keys = {row[0]: row[1] for row in await inserted.fetchall()}
                    for request in changes.intents:
                        for task in request.tasks:
                            task.pk = keys[task.id]
                return [
                    await self._claimed(cursor, self.owner, tasks)
                    for cursor, tasks in zip(made, claims, strict=True)
                ]

    async def _insert_intents(
        self, conn: AsyncConnection[Any], intents: list[RequestRecord]
    ) -> AsyncCursor[Any] | None:
        """The intents' rows; returns the cursor that will hold the new tasks' keys."""
        if not intents:
            return None
        chosen = [r for r in intents if r.id_from_client]
        fresh = [r for r in intents if not r.id_from_client]
        while chosen:
            # A client-chosen id an accepted request has (on any host, even at this moment)
            # is replaced by a fresh one. Reading the answer flushes the pipeline: the
            # transaction goes on.
            cursor = await conn.execute(sql.INSERT_CHOSEN_REQUESTS, sql.request_columns(chosen))
            kept = {row[0] for row in await cursor.fetchall()}
            taken = [r for r in chosen if r.id not in kept]
            for request in taken:
                request.rename(new_request_id())
            chosen = taken
        if fresh:
            await conn.execute(sql.INSERT_REQUESTS, sql.request_columns(fresh))
        tasks = [t for r in intents for t in r.tasks]
        cursor = conn.cursor()
        await cursor.execute(
            sql.INSERT_TASKS,
            (
                self.owner,
                *sql.columns(
                    [(t.id, t.request_id, t.seq, t.file, t.line, t.queued_at) for t in tasks], 6
                ),
            ),
        )
        return cursor

    @staticmethod
    async def _record_requests(
        conn: AsyncConnection[Any], requests: Iterable[RequestRecord]
    ) -> None:
        sent = [(r.id, r.response_sent_at, r.status_code) for r in requests if r.accepted]
        other = [
            (r.id, r.method, r.path, r.received_at, r.response_sent_at, r.status_code)
            for r in requests
            if not r.accepted
        ]
        if sent:
            await conn.execute(sql.MARK_SENT, sql.columns(sent, 3))
        if other:
            await conn.execute(sql.RECORD_REQUESTS, sql.columns(other, 6))

    async def _claim(
        self, conn: AsyncConnection[Any], owner: str, tasks: Sequence[TaskRecord]
    ) -> AsyncCursor[Any]:
        first = tasks[0]
        cursor = conn.cursor()
        await cursor.execute(
            sql.CLAIM,
            {
                "keys": [task.pk for task in tasks],
                "owner": owner,
                "here": self._here,
                "file": first.file,
                "inode": first.inode or 0,
                "start": first.offset or 0,
            },
        )
        return cursor

    @staticmethod
    async def _claimed(cursor: AsyncCursor[Any], owner: str, tasks: Sequence[TaskRecord]) -> Claim:
        row = await cursor.fetchone()
        assert row is not None  # the statement always inserts its claims row
        first = tasks[0]
        return Claim(
            int(row[0]), owner, first.file, first.inode or 0, first.offset or 0, tuple(row[1])
        )

    # -- recovery --------------------------------------------------------------------------

    async def is_alive(self, owner: str) -> bool:
        row = await self._one(LOCKS + " AND objid = %s::oid", (NAMESPACE, int(owner, 16)))
        return bool(row and row["n"])

    async def live_owners(self) -> int:
        row = await self._one(LOCKS, (NAMESPACE,))
        return int(row["n"]) if row else 0

    async def owners_with_unfinished_tasks(self) -> set[str]:
        with translated("read", self.url):
            cursor = await shielded(
                (await self._read()).execute(
                    f"SELECT DISTINCT owner FROM bgtasks.tasks WHERE status IN ({_UNFINISHED})"
                )
            )
            return {row["owner"] for row in await cursor.fetchall()}

    async def dead_owner_work(self, owner: str) -> DeadOwnerWork:
        with translated("read", self.url):
            return await shielded(recovery.dead_owner_work(await self._read(), owner, self._here))

    async def earliest_later_start(self, claim: Claim) -> int | None:
        row = await self._one(
            "SELECT min(start) AS start FROM bgtasks.claims WHERE data_dir = %s"
            " AND file = %s AND inode = %s AND claim > %s",
            (self._here, claim.file, claim.inode, claim.number),
        )
        return None if row is None or row["start"] is None else int(row["start"])

    async def claim_for(self, owner: str, tasks: Sequence[TaskRecord]) -> Claim:
        async with self._transaction() as conn:
            # The dead owner's tasks lose their old claim: recovery claims them anew.
            await conn.execute(
                "UPDATE bgtasks.tasks SET claim = NULL WHERE pk = ANY(%s::bigint[]) AND owner = %s",
                ([task.pk for task in tasks], owner),
            )
            return await self._claimed(await self._claim(conn, owner, tasks), owner, tasks)

    async def adopt(self, tasks: Sequence[TaskRecord], dead: str, owner: str) -> list[TaskRecord]:
        by_key = {task.pk: task for task in tasks}
        async with self._transaction() as conn:
            # A retrying task keeps its attempts and when its next one is due.
            cursor = await conn.execute(
                "UPDATE bgtasks.tasks SET owner = %s, started_at = NULL, status = CASE status"
                " WHEN 'retrying' THEN 'retrying' ELSE 'queued' END"
                f" WHERE pk = ANY(%s::bigint[]) AND owner = %s AND status IN ({_UNFINISHED})"
                " AND claim IS NULL RETURNING pk",
                (owner, list(by_key), dead),
            )
            moved = [by_key[row[0]] for row in await cursor.fetchall()]
        for task in moved:
            if task.status is not TaskStatus.RETRYING:
                task.status = TaskStatus.QUEUED
            task.started_at, task.adopted = None, True
        return sorted(moved, key=lambda task: task.pk or 0)

    # -- operators ------------------------------------------------------------------------

    async def cancel(self, task_id: str, at: float) -> bool:
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "UPDATE bgtasks.tasks SET status = 'cancelled', finished_at = %s,"
                f" next_attempt_at = NULL WHERE id = %s AND status IN ({_UNFINISHED})"
                " AND claim IS NULL",
                (at, task_id),
            )
            return cursor.rowcount > 0

    async def requeue(self, task_id: str, owner: str) -> TaskRecord | None:
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "UPDATE bgtasks.tasks SET status = 'queued', owner = %s, attempts = 0,"
                " next_attempt_at = NULL, started_at = NULL, finished_at = NULL, claim = NULL"
                " WHERE id = %s AND status = 'failed' RETURNING *",
                (owner, task_id),
            )
            row = await cursor.fetchone()
        if row is None:
            return None
        names = [column.name for column in cursor.description or ()]
        return task_from_row(dict(zip(names, row, strict=True)))

    async def end_recovery(
        self, owner: str, tasks: Sequence[TaskRecord], *, everywhere: bool = False
    ) -> None:
        async with self._transaction() as conn:
            await recovery.end_recovery(conn, owner, None if everywhere else self._here, tasks)

    async def lost_lines(self, owner: str) -> tuple[dict[str, Any] | None, list[TaskRecord]]:
        with translated("read", self.url):
            return await shielded(recovery.lost_lines(await self._read(), owner, self._here))

    # -- reads -----------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        with translated("read", self.url):
            return await shielded(queries.get_task(await self._read(), task_id))

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        with translated("read", self.url):
            return await shielded(queries.get_request(await self._read(), request_id))

    async def list_tasks(self, status: TaskStatus | None, limit: int) -> list[dict[str, Any]]:
        with translated("read", self.url):
            return await shielded(queries.list_tasks(await self._read(), status, limit))

    async def count_unfinished(self) -> int:
        with translated("read", self.url):
            return await shielded(queries.count_unfinished(await self._read()))

    event_cursor = r"[0-9]{1,19}\.[0-9]{1,18}"  # a transaction's id, its row's id

    async def listen(self, until: float) -> None:
        async with self._transaction() as conn:
            await queries.listen(conn, until)

    async def listened_until(self) -> float:
        with translated("read", self.url):
            return await shielded(queries.listened_until(await self._read()))

    async def last_event_commit(self) -> str:
        with translated("read", self.url):
            return await shielded(queries.last_event_commit(await self._read()))

    async def events_after(
        self, cursor: str, limit: int, *, inclusive: bool = False
    ) -> list[tuple[str, str]]:
        with translated("read", self.url):
            reader = await self._read()
            return await shielded(queries.events_after(reader, cursor, limit, inclusive=inclusive))

    # -- helpers ---------------------------------------------------------------------------

    async def _read(self) -> AsyncConnection[Any]:
        """The read connection, made again if it was lost (a restarted server, a cut)."""
        if self._reader is None:
            raise StoreFault("the task registry is not open")
        if self._reader.broken or self._reader.closed:
            async with self._reconnecting:
                if self._reader.broken or self._reader.closed:
                    self._reader = await self._new_reader()
        return self._reader

    async def _one(self, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
        """The first row of a read on the read connection."""
        with translated("read", self.url):
            cursor = await shielded((await self._read()).execute(sql, params))
            row: dict[str, Any] | None = await cursor.fetchone()
            return row

    async def _new_reader(self) -> AsyncConnection[Any]:
        name = f"bgtasks {self.owner} reads"
        return await connect(self.url, name, timeout=self.lock_timeout, row_factory=dict_row)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection[Any]]:
        with translated("recovery", self.url):
            async with self._writing:
                conn = await self._connected()
                async with conn.transaction():
                    yield conn
