"""The SQLite registry's reads, for the HTTP API."""

from __future__ import annotations

import sqlite3
from typing import Any

from server.status import UNFINISHED, TaskStatus

TASK_COLUMNS = (
    "id, request_id, seq, file, line, status, queued_at, started_at, finished_at, last_error,"
    " attempts, next_attempt_at, owner"
)
REQUEST_COLUMNS = "id, method, path, received_at, response_sent_at, status_code"
_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))


def get_request(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        f"SELECT {REQUEST_COLUMNS}, first_task, last_task FROM requests WHERE id = ?",
        (request_id,),
    ).fetchone()
    if row is None:
        return None
    result = dict(row)
    first, last = result.pop("first_task"), result.pop("last_task")
    tasks = {
        task["pk"]: {**dict(task), "failures": []}
        for task in conn.execute(
            f"SELECT pk, {TASK_COLUMNS} FROM tasks WHERE pk BETWEEN ? AND ? AND request_id = ?"
            " ORDER BY pk",
            (first, last, request_id),
        )
    }
    failures = conn.execute(
        "SELECT task, attempt, started_at, failed_at, error FROM failures"
        " WHERE task BETWEEN ? AND ? ORDER BY task, attempt",
        (first, last),
    )
    for failure in failures:
        if failure["task"] in tasks:
            tasks[failure["task"]]["failures"].append(
                {key: failure[key] for key in ("attempt", "started_at", "failed_at", "error")}
            )
    for task in tasks.values():
        del task["pk"]
    result["tasks"] = list(tasks.values())
    return result


def get_task(conn: sqlite3.Connection, task_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else dict(row)


def list_tasks(
    conn: sqlite3.Connection, status: TaskStatus | None, limit: int
) -> list[dict[str, Any]]:
    if status is None:
        rows = conn.execute(f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY pk DESC LIMIT ?", (limit,))
    else:
        rows = conn.execute(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ? ORDER BY pk DESC LIMIT ?",
            (status.value, limit),
        )
    return [dict(row) for row in rows]


def count_unfinished(conn: sqlite3.Connection) -> int:
    row = conn.execute(f"SELECT count(*) FROM tasks WHERE status IN ({_UNFINISHED})").fetchone()
    return int(row[0])


def last_event_commit(conn: sqlite3.Connection) -> str:
    return str(conn.execute("SELECT coalesce(max(commit_number), 0) FROM events").fetchone()[0])


def events_after(
    conn: sqlite3.Connection, cursor: str, limit: int, *, inclusive: bool
) -> list[tuple[str, str]]:
    first = int(cursor) if inclusive else int(cursor) + 1
    rows = conn.execute(
        "SELECT commit_number, body FROM events WHERE commit_number >= ?"
        " ORDER BY commit_number LIMIT ?",
        (first, limit),
    )
    return [(str(number), body) for number, body in rows]
