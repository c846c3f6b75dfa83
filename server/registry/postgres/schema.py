"""The PostgreSQL registry's tables, in a schema of their own (`bgtasks`), and their version.

The schema version is the one SQLite keeps (SCHEMA_VERSION): one number for every store. It is
kept in `bgtasks.meta`. Processes starting at once create or migrate the tables in turn, under
a transaction-level advisory lock.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from server.registry.sqlite.schema import SCHEMA_VERSION
from server.registry.store import StoreFault

NAMESPACE = 0x62677473  # "bgts": the first key of every advisory lock bgtasks takes
_MIGRATION_LOCK = 0  # the second key of the lock held while the schema is created

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS bgtasks;
CREATE TABLE IF NOT EXISTS bgtasks.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS bgtasks.requests (
    id text PRIMARY KEY,
    method text NOT NULL,
    path text NOT NULL,
    received_at double precision NOT NULL,
    response_sent_at double precision,
    status_code integer,
    accepted boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS requests_by_time ON bgtasks.requests (received_at);
CREATE TABLE IF NOT EXISTS bgtasks.tasks (
    pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL,
    request_id text NOT NULL,
    seq integer NOT NULL,
    owner text NOT NULL,
    file text NOT NULL,
    line text NOT NULL,
    status text NOT NULL,
    queued_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    last_error text,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    claim bigint
);
CREATE INDEX IF NOT EXISTS tasks_by_request ON bgtasks.tasks (request_id);
CREATE INDEX IF NOT EXISTS tasks_unfinished ON bgtasks.tasks (owner)
    WHERE status IN ('queued', 'running', 'retrying');
CREATE TABLE IF NOT EXISTS bgtasks.failures (
    task bigint NOT NULL,
    attempt integer NOT NULL,
    started_at double precision,
    failed_at double precision NOT NULL,
    error text NOT NULL,
    PRIMARY KEY (task, attempt)
);
CREATE SEQUENCE IF NOT EXISTS bgtasks.claim_numbers;
CREATE TABLE IF NOT EXISTS bgtasks.claims (
    claim bigint PRIMARY KEY,
    owner text NOT NULL,
    data_dir text NOT NULL,
    file text NOT NULL,
    inode bigint NOT NULL,
    start bigint NOT NULL,
    tasks bigint[] NOT NULL,
    ended boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS claims_open ON bgtasks.claims (owner) WHERE NOT ended;
CREATE TABLE IF NOT EXISTS bgtasks.events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at double precision NOT NULL,
    body text NOT NULL
);
CREATE INDEX IF NOT EXISTS events_in_order ON bgtasks.events (txid, id);
CREATE TABLE IF NOT EXISTS bgtasks.listening (
    one integer PRIMARY KEY CHECK (one = 1),
    until double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS bgtasks.owners (
    owner text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    data_dir text NOT NULL,
    started_at double precision NOT NULL
);
"""
"""`tasks.claim` is the claim a task's line was placed in: set, with an owner check, by the
claim statement itself (rule 13), and cleared when an attempt failed (nothing of its line is
left in the file). A claim's `data_dir` names the data directory its file is in (its
`.bgtasks/id`). `failures` holds each task's failed attempts. `events` is the event log: one
row per commit that made any; `txid` orders it (see `events_after`). It is written only while
`listening.until` (one row: when the last open stream's lease runs out) is in the future."""


async def create_or_migrate(conn: AsyncConnection[Any]) -> None:
    """Create the tables, or refuse a registry of another version, in one transaction."""
    created = False
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s::int, %s::int)", (NAMESPACE, _MIGRATION_LOCK)
        )
        for statement in SCHEMA.split(";"):
            if statement.strip():
                await conn.execute(statement)
        cursor = await conn.execute("SELECT value FROM bgtasks.meta WHERE key = 'schema_version'")
        row = await cursor.fetchone()
        if row is None:
            await conn.execute(
                "INSERT INTO bgtasks.meta VALUES ('schema_version', %s)", (str(SCHEMA_VERSION),)
            )
            created = True
        elif int(str(row[0])) != SCHEMA_VERSION:
            raise StoreFault(
                f"the registry has schema version {row[0]}, this bgtasks {SCHEMA_VERSION}:"
                " run the bgtasks that matches it"
            )
    if created:  # statistics for the planner from the start (autovacuum keeps them after)
        for table in ("requests", "tasks", "claims"):
            await conn.execute(f"ANALYZE bgtasks.{table}")
