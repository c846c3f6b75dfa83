"""The SQLite registry's tables, its connections, and the migration of older registries.

SCHEMA_VERSION is the registry's schema, one number for every store; SQLite keeps it in
`PRAGMA user_version`. Registries from before it was kept (user_version 0) are recognised by
their columns.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from server.paths import registry_path
from server.registry.owners import check_state_dir
from server.registry.store import StoreFault

SCHEMA_VERSION = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    response_sent_at REAL,
    status_code INTEGER,
    first_task INTEGER,
    last_task INTEGER
);
CREATE TABLE IF NOT EXISTS tasks (
    pk INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    owner TEXT NOT NULL,
    file TEXT NOT NULL,
    line TEXT NOT NULL,
    status TEXT NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    last_error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL
);
CREATE TABLE IF NOT EXISTS claims (
    claim INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    file TEXT NOT NULL,
    inode INTEGER NOT NULL,
    start INTEGER NOT NULL,
    tasks TEXT NOT NULL,
    ended INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    task INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL,
    failed_at REAL NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (task, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    commit_number INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS listening (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    until REAL NOT NULL
);
"""
"""A request's tasks are the keys first_task..last_task (both given at its intent's commit).
A claim's `tasks` is a JSON array of task keys in write order. `failures` holds each task's
failed attempts (its key, the attempt's number). `events` is the event log: one row per commit
that made any, numbered in commit order, its events as a JSON array; it is written only while
`listening.until` (one row: when the last open stream's lease runs out) is in the future."""

# SQLite's result codes that say the file itself is unusable, rather than busy for a moment.
_FAULTS = frozenset(
    {
        "SQLITE_CORRUPT",
        "SQLITE_NOTADB",
        "SQLITE_IOERR",
        "SQLITE_READONLY",
        "SQLITE_CANTOPEN",
        "SQLITE_PERM",
    }
)


def is_fault(exc: sqlite3.Error) -> bool:
    """Whether `exc` means the registry is damaged or unusable (not just busy or full)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return "_".join(name.split("_")[:2]) in _FAULTS  # SQLITE_IOERR_WRITE -> SQLITE_IOERR


def connect(path: Path, *, readonly: bool = False, timeout: float = 5.0) -> sqlite3.Connection:
    """Open the registry with the pragmas every connection needs. `timeout` is how long a
    statement waits for another process's lock before failing."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
    else:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only power loss can undo a commit.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def check_registry(data_dir: Path) -> None:
    """Raise StoreFault, in one line naming the file, if this data directory's registry could
    not be used: a symbolic link that would lead writes out of the data directory, a file that
    is not a SQLite database or is damaged, or one this process cannot write."""
    check_state_dir(data_dir)
    db = registry_path(data_dir)
    for path in (db, db.with_name(db.name + "-wal")):
        if path.is_symlink():
            raise StoreFault(
                f"{path} is a symbolic link; the service writes only inside its data directory"
            )
    if not db.exists():
        return
    if not db.is_file():
        raise StoreFault(f"{db} is not a regular file")
    try:
        conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreFault(f"{db} cannot be opened: {exc}") from None
    try:
        damage = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if damage != "ok":
            raise StoreFault(f"{db} is damaged: {damage}")
        # A write proves it is writable (SQLite opens a file it may not write read-only).
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"PRAGMA user_version = {conn.execute('PRAGMA user_version').fetchone()[0]}")
        conn.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:
        if is_fault(exc) or not isinstance(exc, sqlite3.OperationalError):
            raise StoreFault(f"{db} is not a usable task registry: {exc}") from None
        # Busy: another process is writing it this moment; opening it will prove the rest.
    finally:
        conn.close()


def create_or_migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a registry written by an older version up to date, in one
    transaction (sibling workers starting at once take turns). Raises StoreFault for a
    registry of a newer version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreFault(
                f"the registry has schema version {version}, newer than this bgtasks"
                f" ({SCHEMA_VERSION}): upgrade bgtasks"
            )
        if version == 0:
            _migrate_unversioned(conn)
        if 0 < version < 6 or (version == 0 and _has(conn, "tasks", "error")):
            # Version 6 retries: a task's attempts, when the next is due, its last error.
            conn.execute("ALTER TABLE tasks RENAME COLUMN error TO last_error")
            conn.execute("ALTER TABLE tasks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE tasks ADD COLUMN next_attempt_at REAL")
        _run(conn, SCHEMA)
        # Always a write: a registry this process cannot write fails here, at start.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _has(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


def _run(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of `script` inside the open transaction (executescript would commit
    it first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_unversioned(conn: sqlite3.Connection) -> None:
    """Versions 1 to 4 did not record their version; their columns tell them apart."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    # Versions 1-3 kept each line's claim on its task's row, and version 1 keyed tasks by their
    # text id. Each claim becomes a claims row of its own, keyed as before: claims already
    # made stay in their order.
    if "claim" in columns:
        key = "pk" if "pk" in columns else "rowid"
        conn.execute("ALTER TABLE tasks RENAME TO tasks_old")
        conn.execute("DROP INDEX IF EXISTS tasks_by_request")
        _run(conn, SCHEMA)
        conn.execute(
            f"INSERT INTO tasks (pk, id, request_id, seq, owner, file, line, status, queued_at,"
            f" started_at, finished_at, last_error) SELECT {key}, id, request_id, seq, owner, file,"
            f" line, status, queued_at, started_at, finished_at, error FROM tasks_old"
            f" ORDER BY {key}"
        )
        conn.execute(
            f"INSERT INTO claims SELECT claim, owner, file, inode, write_offset,"
            f" json_array({key}), status NOT IN ('queued', 'running')"
            " FROM tasks_old WHERE claim IS NOT NULL"
        )
        conn.execute("DROP TABLE tasks_old")
        conn.execute("DROP TABLE IF EXISTS counters")
    elif "pk" in columns:
        # Version 4 packed a claim's keys as runs ("4-6,9"); version 5 keeps a JSON array.
        rows = conn.execute("SELECT claim, tasks FROM claims").fetchall()
        conn.executemany(
            "UPDATE claims SET tasks = ? WHERE claim = ?",
            [
                (json.dumps(_unpack_runs(text), separators=(",", ":")), claim)
                for claim, text in rows
            ],
        )
    # Versions 1-2 found a request's tasks through an index on request_id.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    if columns and "first_task" not in columns:
        conn.execute("ALTER TABLE requests ADD COLUMN first_task INTEGER")
        conn.execute("ALTER TABLE requests ADD COLUMN last_task INTEGER")
        conn.execute("CREATE INDEX IF NOT EXISTS tasks_by_request ON tasks(request_id)")
        conn.execute(
            "UPDATE requests SET"
            " first_task = (SELECT min(pk) FROM tasks WHERE request_id = requests.id),"
            " last_task = (SELECT max(pk) FROM tasks WHERE request_id = requests.id)"
        )
    conn.execute("DROP INDEX IF EXISTS tasks_by_request")


def _unpack_runs(text: str) -> list[int]:
    """Version 4's claim keys: "4-6,9" -> [4, 5, 6, 9]."""
    keys: list[int] = []
    for run in text.split(","):
        first, _, last = run.partition("-")
        keys.extend(range(int(first), int(last or first) + 1))
    return keys
