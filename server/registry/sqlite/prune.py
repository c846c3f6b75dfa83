"""Retention: the SQLite registry keeps the newest requests, and the claims recovery needs."""

from __future__ import annotations

import sqlite3

from server.status import UNFINISHED, TaskStatus

# Failed tasks are the dead letters: kept until they are retried or cancelled.
_KEPT = ", ".join(f"'{status}'" for status in sorted(UNFINISHED | {TaskStatus.FAILED}))


def prune(conn: sqlite3.Connection, retention: int) -> None:
    """Keep the newest `retention` requests; older ones go once all their tasks ended.

    Requests and their tasks are keyed in the same order (both at the intent's commit), so the
    tasks of the requests past retention are the keys up to the newest one's last_task. Every
    statement goes by key, walking the rows past retention (and the few it must keep among
    them): the tasks table needs no index on request_id. Ended claims go too, up to the oldest
    claim still open (rule 12)."""
    row = conn.execute(
        "SELECT rowid FROM requests ORDER BY rowid DESC LIMIT 1 OFFSET ?", (retention,)
    ).fetchone()
    if row is None:
        return
    cutoff = int(row[0])
    span = conn.execute(
        "SELECT last_task FROM requests WHERE rowid <= ? AND last_task IS NOT NULL"
        " ORDER BY rowid DESC LIMIT 1",
        (cutoff,),
    ).fetchone()
    if span is not None:
        conn.execute(f"DELETE FROM tasks WHERE pk <= ? AND status NOT IN ({_KEPT})", (span[0],))
        conn.execute(
            "DELETE FROM failures WHERE task <= ? AND NOT EXISTS"
            " (SELECT 1 FROM tasks WHERE pk = failures.task)",
            (span[0],),
        )
    conn.execute(
        "DELETE FROM requests WHERE rowid <= ? AND (last_task IS NULL OR NOT EXISTS"
        " (SELECT 1 FROM tasks WHERE pk BETWEEN requests.first_task AND requests.last_task))",
        (cutoff,),
    )
    conn.execute(  # the event log keeps as many commits as there are requests kept
        "DELETE FROM events WHERE commit_number <= (SELECT max(commit_number) FROM events) - ?",
        (retention,),
    )
    oldest = oldest_open_claim(conn)
    conn.execute(
        "DELETE FROM claims WHERE ended AND claim < ?",
        (oldest if oldest is not None else 1 << 62,),
    )


def oldest_open_claim(conn: sqlite3.Connection) -> int | None:
    """The oldest claim that has not ended, of any process (alive, or dead and not yet
    recovered). Recovery tells a lost line from a written one by the claims made after it
    (rule 8), so the prune keeps every claim newer than this one. (The table holds the claims
    made since the last prune and those it kept: a scan is cheap.)"""
    row = conn.execute("SELECT min(claim) FROM claims WHERE NOT ended").fetchone()
    return None if row[0] is None else int(row[0])
