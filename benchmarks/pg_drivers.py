"""Measure psycopg 3 (async, pipeline mode) against asyncpg on the registry's group commit (#15).

Run from the repository root, with both drivers in the venv (the `bench` extra; `dev` has it):

    .venv/bin/pip install -e '.[bench]'  # psycopg, asyncpg, and asyncpg-stubs for mypy
    .venv/bin/python benchmarks/pg_drivers.py            # full run: 5 repeats, about 10 minutes
    .venv/bin/python benchmarks/pg_drivers.py --quick    # small counts, about a minute

It creates its own database, `bgtasks_bench_<random hex>`, on the PostgreSQL server at
127.0.0.1:5432 (user postgres, trust auth; see --host, --port, --user) and drops it at the end,
after ending its sessions, also on a failure, Ctrl-C or SIGTERM. No other database is touched.

The workload is what one `bgtasks serve` process's group commit does under load. A notify request
has two tasks and three commits: A, its intents (the request row and its two task rows, whose
keys the process needs back); B, the claim of its lines in log.txt (a fence, `UPDATE ... WHERE
owner = me AND claim IS NULL RETURNING pk`, and one claims row listing the surviving keys in
order, its number from a sequence); C, its ends (the response's time and status, the tasks done,
the claim ended). Batch k carries, in one transaction, the A-part of group k of requests, the
B-part of group k-1 and the C-part of group k-2; each group has 1, 4, 16 or 64 requests. One
connection is driven as a loop: a batch starts when the previous commit returned.

Each driver does one batch in several ways (`VARIANTS`, each class's `how` says what it sends),
all with the same SQL; the table gives each way's batches and requests per second, median and
p99 batch latency, client CPU time per request, and the round trips of one batch as counted by a
relay (`FlightCounter`). Each measurement starts from a registry holding its default retention
of finished requests, analyzed (see PREFILL for why).
Measurements are bounded in batches and seconds, run in turns (every way of every driver, then
again, in a rotated order) and reported as medians over the repeats.

Also measured, in microseconds: one round trip (`SELECT 1`), connecting (with the keepalive
settings the store will use), connecting and taking the owner's session-level advisory lock, and
telling whether another owner is alive, by trying its lock from another session or by reading
`pg_locks`.

Nothing is trusted blindly: before measuring, each way must pass a fence check (a task another
owner took and one already claimed are left out of a claim); after each measurement the
database must hold exactly what the client was told (every key, every claim, every end); each
way's handling of a failing statement inside a batch is probed (the first statement, then a
later one) and must leave nothing of that batch behind and the connection usable. A failed
check stops the run. Results: docs/pg-drivers.md.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import platform
import re
import secrets
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, TypeVar

import asyncpg
import psycopg
from psycopg import sql
from psycopg.types.array import ListBinaryDumper
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

HERE = Path(__file__).resolve().parent
DB_PREFIX = "bgtasks_bench_"
DB_NAME = re.compile(r"bgtasks_bench_[0-9a-f]{12}")
SIZES = (1, 4, 16, 64)
ME, OTHER = 1, 2  # owner keys: this process's, and another process's (the fence check)
DATA_DIR, LOG_FILE, INODE = "/srv/bgtasks", "log.txt", 4242
WARM_UP_BATCHES = 20
COUNTED_BATCHES = 10  # steady-state batches sent through the relay to count round trips
# What the store will set on its sessions (see the notes on liveness), so connects cost the same.
KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}
CONNECT_TRIES = 30
T = TypeVar("T")

SCHEMA = """
CREATE TABLE requests (id text PRIMARY KEY, method text, path text,
    received_at double precision, response_sent_at double precision, status_code int);
CREATE TABLE tasks (pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id text UNIQUE,
    request_id text, seq int, owner bigint, file text, line text, status text,
    queued_at double precision, started_at double precision, finished_at double precision,
    error text, claim bigint);
CREATE TABLE claims (claim bigint PRIMARY KEY, owner bigint, data_dir text, file text,
    inode bigint, start bigint, tasks bigint[], ended boolean);
CREATE SEQUENCE claim_numbers;
"""
RESET = "TRUNCATE requests, tasks, claims RESTART IDENTITY; ALTER SEQUENCE claim_numbers RESTART"
# A measurement starts from the registry a server keeps: its default retention of finished
# requests (an older owner's, PAST), analyzed. On empty tables a prepared statement's generic
# plan, made after its fifth run, scans whole tables for the unnest joins: each batch gets
# slower as the tables grow (7 to 20 ms within 200 batches of 64).
RETENTION, PAST, OLD = 10_000, 0, "old-"
AN_HOUR_AGO = "(SELECT extract(epoch FROM now())::float8 - 3600) AS past(t)"
PREFILL = f"""
INSERT INTO requests
    SELECT '{OLD}' || i, 'POST', '/send-notification/u' || i || '@example.com', t, t, 200
    FROM generate_series(1, {RETENTION}) AS i, {AN_HOUR_AGO};
INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at, started_at,
        finished_at, claim)
    SELECT '{OLD}' || i || '-' || seq, '{OLD}' || i, seq, {PAST}, 'log.txt',
        'message to u' || i || E'@example.com\\n', 'done', t, t, t, i
    FROM generate_series(1, {RETENTION}) AS i, generate_series(1, 2) AS seq, {AN_HOUR_AGO}
    ORDER BY i, seq;
INSERT INTO claims
    SELECT claim, {PAST}, '/srv/bgtasks', 'log.txt', 4242, 0, array_agg(pk ORDER BY pk), true
    FROM tasks GROUP BY claim;
SELECT setval('claim_numbers', {RETENTION});
"""
# The COPY ways copy the task rows here first, since COPY cannot return their keys.
STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS tasks_in (id text, request_id text, seq int, file text,"
    " line text, queued_at double precision)"
)

# -- SQL ---------------------------------------------------------------------------------------
# Each change is written once, with named placeholders, and numbered for the statement it goes
# in: alone (one statement per change) or all together as one statement of data-modifying CTEs.
REQUEST_ARGS = ("request_ids", "methods", "paths", "received")
TASK_ARGS = ("task_ids", "task_requests", "seqs", "files", "lines", "queued")
CLAIM_ARGS = ("keys", "data_dir", "file", "inode", "start")
SENT_ARGS = ("sent_ids", "sent_at", "status_codes")
DONE_ARGS = ("done_keys", "started", "finished")
ENDED_ARGS = ("ended",)

INSERT_REQUESTS_PART = """INSERT INTO requests (id, method, path, received_at)
    SELECT * FROM unnest({request_ids}::text[], {methods}::text[], {paths}::text[],
        {received}::float8[])"""
INSERT_TASKS_PART = """INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at)
    SELECT t.id, t.request_id, t.seq, {owner}::bigint, t.file, t.line, 'queued', t.queued_at
    FROM unnest({task_ids}::text[], {task_requests}::text[], {seqs}::int[], {files}::text[],
        {lines}::text[], {queued}::float8[]) AS t(id, request_id, seq, file, line, queued_at)
    RETURNING id, pk"""
# A claim's number is taken only when it has keys; its row is written only if some survive.
CLAIM_CTES = """number AS (
    SELECT nextval('claim_numbers') AS n WHERE cardinality({keys}::bigint[]) > 0
), fenced AS (
    UPDATE tasks SET claim = number.n, status = 'running' FROM number
    WHERE tasks.pk = ANY({keys}::bigint[]) AND tasks.owner = {owner}::bigint
        AND tasks.claim IS NULL
    RETURNING tasks.pk
)"""
INSERT_CLAIM_PART = """INSERT INTO claims (claim, owner, data_dir, file, inode, start, tasks, ended)
    SELECT number.n, {owner}::bigint, {data_dir}::text, {file}::text, {inode}::bigint,
        {start}::bigint, ARRAY(
            SELECT u.key FROM unnest({keys}::bigint[]) WITH ORDINALITY AS u(key, i)
            WHERE u.key IN (SELECT pk FROM fenced) ORDER BY u.i
        ), false
    FROM number WHERE EXISTS (SELECT FROM fenced)
    RETURNING claim, tasks"""
MARK_SENT_PART = """UPDATE requests SET response_sent_at = s.sent_at, status_code = s.status_code
    FROM unnest({sent_ids}::text[], {sent_at}::float8[], {status_codes}::int[])
        AS s(id, sent_at, status_code)
    WHERE requests.id = s.id"""
MARK_DONE_PART = """UPDATE tasks SET status = 'done', started_at = d.started_at,
        finished_at = d.finished_at
    FROM unnest({done_keys}::bigint[], {started}::float8[], {finished}::float8[])
        AS d(pk, started_at, finished_at)
    WHERE tasks.pk = d.pk"""
END_CLAIMS_PART = "UPDATE claims SET ended = true WHERE claim = ANY({ended}::bigint[])"
MOVE_TASKS_PART = """WITH moved AS (DELETE FROM tasks_in RETURNING *)
    INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at)
    SELECT id, request_id, seq, {owner}::bigint, file, line, 'queued', queued_at FROM moved
    RETURNING id, pk"""


def numbered(template: str, names: Sequence[str]) -> str:
    """The template with each `{name}` replaced by its position in `names` as `$n`."""
    return template.format_map({name: f"${i}" for i, name in enumerate(names, start=1)})


INSERT_REQUESTS = numbered(INSERT_REQUESTS_PART, REQUEST_ARGS)
INSERT_TASKS = numbered(INSERT_TASKS_PART, ("owner", *TASK_ARGS))
FENCE_AND_CLAIM = numbered(f"WITH {CLAIM_CTES}\n{INSERT_CLAIM_PART}", ("owner", *CLAIM_ARGS))
MARK_SENT = numbered(MARK_SENT_PART, SENT_ARGS)
MARK_DONE = numbered(MARK_DONE_PART, DONE_ARGS)
END_CLAIMS = numbered(END_CLAIMS_PART, ENDED_ARGS)
MOVE_TASKS = numbered(MOVE_TASKS_PART, ("owner",))
# The same changes as three statements, one per commit the issue names (A, B, C); within each
# one the CTEs change different tables, and each statement sees the ones before it.
INTENTS = numbered(
    f"WITH new_requests AS ({INSERT_REQUESTS_PART})\n{INSERT_TASKS_PART}",
    ("owner", *REQUEST_ARGS, *TASK_ARGS),
)
ENDS = numbered(
    f"WITH sent AS ({MARK_SENT_PART}), done AS ({MARK_DONE_PART})\n{END_CLAIMS_PART}",
    (*SENT_ARGS, *DONE_ARGS, *ENDED_ARGS),
)
SINGLE_ARGS = ("owner", *REQUEST_ARGS, *TASK_ARGS, *CLAIM_ARGS, *SENT_ARGS, *DONE_ARGS, "ended")
SINGLE = numbered(
    f"""WITH new_requests AS ({INSERT_REQUESTS_PART}
), new_tasks AS ({INSERT_TASKS_PART}
), {CLAIM_CTES}, new_claim AS ({INSERT_CLAIM_PART}
), sent AS ({MARK_SENT_PART}
), done AS ({MARK_DONE_PART}
), ending AS ({END_CLAIMS_PART})
SELECT t.ids, t.pks, c.claim, c.tasks
FROM (SELECT array_agg(id) AS ids, array_agg(pk) AS pks FROM new_tasks) AS t
LEFT JOIN new_claim AS c ON true""",
    SINGLE_ARGS,
)
# The same changes a row at a time, for executemany.
INSERT_REQUEST_ROW = "INSERT INTO requests (id, method, path, received_at) VALUES ($1, $2, $3, $4)"
INSERT_TASK_ROW = (
    "INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7) RETURNING pk"
)
MARK_SENT_ROW = "UPDATE requests SET response_sent_at = $2, status_code = $3 WHERE id = $1"
MARK_DONE_ROW = "UPDATE tasks SET status = 'done', started_at = $2, finished_at = $3 WHERE pk = $1"
REQUEST_COLUMNS = ["id", "method", "path", "received_at"]
STAGED_COLUMNS = ["id", "request_id", "seq", "file", "line", "queued_at"]
COPY_REQUESTS = "COPY requests (id, method, path, received_at) FROM STDIN (FORMAT BINARY)"
COPY_TASKS_IN = "COPY tasks_in (id, request_id, seq, file, line, queued_at) FROM STDIN"
COPY_TASKS_IN += " (FORMAT BINARY)"

# Liveness: an owner is alive while its session holds the advisory lock keyed by its number.
TAKE_LOCK = "SELECT pg_try_advisory_lock($1)"
# Took it: the owner is gone; give it back at once (THEN runs only when WHEN was true).
ALIVE_BY_TRY_LOCK = (
    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN NOT pg_advisory_unlock($1) ELSE true END"
)
# pg_locks shows a bigint key as its high half in classid, its low half in objid, objsubid 1.
ALIVE_BY_PG_LOCKS = """SELECT EXISTS (SELECT FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 1
        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND classid = (($1::bigint >> 32) & 4294967295)::oid
        AND objid = ($1::bigint & 4294967295)::oid)"""


class BenchError(RuntimeError):
    """A check failed: the numbers would not mean what they say."""


# -- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    request_id: str
    seq: int
    file: str
    line: str
    queued_at: float
    size: int  # bytes of the line


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    method: str
    path: str
    received_at: float
    tasks: tuple[Task, ...]


@dataclass(frozen=True, slots=True)
class Claim:
    keys: list[int]  # in the order their lines follow each other from `start`
    data_dir: str
    file: str
    inode: int
    start: int


@dataclass(frozen=True, slots=True)
class Ends:
    sent: list[tuple[str, float, int]] = field(default_factory=list)  # id, sent at, status
    done: list[tuple[int, float, float]] = field(default_factory=list)  # key, started, finished
    claims: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Batch:
    """What one group commit carries: intents (A), a claim (B) and ends (C)."""

    intents: list[Request]
    claim: Claim | None
    ends: Ends


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the commit tells the process: each new task's key, the claim and its survivors."""

    pks: dict[str, int]
    claim: int | None
    claimed: list[int]


def make_requests(count: int) -> list[Request]:
    """`count` notify requests, each with the two lines `/send-notification/` appends."""
    now = time.time()
    requests = []
    for _ in range(count):
        rid = secrets.token_hex(16)
        email = f"u{rid[:10]}@example.com"
        lines = (f"message to {email}\n", f"found query: q{rid[10:16]}\n")
        tasks = tuple(
            Task(f"{rid}-{seq}", rid, seq, LOG_FILE, line, now, len(line.encode()))
            for seq, line in enumerate(lines, start=1)
        )
        requests.append(Request(rid, "POST", f"/send-notification/{email}", now, tasks))
    return requests


def request_rows(requests: Iterable[Request]) -> list[tuple[Any, ...]]:
    return [(r.id, r.method, r.path, r.received_at) for r in requests]


def task_rows(requests: Iterable[Request], owner: int | None) -> list[tuple[Any, ...]]:
    """Rows of INSERT_TASK_ROW (with the owner) or of tasks_in (without)."""
    if owner is None:
        return [
            (t.id, t.request_id, t.seq, t.file, t.line, t.queued_at)
            for r in requests
            for t in r.tasks
        ]
    return [
        (t.id, t.request_id, t.seq, owner, t.file, t.line, t.queued_at)
        for r in requests
        for t in r.tasks
    ]


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    """Rows as `width` column lists, the arguments of an unnest."""
    if not rows:
        return tuple([] for _ in range(width))
    return tuple(list(column) for column in zip(*rows, strict=True))


def keys_of(rows: Iterable[Sequence[Any] | asyncpg.Record]) -> dict[str, int]:
    """Task id to key, from the (id, pk) rows an insert returned."""
    return {row[0]: row[1] for row in rows}


def claim_args(claim: Claim | None) -> tuple[Any, ...]:
    if claim is None:
        return [], None, None, None, None
    return claim.keys, claim.data_dir, claim.file, claim.inode, claim.start


def intents_args(batch: Batch) -> tuple[Any, ...]:
    """The arguments of INTENTS."""
    return (
        ME,
        *columns(request_rows(batch.intents), len(REQUEST_ARGS)),
        *columns(task_rows(batch.intents, None), len(TASK_ARGS)),
    )


def ends_args(ends: Ends) -> tuple[Any, ...]:
    """The arguments of ENDS."""
    return (
        *columns(ends.sent, len(SENT_ARGS)),
        *columns(ends.done, len(DONE_ARGS)),
        ends.claims,
    )


def has_ends(ends: Ends) -> bool:
    return bool(ends.sent or ends.done or ends.claims)


def single_args(batch: Batch) -> tuple[Any, ...]:
    """The arguments of SINGLE, in SINGLE_ARGS order."""
    return (
        ME,
        *columns(request_rows(batch.intents), len(REQUEST_ARGS)),
        *columns(task_rows(batch.intents, None), len(TASK_ARGS)),
        *claim_args(batch.claim),
        *columns(batch.ends.sent, len(SENT_ARGS)),
        *columns(batch.ends.done, len(DONE_ARGS)),
        batch.ends.claims,
    )


def outcome(batch: Batch, pks: dict[str, int], claim: tuple[int, list[int]] | None) -> Outcome:
    """The commit's answer, checked: a key for every new task, and every key claimed (nobody
    else owns or has claimed these tasks, so the fence leaves none out)."""
    wanted = {t.id for r in batch.intents for t in r.tasks}
    if set(pks) != wanted:
        raise BenchError(f"{len(pks)} task keys came back for {len(wanted)} new tasks")
    return Outcome(pks, *claim) if claim else Outcome(pks, None, [])


# -- the ways of doing one batch ---------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str


class Variant(abc.ABC):
    """One driver's way of committing a batch, on a connection of its own."""

    driver: ClassVar[str]
    name: ClassVar[str]
    how: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    async def open(cls, server: Server, dbname: str) -> Variant:
        """Connect to the benchmark database."""

    @abc.abstractmethod
    async def commit(self, batch: Batch) -> Outcome:
        """Commit the batch in one transaction and return what the process needs back."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection."""


PgConn = psycopg.AsyncConnection[tuple[Any, ...]]
PgCursor = psycopg.AsyncCursor[tuple[Any, ...]]


async def psycopg_connect(server: Server, dbname: str) -> PgConn:
    """An autocommit connection whose cursors take `$n` placeholders (the SQL above)."""
    conn = await psycopg.AsyncConnection.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        dbname=dbname,
        sslmode="disable",
        options=" ".join(f"-c {key}={value}" for key, value in KEEPALIVES.items()),
        autocommit=True,
        cursor_factory=psycopg.AsyncRawCursor,
    )
    # Every int as a bigint: a statement's parameter types, so its prepared plan, stay the same
    # as keys grow (by default a small int is sent as int2, a larger one as int4 or int8).
    conn.adapters.register_dumper(int, Int8Dumper)
    conn.adapters.register_dumper(int, Int8BinaryDumper)
    # Lists as binary arrays: the default text form quotes each element in Python with a
    # regular expression (about half of psycopg's CPU time per request on 64-request batches).
    conn.adapters.register_dumper(list, ListBinaryDumper)
    return conn


async def asyncpg_connect(server: Server, dbname: str) -> asyncpg.Connection:
    """A connection with the same session settings as `psycopg_connect`'s."""
    return await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        database=dbname,
        ssl=False,
        server_settings=KEEPALIVES,
    )


async def patiently(connect: Callable[[], Awaitable[T]]) -> T:
    """Connect, waiting a little while the server has no free connection: it is shared with
    other programs, whose tests can take every one of them for a moment."""
    for attempt in range(1, CONNECT_TRIES + 1):
        try:
            return await connect()
        except (psycopg.OperationalError, asyncpg.TooManyConnectionsError) as exc:
            if attempt == CONNECT_TRIES or "too many clients" not in str(exc):
                raise
            progress(f"the server is full; connecting again in 1 s ({attempt}/{CONNECT_TRIES})")
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


class PsycopgVariant(Variant):
    driver = "psycopg"

    def __init__(self, conn: PgConn) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, server: Server, dbname: str) -> Variant:
        conn = await patiently(partial(psycopg_connect, server, dbname))
        await conn.execute(STAGING)
        return cls(conn)

    async def close(self) -> None:
        await self.conn.close()


class PsycopgExecutemany(PsycopgVariant):
    name = "executemany"
    how = (
        "one pipeline, one Sync (an implicit transaction): executemany of each row statement"
        " (the task rows' with returning=True, which flushes and waits for their results),"
        " the fence and claim"
    )

    async def commit(self, batch: Batch) -> Outcome:
        conn, tasks, claimed = self.conn, self.conn.cursor(), self.conn.cursor()
        async with conn.pipeline():
            if batch.intents:
                await conn.cursor().executemany(INSERT_REQUEST_ROW, request_rows(batch.intents))
                rows = task_rows(batch.intents, ME)
                await tasks.executemany(INSERT_TASK_ROW, rows, returning=True)
            if batch.claim:
                await claimed.execute(FENCE_AND_CLAIM, (ME, *claim_args(batch.claim)))
            if batch.ends.sent:
                await conn.cursor().executemany(MARK_SENT_ROW, batch.ends.sent)
            if batch.ends.done:
                await conn.cursor().executemany(MARK_DONE_ROW, batch.ends.done)
            if batch.ends.claims:
                await conn.execute(END_CLAIMS, (batch.ends.claims,))
        pks: dict[str, int] = {}
        if batch.intents:
            ids = iter([t.id for r in batch.intents for t in r.tasks])
            async for result in tasks.results():
                pks[next(ids)] = (await result.fetchall())[0][0]
        return outcome(batch, pks, await _psycopg_claim(claimed, batch))


async def _psycopg_claim(cursor: PgCursor, batch: Batch) -> tuple[int, list[int]] | None:
    if batch.claim is None:
        return None
    row = await cursor.fetchone()
    return (row[0], row[1]) if row else None


class PsycopgUnnest(PsycopgVariant):
    name = "unnest"
    how = (
        "one pipeline, one Sync (an implicit transaction): one statement per change, arrays"
        " through unnest"
    )

    async def commit(self, batch: Batch) -> Outcome:
        # Autocommit and no BEGIN: PostgreSQL runs everything up to the pipeline's one Sync
        # as one transaction, committed at the Sync or rolled back if a statement failed.
        async with self.conn.pipeline():
            tasks, claimed = await _psycopg_unnest(self.conn, batch)
        pks = keys_of(await tasks.fetchall()) if batch.intents else {}
        return outcome(batch, pks, await _psycopg_claim(claimed, batch))


class PsycopgParts(PsycopgVariant):
    name = "A, B, C statements"
    how = (
        "one pipeline, one Sync (an implicit transaction): three statements, the intents,"
        " the fence and claim, the ends (each a few CTEs over different tables)"
    )

    async def commit(self, batch: Batch) -> Outcome:
        conn, tasks, claimed = self.conn, self.conn.cursor(), self.conn.cursor()
        async with conn.pipeline():
            if batch.intents:
                await tasks.execute(INTENTS, intents_args(batch))
            if batch.claim:
                await claimed.execute(FENCE_AND_CLAIM, (ME, *claim_args(batch.claim)))
            if has_ends(batch.ends):
                await conn.execute(ENDS, ends_args(batch.ends))
        pks = keys_of(await tasks.fetchall()) if batch.intents else {}
        return outcome(batch, pks, await _psycopg_claim(claimed, batch))


class PsycopgUnnestTransaction(PsycopgVariant):
    name = "unnest, transaction()"
    how = (
        "the same statements in `async with conn.pipeline(), conn.transaction()`: psycopg"
        " syncs after BEGIN, before COMMIT (to raise an error before committing) and after it"
    )

    async def commit(self, batch: Batch) -> Outcome:
        async with self.conn.pipeline(), self.conn.transaction():
            tasks, claimed = await _psycopg_unnest(self.conn, batch)
        pks = keys_of(await tasks.fetchall()) if batch.intents else {}
        return outcome(batch, pks, await _psycopg_claim(claimed, batch))


async def _psycopg_unnest(conn: PgConn, batch: Batch) -> tuple[PgCursor, PgCursor]:
    """Queue the batch's statements; return the cursors whose results the caller reads once
    the pipeline has synced: the new tasks' keys and the claim."""
    tasks, claimed = conn.cursor(), conn.cursor()
    if batch.intents:
        rows = request_rows(batch.intents)
        await conn.execute(INSERT_REQUESTS, columns(rows, len(REQUEST_ARGS)))
        staged = columns(task_rows(batch.intents, None), len(TASK_ARGS))
        await tasks.execute(INSERT_TASKS, (ME, *staged))
    if batch.claim:
        await claimed.execute(FENCE_AND_CLAIM, (ME, *claim_args(batch.claim)))
    await _psycopg_ends(conn, batch.ends)
    return tasks, claimed


async def _psycopg_ends(conn: PgConn, ends: Ends) -> None:
    if ends.sent:
        await conn.execute(MARK_SENT, columns(ends.sent, len(SENT_ARGS)))
    if ends.done:
        await conn.execute(MARK_DONE, columns(ends.done, len(DONE_ARGS)))
    if ends.claims:
        await conn.execute(END_CLAIMS, (ends.claims,))


class PsycopgCopy(PsycopgVariant):
    name = "copy"
    how = (
        "BEGIN; binary COPY of the request rows and of the task rows into a temporary table"
        " (COPY cannot run in a pipeline); then a pipeline: move the task rows (RETURNING"
        " their keys), the claim, the ends (unnest); COMMIT"
    )

    async def commit(self, batch: Batch) -> Outcome:
        conn, tasks, claimed = self.conn, self.conn.cursor(), self.conn.cursor()
        async with conn.transaction():
            if batch.intents:
                cursor = conn.cursor()
                async with cursor.copy(COPY_REQUESTS) as copy:
                    copy.set_types(["text", "text", "text", "float8"])
                    for row in request_rows(batch.intents):
                        await copy.write_row(row)
                async with cursor.copy(COPY_TASKS_IN) as copy:
                    copy.set_types(["text", "text", "int4", "text", "text", "float8"])
                    for row in task_rows(batch.intents, None):
                        await copy.write_row(row)
            async with conn.pipeline():
                if batch.intents:
                    await tasks.execute(MOVE_TASKS, (ME,))
                if batch.claim:
                    await claimed.execute(FENCE_AND_CLAIM, (ME, *claim_args(batch.claim)))
                await _psycopg_ends(conn, batch.ends)
        pks = keys_of(await tasks.fetchall()) if batch.intents else {}
        return outcome(batch, pks, await _psycopg_claim(claimed, batch))


class PsycopgSingle(PsycopgVariant):
    name = "one statement"
    how = "one statement of data-modifying CTEs (its own transaction); no pipeline needed"

    async def commit(self, batch: Batch) -> Outcome:
        cursor = await self.conn.execute(SINGLE, single_args(batch))
        return _single_outcome(batch, await cursor.fetchone())


def _single_outcome(batch: Batch, row: Sequence[Any] | None) -> Outcome:
    if row is None:
        raise BenchError("the single statement returned no row")
    ids, pks, claim, keys = row
    found = dict(zip(ids, pks, strict=True)) if ids else {}
    return outcome(batch, found, (claim, keys) if claim is not None else None)


class AsyncpgVariant(Variant):
    driver = "asyncpg"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, server: Server, dbname: str) -> Variant:
        conn = await patiently(partial(asyncpg_connect, server, dbname))
        await conn.execute(STAGING)
        return cls(conn)

    async def close(self) -> None:
        await self.conn.close()


def _asyncpg_claim(row: asyncpg.Record | None) -> tuple[int, list[int]] | None:
    return (row["claim"], row["tasks"]) if row else None


class AsyncpgExecutemany(AsyncpgVariant):
    name = "executemany"
    how = (
        "BEGIN; executemany of each row statement (fetchmany for the task rows, to get their"
        " keys); the fence and claim; COMMIT: one round trip each"
    )

    async def commit(self, batch: Batch) -> Outcome:
        conn, claim = self.conn, None
        pks: dict[str, int] = {}
        async with conn.transaction():
            if batch.intents:
                await conn.executemany(INSERT_REQUEST_ROW, request_rows(batch.intents))
                rows = await conn.fetchmany(INSERT_TASK_ROW, task_rows(batch.intents, ME))
                tasks = [t for r in batch.intents for t in r.tasks]
                pks = {t.id: row[0] for t, row in zip(tasks, rows, strict=True)}
            if batch.claim:
                claim = await conn.fetchrow(FENCE_AND_CLAIM, ME, *claim_args(batch.claim))
            if batch.ends.sent:
                await conn.executemany(MARK_SENT_ROW, batch.ends.sent)
            if batch.ends.done:
                await conn.executemany(MARK_DONE_ROW, batch.ends.done)
            if batch.ends.claims:
                await conn.execute(END_CLAIMS, batch.ends.claims)
        return outcome(batch, pks, _asyncpg_claim(claim))


async def _asyncpg_ends(conn: asyncpg.Connection, ends: Ends) -> None:
    if ends.sent:
        await conn.execute(MARK_SENT, *columns(ends.sent, len(SENT_ARGS)))
    if ends.done:
        await conn.execute(MARK_DONE, *columns(ends.done, len(DONE_ARGS)))
    if ends.claims:
        await conn.execute(END_CLAIMS, ends.claims)


class AsyncpgUnnest(AsyncpgVariant):
    name = "unnest"
    how = "BEGIN; one statement per change (arrays through unnest); COMMIT: a round trip each"

    async def commit(self, batch: Batch) -> Outcome:
        conn, claim = self.conn, None
        pks: dict[str, int] = {}
        async with conn.transaction():
            if batch.intents:
                rows = request_rows(batch.intents)
                await conn.execute(INSERT_REQUESTS, *columns(rows, len(REQUEST_ARGS)))
                staged = columns(task_rows(batch.intents, None), len(TASK_ARGS))
                pks = keys_of(await conn.fetch(INSERT_TASKS, ME, *staged))
            if batch.claim:
                claim = await conn.fetchrow(FENCE_AND_CLAIM, ME, *claim_args(batch.claim))
            await _asyncpg_ends(conn, batch.ends)
        return outcome(batch, pks, _asyncpg_claim(claim))


class AsyncpgParts(AsyncpgVariant):
    name = "A, B, C statements"
    how = "BEGIN; the intents; the fence and claim; the ends; COMMIT: a round trip each"

    async def commit(self, batch: Batch) -> Outcome:
        conn, claim = self.conn, None
        pks: dict[str, int] = {}
        async with conn.transaction():
            if batch.intents:
                pks = keys_of(await conn.fetch(INTENTS, *intents_args(batch)))
            if batch.claim:
                claim = await conn.fetchrow(FENCE_AND_CLAIM, ME, *claim_args(batch.claim))
            if has_ends(batch.ends):
                await conn.execute(ENDS, *ends_args(batch.ends))
        return outcome(batch, pks, _asyncpg_claim(claim))


class AsyncpgCopy(AsyncpgVariant):
    name = "copy"
    how = (
        "BEGIN; copy_records_to_table of the request rows and of the task rows into a"
        " temporary table; move the task rows (RETURNING their keys); the claim; the ends"
        " (unnest); COMMIT"
    )

    async def commit(self, batch: Batch) -> Outcome:
        conn, claim = self.conn, None
        pks: dict[str, int] = {}
        async with conn.transaction():
            if batch.intents:
                await conn.copy_records_to_table(
                    "requests", records=request_rows(batch.intents), columns=REQUEST_COLUMNS
                )
                await conn.copy_records_to_table(
                    "tasks_in", records=task_rows(batch.intents, None), columns=STAGED_COLUMNS
                )
                pks = keys_of(await conn.fetch(MOVE_TASKS, ME))
            if batch.claim:
                claim = await conn.fetchrow(FENCE_AND_CLAIM, ME, *claim_args(batch.claim))
            await _asyncpg_ends(conn, batch.ends)
        return outcome(batch, pks, _asyncpg_claim(claim))


class AsyncpgSingle(AsyncpgVariant):
    name = "one statement"
    how = "one statement of data-modifying CTEs (its own transaction)"

    async def commit(self, batch: Batch) -> Outcome:
        row = await self.conn.fetchrow(SINGLE, *single_args(batch))
        return _single_outcome(batch, tuple(row) if row else None)


VARIANTS: tuple[type[Variant], ...] = (
    PsycopgExecutemany,
    PsycopgUnnest,
    PsycopgUnnestTransaction,
    PsycopgParts,
    PsycopgCopy,
    PsycopgSingle,
    AsyncpgExecutemany,
    AsyncpgUnnest,
    AsyncpgParts,
    AsyncpgCopy,
    AsyncpgSingle,
)


def label(variant: type[Variant]) -> str:
    return f"{variant.driver} {variant.name}"


# -- driving a variant ---------------------------------------------------------------------------


@dataclass
class Flow:
    """Requests going through their three commits, a group per batch: batch k carries group
    k's intents, group k-1's claim and group k-2's ends. Keeps what the client was told."""

    groups: list[list[Request]]
    outcomes: list[Outcome] = field(default_factory=list)
    committed_at: list[float] = field(default_factory=list)
    pks: dict[str, int] = field(default_factory=dict)
    claims: dict[int, list[int]] = field(default_factory=dict)
    offset: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # task key -> bytes of its line

    @property
    def batches(self) -> int:
        """Batches until every group has ended (two after the last intents)."""
        return len(self.groups) + 2

    def stop_intake(self, after: int) -> None:
        """No more intents after batch `after`: the rest of the batches finish the groups."""
        del self.groups[after + 1 :]

    def batch(self, k: int) -> Batch:
        intents = self.groups[k] if k < len(self.groups) else []
        claim = None
        if 1 <= k <= len(self.groups):
            keys = [self.pks[t.id] for r in self.groups[k - 1] for t in r.tasks]
            claim = Claim(keys, DATA_DIR, LOG_FILE, INODE, self.offset)
        ends = Ends()
        if 2 <= k <= len(self.groups) + 1:
            sent_at, written_at = self.committed_at[k - 2], self.committed_at[k - 1]
            claimed = self.outcomes[k - 1]
            ends = Ends(
                [(r.id, sent_at, 200) for r in self.groups[k - 2]],
                [(key, written_at, written_at) for key in claimed.claimed],
                [] if claimed.claim is None else [claimed.claim],
            )
        return Batch(intents, claim, ends)

    def record(self, batch: Batch, result: Outcome) -> None:
        self.outcomes.append(result)
        self.committed_at.append(time.time())
        self.pks.update(result.pks)
        for r in batch.intents:
            for t in r.tasks:
                self.sizes[result.pks[t.id]] = t.size
        if batch.claim is not None:
            if result.claimed != batch.claim.keys or result.claim is None:
                raise BenchError(f"claim {result.claim} kept {result.claimed} of our own tasks")
            self.claims[result.claim] = result.claimed
            # The lines are now written one after another from the claim's start.
            self.offset += sum(self.sizes[key] for key in result.claimed)


@dataclass
class Sample:
    variant: str
    size: int
    repeat: int
    batches: int
    seconds: float
    cpu_seconds: float
    median_ms: float
    p99_ms: float

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.batches * self.size / self.seconds

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / (self.batches * self.size) * 1e6


def percentile(values: Sequence[float], pct: int) -> float:
    """The pct-th percentile (inclusive method); the value itself for one sample."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


class Bench:
    """The benchmark database: its admin connection and the checks made through it."""

    def __init__(self, server: Server, dbname: str, admin: PgConn) -> None:
        self.server, self.dbname, self.admin = server, dbname, admin

    async def open(self, variant: type[Variant]) -> Variant:
        return await variant.open(self.server, self.dbname)

    async def reset(self, *, prefill: bool = False) -> None:
        """Empty tables, or (prefill) the retention of an older owner's requests, analyzed."""
        await self.admin.execute(RESET)
        if prefill:
            await self.admin.execute(PREFILL)
            await self.admin.execute("VACUUM ANALYZE requests, tasks, claims")
            # Write the prefill's pages out now, not during the measurement.
            await self.admin.execute("CHECKPOINT")

    async def rows(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        cursor = await self.admin.execute(query, args)
        return await cursor.fetchall()

    async def measure(
        self, variant: type[Variant], size: int, repeat: int, batches: int, seconds: float
    ) -> Sample:
        """Drive the variant as a loop for `batches` batches or `seconds`, whichever ends
        first, after a warm-up; then finish every request and check the database."""
        await self.reset(prefill=True)
        flow = Flow([make_requests(size) for _ in range(WARM_UP_BATCHES + batches)])
        latencies: list[float] = []
        runner = await self.open(variant)
        try:
            started = cpu_started = deadline = wall = cpu_seconds = 0.0
            k = 0
            while k < flow.batches:
                if k == WARM_UP_BATCHES:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    deadline = started + seconds
                batch = flow.batch(k)
                t0 = time.perf_counter()
                result = await runner.commit(batch)
                t1 = time.perf_counter()
                flow.record(batch, result)
                if WARM_UP_BATCHES <= k < len(flow.groups):
                    latencies.append(t1 - t0)
                    if t1 >= deadline and k + 1 < len(flow.groups):
                        flow.stop_intake(k)
                    if k + 1 == len(flow.groups):
                        cpu_seconds = time.process_time() - cpu_started
                        wall = t1 - started
                k += 1
        finally:
            await runner.close()
        await self.check(flow)
        return Sample(
            label(variant),
            size,
            repeat,
            len(latencies),
            wall,
            cpu_seconds,
            statistics.median(latencies) * 1e3,
            percentile(latencies, 99) * 1e3,
        )

    async def check(self, flow: Flow) -> None:
        """The database holds exactly what the client was told, and every request ended."""
        requests = sum(len(group) for group in flow.groups)
        [(count, ended)] = await self.rows(
            "SELECT count(*), count(*) FILTER (WHERE response_sent_at >= received_at"
            " AND status_code = 200) FROM requests WHERE id NOT LIKE $1",
            f"{OLD}%",
        )
        if count != requests or ended != requests:
            raise BenchError(f"{count} requests stored, {ended} ended, of {requests} sent")
        keys = dict(await self.rows("SELECT id, pk FROM tasks WHERE owner <> $1", PAST))
        if keys != flow.pks:
            raise BenchError("the task keys stored differ from those returned")
        claims = dict(
            await self.rows("SELECT claim, tasks FROM claims WHERE ended AND owner <> $1", PAST)
        )
        if claims != flow.claims or sum(map(len, claims.values())) != len(keys):
            raise BenchError("the claims stored differ from those returned, or are open")
        [(bad,)] = await self.rows(
            "SELECT count(*) FROM tasks t LEFT JOIN claims c ON c.claim = t.claim"
            " WHERE t.owner IS DISTINCT FROM $1 AND (t.status <> 'done' OR t.owner <> $2"
            " OR t.finished_at IS NULL OR c.claim IS NULL OR NOT t.pk = ANY(c.tasks))",
            PAST,
            ME,
        )
        [(count, old)] = await self.rows(
            "SELECT count(*), count(*) FILTER (WHERE owner = $1) FROM tasks", PAST
        )
        if count - old != len(keys):
            raise BenchError(f"{count - old} tasks stored for {len(keys)} returned keys")
        if bad:
            raise BenchError(f"{bad} tasks not done, or not in the claim they name")

    async def check_fence(self, variant: type[Variant]) -> None:
        """A claim leaves out a task another owner took and one already claimed, lists the
        rest in order, and no claim is made when none survive."""
        await self.reset()
        runner = await self.open(variant)
        try:
            requests = make_requests(3)
            first = await runner.commit(Batch(requests, None, Ends()))
            keys = [first.pks[t.id] for r in requests for t in r.tasks]
            await self.admin.execute("UPDATE tasks SET owner = $1 WHERE pk = $2", (OTHER, keys[1]))
            await self.admin.execute("UPDATE tasks SET claim = 999 WHERE pk = $1", (keys[3],))
            claim = Claim(keys, DATA_DIR, LOG_FILE, INODE, 0)
            second = await runner.commit(Batch([], claim, Ends()))
            survivors = [keys[0], keys[2], keys[4], keys[5]]
            stored = await self.rows("SELECT claim, tasks FROM claims")
            if second.claimed != survivors or stored != [(second.claim, survivors)]:
                raise BenchError(f"{label(variant)}: the fence kept {second.claimed}")
            untouched = await self.rows(
                "SELECT owner, claim, status FROM tasks WHERE pk = ANY($1) ORDER BY pk",
                [keys[1], keys[3]],
            )
            if untouched != [(OTHER, None, "queued"), (ME, 999, "queued")]:
                raise BenchError(f"{label(variant)}: the fence changed {untouched}")
            taken = dataclasses.replace(claim, keys=[keys[1]])
            third = await runner.commit(Batch([], taken, Ends()))
            if third.claim is not None or len(await self.rows("SELECT FROM claims")) != 1:
                raise BenchError(f"{label(variant)}: a claim was made with no task left")
        finally:
            await runner.close()

    async def probe_failure(self, variant: type[Variant]) -> dict[str, Any]:
        """Make one statement of a batch fail and say how each driver reports it: the first
        one (a request id already stored), then a later one (the claim's number already
        taken, after the batch's intents were inserted). Nothing of the failed batch may stay,
        and the same connection must commit the next batch."""
        report: dict[str, Any] = {}
        for case in (DUPLICATE_REQUEST, CLAIM_TAKEN):
            await self.reset()
            runner = await self.open(variant)
            try:
                report[case] = await self._fail_one(runner, case)
            finally:
                await runner.close()
        return report

    async def _fail_one(self, runner: Variant, case: str) -> dict[str, Any]:
        requests = make_requests(2)
        first = await runner.commit(Batch(requests, None, Ends()))
        keys = [first.pks[t.id] for r in requests for t in r.tasks]
        claim = Claim(keys, DATA_DIR, LOG_FILE, INODE, 0)
        intents = make_requests(2)
        if case == DUPLICATE_REQUEST:
            intents[0] = dataclasses.replace(intents[0], id=requests[0].id)
        else:
            # The number the batch's claim will draw is someone else's already.
            await self.admin.execute(
                "WITH n AS (SELECT nextval('claim_numbers') AS n)"
                " INSERT INTO claims (claim, owner, ended) SELECT n, $1, true FROM n",
                (OTHER,),
            )
            await self.admin.execute(
                "SELECT setval('claim_numbers', (SELECT max(claim) FROM claims), false)"
            )
        try:
            await runner.commit(Batch(intents, claim, Ends()))
        except Exception as exc:
            found = describe_error(exc)
        else:
            raise BenchError(f"{label(type(runner))}: {case}, yet the batch was committed")
        taken = 1 if case == CLAIM_TAKEN else 0
        state = await self.rows(
            "SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM tasks),"
            " (SELECT count(*) FROM claims), (SELECT count(*) FROM tasks WHERE claim"
            " IS NOT NULL)"
        )
        if state != [(2, 4, taken, 0)]:
            raise BenchError(f"{label(type(runner))}: a failed batch ({case}) left {state} behind")
        try:
            retried = await runner.commit(Batch(make_requests(2), claim, Ends()))
            found[NEXT] = "committed" if retried.claimed == keys else f"{retried.claimed}"
        except Exception as exc:
            found[NEXT] = f"failed: {describe_error(exc)}"
        return found


DUPLICATE_REQUEST = "first statement fails (request id taken)"
CLAIM_TAKEN = "later statement fails (claim number taken)"
NEXT = "next batch on the same connection"


def describe_error(exc: BaseException) -> dict[str, Any]:
    """What a caller can learn from a driver's exception."""
    found: dict[str, Any] = {"type": f"{type(exc).__module__}.{type(exc).__qualname__}"}
    diag = getattr(exc, "diag", None)  # psycopg
    found["sqlstate"] = getattr(exc, "sqlstate", None) or getattr(diag, "sqlstate", None)
    constraint = getattr(exc, "constraint_name", None) or getattr(diag, "constraint_name", None)
    found["constraint"] = constraint
    found["message"] = str(exc).splitlines()[0] if str(exc) else repr(exc)
    # Which of our lines the error came out of: a statement's call, or the end of a block.
    ours = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == __file__]
    found["raised_by"] = ours[-1].line if ours else None
    return found


# -- round trips -------------------------------------------------------------------------------


class FlightCounter:
    """A loopback relay to PostgreSQL that counts the client's flights: each time the client
    sends after the server has answered is one more round trip. One connection at a time."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.flights = 0
        self._server_spoke = True
        self._relay: asyncio.Server | None = None

    async def start(self) -> Server:
        self._relay = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._relay.sockets[0].getsockname()[1]
        return Server("127.0.0.1", port, self.server.user)

    async def stop(self) -> None:
        if self._relay is not None:
            self._relay.close()
            await self._relay.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream = await asyncio.open_connection(
            self.server.host, self.server.port
        )

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_client: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(1 << 16):
                    if from_client and self._server_spoke:
                        self.flights += 1
                    self._server_spoke = not from_client
                    sink.write(data)
                    await sink.drain()
            sink.close()

        # Cancelled only when the run is interrupted: this task ends here either way.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, upstream, True), pump(upstream_reader, writer, False))


async def count_round_trips(bench: Bench, variant: type[Variant], size: int) -> float:
    """Round trips per steady-state batch (every part present), through the relay."""
    await bench.reset()
    counter = FlightCounter(bench.server)
    relayed = await counter.start()
    flow = Flow([make_requests(size) for _ in range(WARM_UP_BATCHES + COUNTED_BATCHES)])
    runner = await variant.open(relayed, bench.dbname)
    try:
        for k in range(len(flow.groups)):
            if k == WARM_UP_BATCHES:
                counter.flights = 0
            batch = flow.batch(k)
            flow.record(batch, await runner.commit(batch))
        return counter.flights / COUNTED_BATCHES
    finally:
        await runner.close()
        await counter.stop()


# -- liveness ------------------------------------------------------------------------------------


@dataclass
class Session:
    """One driver's calls, for the connection and liveness measurements."""

    driver: str
    connect: Callable[[], Awaitable[Any]]
    close: Callable[[Any], Awaitable[None]]
    value: Callable[[Any, str, int], Awaitable[Any]]


async def _psycopg_value(conn: PgConn, query: str, key: int) -> Any:
    cursor = await conn.execute(query, (key,) if "$1" in query else ())
    row = await cursor.fetchone()
    return row[0] if row else None


async def _asyncpg_value(conn: asyncpg.Connection, query: str, key: int) -> Any:
    return await (conn.fetchval(query, key) if "$1" in query else conn.fetchval(query))


def sessions(server: Server, dbname: str) -> list[Session]:
    async def pg_close(conn: PgConn) -> None:
        await conn.close()

    async def apg_close(conn: asyncpg.Connection) -> None:
        await conn.close()

    return [
        Session("psycopg", lambda: psycopg_connect(server, dbname), pg_close, _psycopg_value),
        Session("asyncpg", lambda: asyncpg_connect(server, dbname), apg_close, _asyncpg_value),
    ]


async def timed(call: Callable[[], Awaitable[Any]], times: int) -> tuple[list[float], list[Any]]:
    """Each call's microseconds, and what it returned."""
    elapsed, values = [], []
    for _ in range(times):
        t0 = time.perf_counter_ns()
        values.append(await call())
        elapsed.append((time.perf_counter_ns() - t0) / 1e3)
    return elapsed, values


async def time_connects(session: Session, times: int, *, lock: bool) -> list[float]:
    """Microseconds to connect (and, with `lock`, take a new owner's lock). Each connection
    is closed, untimed, before the next one opens."""
    elapsed = []
    for _ in range(times):
        t0 = time.perf_counter_ns()
        conn = await session.connect()
        try:
            took = await session.value(conn, TAKE_LOCK, secrets.randbits(62)) if lock else True
            elapsed.append((time.perf_counter_ns() - t0) / 1e3)
        finally:
            await session.close(conn)
        if took is not True:
            raise BenchError(f"{session.driver}: a new owner could not take its lock")
    return elapsed


async def measure_liveness(bench: Bench, times: int, repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds (median over repeats of each repeat's median) per driver and operation.
    Every answer is checked: a lock is taken, a live owner is alive, a gone one is not."""
    results: dict[tuple[str, str], list[float]] = {}
    # A negative key for the live owner: pg_locks shows its halves as unsigned oids.
    alive_key, gone_key = -secrets.randbits(62), secrets.randbits(62)
    owner = await patiently(partial(psycopg_connect, bench.server, bench.dbname))
    try:
        if await _psycopg_value(owner, TAKE_LOCK, alive_key) is not True:
            raise BenchError("the owner could not take its lock")
        for repeat in range(repeats):
            for session in rotated(sessions(bench.server, bench.dbname), repeat):
                await liveness_round(session, times, alive_key, gone_key, results)
    finally:
        await owner.close()
    summary: dict[str, dict[str, float]] = {}
    for (driver, op), medians in results.items():
        summary.setdefault(driver, {})[op] = statistics.median(medians)
    return summary


async def liveness_round(
    session: Session,
    times: int,
    alive_key: int,
    gone_key: int,
    results: dict[tuple[str, str], list[float]],
) -> None:
    def note(op: str, elapsed: list[float]) -> None:
        results.setdefault((session.driver, op), []).append(statistics.median(elapsed))

    note("connect", await time_connects(session, times, lock=False))
    note("connect + pg_try_advisory_lock", await time_connects(session, times, lock=True))
    checker = await patiently(session.connect)
    try:
        note(
            "round trip (SELECT 1)",
            (await timed(partial(session.value, checker, "SELECT 1", 0), times))[0],
        )
        for way, query in (
            ("try its lock", ALIVE_BY_TRY_LOCK),
            ("read pg_locks", ALIVE_BY_PG_LOCKS),
        ):
            for state, key, expected in (("alive", alive_key, True), ("gone", gone_key, False)):
                elapsed, answers = await timed(partial(session.value, checker, query, key), times)
                if any(answer is not expected for answer in answers):
                    raise BenchError(f"{session.driver}: {way} said {answers[0]} for {state}")
                note(f"liveness, {way}: owner {state}", elapsed)
        # The check must not keep a gone owner's lock (it would look alive to everyone else).
        if await session.value(checker, ALIVE_BY_PG_LOCKS, gone_key) is not False:
            raise BenchError(f"{session.driver}: trying a lock kept it")
    finally:
        await session.close(checker)


# -- the run -----------------------------------------------------------------------------------


def rotated(items: Sequence[Any], by: int) -> list[Any]:
    by %= len(items)
    return [*items[by:], *items[:by]]


@dataclass(frozen=True)
class Plan:
    repeats: int
    batches: int
    seconds: float
    liveness_times: int
    sizes: tuple[int, ...]
    variants: tuple[type[Variant], ...]


FULL = Plan(5, 300, 4.0, 200, SIZES, VARIANTS)
QUICK = Plan(1, 40, 1.0, 20, SIZES, VARIANTS)


async def run(server: Server, dbname: str, plan: Plan) -> dict[str, Any]:
    """Create the schema and run the plan. SIGTERM cancels the run as Ctrl-C does, so that
    every connection is closed and the database dropped."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    admin = await patiently(partial(psycopg_connect, server, dbname))
    try:
        await admin.execute(SCHEMA)
        bench = Bench(server, dbname, admin)
        return await run_plan(bench, plan)
    finally:
        await admin.close()


async def run_plan(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Checks first, then the measurements in turns, then the liveness figures."""
    out: dict[str, Any] = {"environment": await environment(bench.admin)}
    for variant in plan.variants:
        await bench.check_fence(variant)
    progress("fence check passed for every way")
    out["failure"] = {label(v): await bench.probe_failure(v) for v in plan.variants}
    out["round_trips"] = {
        label(v): {size: await count_round_trips(bench, v, size) for size in plan.sizes}
        for v in plan.variants
    }
    samples: list[Sample] = []
    busiest = 0.0
    for repeat in range(plan.repeats):
        for size in plan.sizes:
            for variant in rotated(plan.variants, repeat):
                sample = await bench.measure(variant, size, repeat, plan.batches, plan.seconds)
                samples.append(sample)
                busiest = max(busiest, os.getloadavg()[0])
                progress(
                    f"repeat {repeat + 1}/{plan.repeats}, batch {size:>2}, {label(variant):<26}"
                    f" {sample.requests_per_s:>8.0f} req/s  {sample.median_ms:6.2f} ms"
                )
    out["samples"] = [
        {**dataclasses.asdict(s), "requests_per_s": s.requests_per_s} for s in samples
    ]
    out["results"] = summarize(samples, out["round_trips"])
    out["liveness_us"] = await measure_liveness(bench, plan.liveness_times, plan.repeats)
    out["environment"]["other_sessions_at_end"] = await other_sessions(bench.admin)
    # Other programs on this machine share its cores with the client and the server.
    out["environment"]["highest_load_average_1min"] = round(busiest, 2)
    return out


def summarize(
    samples: list[Sample], round_trips: dict[str, dict[int, float]]
) -> list[dict[str, Any]]:
    """Medians over the repeats of each (way, batch size)."""
    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.variant, s.size), []).append(s)
    rows = []
    for (variant, size), group in groups.items():
        rows.append(
            {
                "way": variant,
                "batch": size,
                "round_trips": round_trips[variant][size],
                "batches_per_s": statistics.median(s.batches_per_s for s in group),
                "requests_per_s": statistics.median(s.requests_per_s for s in group),
                "median_ms": statistics.median(s.median_ms for s in group),
                "p99_ms": statistics.median(s.p99_ms for s in group),
                "cpu_us_per_request": statistics.median(s.cpu_us_per_request for s in group),
                "repeats": len(group),
            }
        )
    order = [label(v) for v in VARIANTS]
    return sorted(rows, key=lambda row: (row["batch"], order.index(row["way"])))


async def environment(admin: PgConn) -> dict[str, Any]:
    settings = {}
    for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method"):
        cursor = await admin.execute(f"SHOW {name}")
        row = await cursor.fetchone()
        settings[name] = row[0] if row else None
    return {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {libpq_version()})",
        "asyncpg": asyncpg.__version__,
        "event_loop": type(asyncio.get_running_loop()).__module__,
        "postgresql": settings,
        "other_sessions_at_start": await other_sessions(admin),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


async def other_sessions(admin: PgConn) -> int:
    """Client sessions of other databases or programs: their load would share the server."""
    cursor = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND datname IS DISTINCT FROM current_database()"
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


def libpq_version() -> str:
    version = psycopg.pq.version()
    return f"{version // 10000}.{version % 100}"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- report ------------------------------------------------------------------------------------


def format_report(out: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    env = out["environment"]
    lines = [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "| way | what one batch sends |", "| --- | --- |"]
    lines += [f"| {label(v)} | {v.how} |" for v in VARIANTS]
    lines += [
        "",
        "| way | batch | round trips | batches/s | requests/s | median ms | p99 ms"
        " | CPU µs/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in out["results"]:
        lines.append(
            f"| {row['way']} | {row['batch']} | {row['round_trips']:g} "
            f"| {row['batches_per_s']:,.0f} | {row['requests_per_s']:,.0f} "
            f"| {row['median_ms']:.2f} | {row['p99_ms']:.2f} | {row['cpu_us_per_request']:.0f} |"
        )
    live = out["liveness_us"]
    lines += ["", "| µs (median) | psycopg | asyncpg |", "| --- | ---: | ---: |"]
    for op in live["psycopg"]:
        lines.append(f"| {op} | {live['psycopg'][op]:,.0f} | {live['asyncpg'][op]:,.0f} |")
    lines += ["", "| way | case | raises | raised by | next batch |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for way, cases in out["failure"].items():
        for case, found in cases.items():
            raised = f"`{found['type']}` ({found['sqlstate']}, {found['constraint']})"
            lines.append(f"| {way} | {case} | {raised} | `{found['raised_by']}` | {found[NEXT]} |")
    return "\n".join(lines)


# -- the database's life -------------------------------------------------------------------------


def admin_connect(server: Server) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        dbname="postgres",
        sslmode="disable",
        autocommit=True,
        connect_timeout=10,
    )


def create_database(server: Server) -> str:
    dbname = f"{DB_PREFIX}{secrets.token_hex(6)}"
    with admin_connect(server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return dbname


def drop_database(server: Server, dbname: str) -> None:
    """End the benchmark database's sessions (ours, left open by an interruption), then drop
    it. Only a name this script makes is ever dropped."""
    if not DB_NAME.fullmatch(dbname):
        raise BenchError(f"refusing to drop {dbname!r}: not a benchmark database")
    with admin_connect(server) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


@contextlib.contextmanager
def database(server: Server) -> Iterator[str]:
    """A fresh benchmark database for the block, dropped after it however it ends."""
    dbname = create_database(server)
    progress(f"created database {dbname}")
    # Outside the event loop (which cancels its run instead), SIGTERM exits through `finally`.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield dbname
    finally:
        # An interruption now would leave the database behind.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            drop_database(server, dbname)
            progress(f"dropped database {dbname}")
        finally:
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the Markdown tables and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small counts, about a minute")
    parser.add_argument("--repeats", type=int, help="turns of every measurement (default 5)")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop (uvloop: what `bgtasks serve` runs on when it is installed)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pg_drivers.json")
    args = parser.parse_args(argv)
    if not is_loopback(args.host):
        parser.error("--host must be a loopback address: the load stays on this machine")
    server = Server(args.host, args.port, args.user)
    plan = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        plan = dataclasses.replace(plan, repeats=args.repeats)
    try:
        with database(server) as dbname, asyncio.Runner(loop_factory=loop_factory(args.loop)) as r:
            out = r.run(run(server, dbname, plan))
    except BenchError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except (psycopg.OperationalError, OSError) as exc:
        reason = " ".join(str(exc).split())
        print(f"Error: PostgreSQL at {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 3
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(format_report(out))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
