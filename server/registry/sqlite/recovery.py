"""The SQL of a dead owner's recovery and of an operator's retry and cancel, in SQLite."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from server.records import TaskRecord
from server.registry.claims import Claim
from server.registry.store import DeadOwnerWork, task_from_row
from server.status import UNFINISHED

_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))


def owners_with_unfinished_tasks(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute(f"SELECT DISTINCT owner FROM tasks WHERE status IN ({_UNFINISHED})")
    return {row[0] for row in rows}


def dead_owner_work(conn: sqlite3.Connection, owner: str) -> DeadOwnerWork:
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
    tasks = [task_from_row(row) for row in rows]
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


def earliest_later_start(conn: sqlite3.Connection, claim: Claim) -> int | None:
    row = conn.execute(
        "SELECT min(start) FROM claims WHERE file = ? AND inode = ? AND claim > ?",
        (claim.file, claim.inode, claim.number),
    ).fetchone()
    return None if row[0] is None else int(row[0])


def adopt(
    conn: sqlite3.Connection, tasks: Sequence[TaskRecord], dead: str, owner: str
) -> list[TaskRecord]:
    moved: list[TaskRecord] = []
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
    return moved


def end_recovery(conn: sqlite3.Connection, owner: str, tasks: Sequence[TaskRecord]) -> None:
    conn.executemany(
        "UPDATE tasks SET status = ?, finished_at = ?, last_error = ? WHERE pk = ?",
        [(t.status.value, t.finished_at, t.last_error, t.pk) for t in tasks],
    )
    conn.execute("UPDATE claims SET ended = 1 WHERE owner = ? AND NOT ended", (owner,))


def cancel(conn: sqlite3.Connection, task_id: str, at: float) -> bool:
    cursor = conn.execute(
        "UPDATE tasks SET status = 'cancelled', finished_at = ?, next_attempt_at = NULL"
        f" WHERE id = ? AND status IN ({_UNFINISHED}) AND pk NOT IN (SELECT j.value"
        " FROM claims, json_each(claims.tasks) AS j WHERE NOT claims.ended)",
        (at, task_id),
    )
    return cursor.rowcount > 0


def requeue(conn: sqlite3.Connection, task_id: str, owner: str) -> TaskRecord | None:
    row = conn.execute(
        "UPDATE tasks SET status = 'queued', owner = ?, attempts = 0,"
        " next_attempt_at = NULL, started_at = NULL, finished_at = NULL"
        " WHERE id = ? AND status = 'failed' RETURNING *",
        (owner, task_id),
    ).fetchone()
    return None if row is None else task_from_row(row)
