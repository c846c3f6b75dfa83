"""The PostgreSQL registry's reads for the HTTP API, and its retention."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from server.status import UNFINISHED, TaskStatus

TASK_COLUMNS = (
    "t.id, t.request_id, t.seq, t.file, t.line, t.status, t.queued_at, t.started_at,"
    " t.finished_at, t.last_error, t.attempts, t.next_attempt_at, t.owner, o.host"
)
FAILURES = (
    "coalesce((SELECT json_agg(json_build_object('attempt', f.attempt, 'started_at',"
    " f.started_at, 'failed_at', f.failed_at, 'error', f.error) ORDER BY f.attempt)"
    " FROM bgtasks.failures f WHERE f.task = t.pk), '[]') AS failures"
)
TASKS = "bgtasks.tasks t LEFT JOIN bgtasks.owners o ON o.owner = t.owner"
REQUEST_COLUMNS = "id, method, path, received_at, response_sent_at, status_code"
_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))
_KEPT = ", ".join(f"'{status}'" for status in sorted(UNFINISHED | {TaskStatus.FAILED}))


async def get_request(
    conn: AsyncConnection[dict[str, Any]], request_id: str
) -> dict[str, Any] | None:
    cursor = await conn.execute(
        f"SELECT {REQUEST_COLUMNS} FROM bgtasks.requests WHERE id = %s", (request_id,)
    )
    found = await cursor.fetchone()
    if found is None:
        return None
    cursor = await conn.execute(
        f"SELECT {TASK_COLUMNS}, {FAILURES} FROM {TASKS} WHERE t.request_id = %s"
        " ORDER BY t.seq, t.pk",
        (request_id,),
    )
    return {**found, "tasks": await cursor.fetchall()}


async def get_task(conn: AsyncConnection[dict[str, Any]], task_id: str) -> dict[str, Any] | None:
    cursor = await conn.execute(f"SELECT {TASK_COLUMNS} FROM {TASKS} WHERE t.id = %s", (task_id,))
    return await cursor.fetchone()


async def list_tasks(
    conn: AsyncConnection[dict[str, Any]], status: TaskStatus | None, limit: int
) -> list[dict[str, Any]]:
    if status is None:
        cursor = await conn.execute(
            f"SELECT {TASK_COLUMNS} FROM {TASKS} ORDER BY t.pk DESC LIMIT %s", (limit,)
        )
    else:
        cursor = await conn.execute(
            f"SELECT {TASK_COLUMNS} FROM {TASKS} WHERE t.status = %s ORDER BY t.pk DESC LIMIT %s",
            (status.value, limit),
        )
    return await cursor.fetchall()


async def count_unfinished(conn: AsyncConnection[dict[str, Any]]) -> int:
    cursor = await conn.execute(
        f"SELECT count(*) AS n FROM bgtasks.tasks WHERE status IN ({_UNFINISHED})"
    )
    row = await cursor.fetchone()
    return int(row["n"]) if row else 0


async def prune(conn: AsyncConnection[Any], retention: int) -> None:
    """Keep the newest `retention` requests; older ones go once all their tasks ended, and
    ended claims go up to the oldest claim still open (rule 12)."""
    # Failed tasks are the dead letters: kept (with their requests) until retried or cancelled.
    await conn.execute(
        "WITH old AS (SELECT id FROM bgtasks.requests ORDER BY received_at DESC OFFSET %s),"
        " done AS (SELECT o.id FROM old o WHERE NOT EXISTS (SELECT 1 FROM bgtasks.tasks t"
        f" WHERE t.request_id = o.id AND t.status IN ({_KEPT}))),"
        " gone AS (DELETE FROM bgtasks.tasks WHERE request_id IN (SELECT id FROM done))"
        " DELETE FROM bgtasks.requests WHERE id IN (SELECT id FROM done)",
        (retention,),
    )
    await conn.execute(  # the event log keeps as many commits as there are requests kept
        "DELETE FROM bgtasks.events WHERE id <= (SELECT max(id) FROM bgtasks.events) - %s",
        (retention,),
    )
    await conn.execute(
        "DELETE FROM bgtasks.failures f WHERE NOT EXISTS"
        " (SELECT 1 FROM bgtasks.tasks t WHERE t.pk = f.task)"
    )
    await conn.execute(
        "DELETE FROM bgtasks.claims WHERE ended AND claim < coalesce((SELECT min(claim)"
        " FROM bgtasks.claims WHERE NOT ended), 9223372036854775807)"
    )


# The event log. Transactions of several processes commit in any order, so the log is read in
# the order of their ids, and only below the oldest one still running: nothing that commits
# later can sort before what a stream has read. A cursor is "<txid>.<row id>".


async def listen(conn: AsyncConnection[Any], until: float) -> None:
    await conn.execute(
        "INSERT INTO bgtasks.listening VALUES (1, %s) ON CONFLICT (one)"
        " DO UPDATE SET until = greatest(listening.until, excluded.until)",
        (until,),
    )


async def listened_until(conn: AsyncConnection[dict[str, Any]]) -> float:
    cursor = await conn.execute("SELECT max(until) AS u FROM bgtasks.listening")
    row = await cursor.fetchone()
    return float(row["u"] or 0.0) if row else 0.0


async def last_event_commit(conn: AsyncConnection[dict[str, Any]]) -> str:
    cursor = await conn.execute(
        "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1)::text AS x"
    )
    row = await cursor.fetchone()
    return f"{row['x'] if row else 0}.{2**63 - 1}"


async def events_after(
    conn: AsyncConnection[dict[str, Any]], cursor: str, limit: int, *, inclusive: bool
) -> list[tuple[str, str]]:
    txid, _, after = cursor.partition(".")
    start = int(after or 0) - (1 if inclusive else 0)
    found = await conn.execute(
        "SELECT txid::text || '.' || id AS cursor, body FROM bgtasks.events"
        " WHERE (txid, id) > (%s::text::xid8, %s)"
        " AND txid < pg_snapshot_xmin(pg_current_snapshot())"
        " ORDER BY txid, id LIMIT %s",
        (txid, start, limit),
    )
    return [(row["cursor"], row["body"]) for row in await found.fetchall()]
