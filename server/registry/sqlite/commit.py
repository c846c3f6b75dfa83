"""The SQL of one group commit in SQLite: the intents, the requests' notes, the claims, the
tasks' states."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from server.records import RequestRecord, TaskRecord, new_request_id
from server.registry.claims import Claim
from server.status import TaskStatus


def insert_intents(conn: sqlite3.Connection, owner: str, intents: list[RequestRecord]) -> None:
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
            (t.pk, t.id, t.request_id, t.seq, owner, t.file, t.line, t.queued_at)
            for r in intents
            for t in r.tasks
        ],
    )


def record_requests(conn: sqlite3.Connection, requests: Iterable[RequestRecord]) -> None:
    sent: list[tuple[Any, ...]] = []
    other: list[tuple[Any, ...]] = []
    for r in requests:
        if r.accepted:  # it has had its row since its intents
            sent.append((r.response_sent_at, r.status_code, r.id))
        else:
            other.append((r.id, r.method, r.path, r.received_at, r.response_sent_at, r.status_code))
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


def claim(
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


def update_tasks(conn: sqlite3.Connection, tasks: Iterable[TaskRecord]) -> None:
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
