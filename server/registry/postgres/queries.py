"""The PostgreSQL registry's reads for the HTTP API, and its retention."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from server.status import UNFINISHED, TaskStatus

TASK_COLUMNS = (
    "t.id, t.request_id, t.seq, t.file, t.line, t.status, t.queued_at, t.started_at,"
    " t.finished_at, t.error, t.owner, o.host"
)
TASKS = "bgtasks.tasks t LEFT JOIN bgtasks.owners o ON o.owner = t.owner"
REQUEST_COLUMNS = "id, method, path, received_at, response_sent_at, status_code"
_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))


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
        f"SELECT {TASK_COLUMNS} FROM {TASKS} WHERE t.request_id = %s ORDER BY t.seq, t.pk",
        (request_id,),
    )
    return {**found, "tasks": await cursor.fetchall()}


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
    await conn.execute(
        "WITH old AS (SELECT id FROM bgtasks.requests ORDER BY received_at DESC OFFSET %s),"
        " done AS (SELECT o.id FROM old o WHERE NOT EXISTS (SELECT 1 FROM bgtasks.tasks t"
        f" WHERE t.request_id = o.id AND t.status IN ({_UNFINISHED}))),"
        " gone AS (DELETE FROM bgtasks.tasks WHERE request_id IN (SELECT id FROM done))"
        " DELETE FROM bgtasks.requests WHERE id IN (SELECT id FROM done)",
        (retention,),
    )
    await conn.execute(
        "DELETE FROM bgtasks.claims WHERE ended AND claim < coalesce((SELECT min(claim)"
        " FROM bgtasks.claims WHERE NOT ended), 9223372036854775807)"
    )
