"""The SQL of a dead owner's recovery, in PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from server.records import TaskRecord
from server.registry.claims import Claim
from server.registry.postgres.statements import columns
from server.registry.store import DeadOwnerWork, task_from_row
from server.status import UNFINISHED

_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))


async def dead_owner_work(conn: AsyncConnection[Any], owner: str, here: str) -> DeadOwnerWork:
    """Its unfinished tasks claimed in this data directory or not at all (those claimed in
    another wait for that directory, and so do the later tasks of their requests: run
    here, they would be written before a line that may not be there yet), and its open
    claims here."""
    cursor = await conn.execute(
        "SELECT t.* FROM bgtasks.tasks t LEFT JOIN bgtasks.claims c ON c.claim = t.claim"
        f" WHERE t.owner = %s AND t.status IN ({_UNFINISHED})"
        " AND (t.claim IS NULL OR c.data_dir = %s) AND NOT EXISTS (SELECT 1 FROM"
        " bgtasks.tasks e LEFT JOIN bgtasks.claims ec ON ec.claim = e.claim"
        " WHERE e.request_id = t.request_id AND e.seq < t.seq AND e.claim IS NOT NULL"
        f" AND e.status IN ({_UNFINISHED}) AND ec.data_dir IS DISTINCT FROM %s)"
        " ORDER BY t.pk",
        (owner, here, here),
    )
    tasks = [task_from_row(row) for row in await cursor.fetchall()]
    cursor = await conn.execute(
        "SELECT claim, file, inode, start, tasks FROM bgtasks.claims"
        " WHERE owner = %s AND data_dir = %s AND NOT ended ORDER BY claim",
        (owner, here),
    )
    claims = [
        Claim(r["claim"], owner, r["file"], r["inode"], r["start"], tuple(r["tasks"]))
        for r in await cursor.fetchall()
    ]
    unfinished = {task.pk for task in tasks}
    wanted = sorted({key for claim in claims for key in claim.keys} - unfinished)
    cursor = await conn.execute(
        "SELECT pk, octet_length(line) AS n FROM bgtasks.tasks"
        " WHERE pk = ANY(%s::bigint[]) AND owner = %s",
        (wanted, owner),
    )
    ended_lengths = {row["pk"]: row["n"] for row in await cursor.fetchall()}
    return DeadOwnerWork(tasks, claims, ended_lengths)


async def end_recovery(
    conn: AsyncConnection[Any], owner: str, here: str | None, tasks: Sequence[TaskRecord]
) -> None:
    """Record the recovered (or failed) tasks and end the owner's open claims in data
    directory `here` (every one, if None). (Its row in `owners` stays: its tasks still show
    its host.)"""
    if tasks:
        rows = [(t.pk, t.status.value, t.finished_at, t.last_error) for t in tasks]
        await conn.execute(
            "UPDATE bgtasks.tasks AS t SET status = u.status, finished_at = u.finished,"
            " last_error = u.error FROM unnest(%s::bigint[], %s::text[], %s::float8[],"
            " %s::text[]) AS u(pk, status, finished, error) WHERE t.pk = u.pk",
            columns(rows, 4),
        )
    await conn.execute(
        "UPDATE bgtasks.claims SET ended = true WHERE owner = %s"
        " AND (data_dir = %s OR %s::text IS NULL) AND NOT ended",
        (owner, here, here),
    )


async def lost_lines(
    conn: AsyncConnection[Any], owner: str, here: str
) -> tuple[dict[str, Any] | None, list[TaskRecord]]:
    """The owner's row, and its unfinished tasks claimed in another data directory."""
    cursor = await conn.execute(
        "SELECT owner, host, pid, data_dir, started_at FROM bgtasks.owners WHERE owner = %s",
        (owner,),
    )
    known = await cursor.fetchone()
    cursor = await conn.execute(
        "SELECT t.* FROM bgtasks.tasks t JOIN bgtasks.claims c ON c.claim = t.claim"
        f" WHERE t.owner = %s AND t.status IN ({_UNFINISHED}) AND c.data_dir <> %s"
        " ORDER BY t.pk",
        (owner, here),
    )
    return known, [task_from_row(row) for row in await cursor.fetchall()]
