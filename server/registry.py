"""The task registry: SQLite (WAL) in the data directory, shared by every worker and the CLI.

Each process has one write connection, used on the event loop. Everything queued during one turn
of the loop (new intents, state changes, lines to append) is flushed at the next turn in a single
transaction, which also claims the file offsets of the lines about to be written (one `claims`
row per file: where the first line goes and which tasks follow it); after the commit the lines
are appended (one `os.write` per file, under an exclusive `flock` of it) and whoever waits for an
intent or submitted a line hears of it. So a response waits for one group commit, never for a
commit of its own, and a line is only written once its offset is durable: after a `kill -9`,
`recover_dead_owners` can tell a written line from a lost one by reading the bytes at the
claimed offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from server.paths import STATE_DIR, owners_dir, registry_path
from server.records import RequestRecord, TaskRecord
from server.status import TaskStatus

logger = logging.getLogger("bgtasks.registry")

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
    error TEXT
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
"""

TASK_COLUMNS = "id, request_id, seq, file, line, status, queued_at, started_at, finished_at, error"
REQUEST_COLUMNS = "id, method, path, received_at, response_sent_at, status_code"

# Files are opened for appending and reading (recovery reads back what it finds at an offset),
# never through a symlink, so the service cannot be led to write outside its data directory.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
PRUNE_EVERY = 500
# The write connection runs on the event loop, so it never waits long for a lock at once:
# a busy registry is retried every RETRY_S until `lock_timeout` runs out.
BUSY_WAIT_S = 0.05
RETRY_S = 0.05
# Every commit rewrites the B-tree pages it touches, so commits are grouped: anything someone
# waits for (an intent before its response, a claim before its write) is committed at once if
# the last commit is COMMIT_GAP_S old, else when it is (so under load one commit serves many
# requests, and an idle server adds no wait); state changes nobody waits for ride along, or go
# within NOTE_WINDOW_S.
COMMIT_GAP_S = 0.001
NOTE_WINDOW_S = 0.05


# Called once a submitted line was written (None) or could not be (the error).
Ended = Callable[[BaseException | None], None]
_Append = tuple[TaskRecord, Ended]


class RegistryError(RuntimeError):
    """The registry could not commit: the work was not accepted."""


def connect(path: Path, *, readonly: bool = False, timeout: float = 5.0) -> sqlite3.Connection:
    """Open the registry database with the pragmas every connection needs. `timeout` is how
    long a statement waits for another process's lock before failing."""
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
    """Raise RegistryError, in one line naming the file, if this data directory's registry
    could not be used: a symbolic link that would lead writes out of the data directory, a
    file that is not a SQLite database or is damaged, or one this process cannot write."""
    state = data_dir / STATE_DIR
    db = registry_path(data_dir)
    for path in (state, owners_dir(data_dir), db, db.with_name(db.name + "-wal")):
        if path.is_symlink():
            raise RegistryError(
                f"{path} is a symbolic link; the service writes only inside its data directory"
            )
    if not db.exists():
        return
    if not db.is_file():
        raise RegistryError(f"{db} is not a regular file")
    try:
        conn = sqlite3.connect(db, timeout=1.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise RegistryError(f"{db} cannot be opened: {exc}") from None
    try:
        damage = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if damage != "ok":
            raise RegistryError(f"{db} is damaged: {damage}")
        # Any write proves it is writable (SQLite opens a file it may not write read-only).
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS write_check (x)")
        conn.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:
        raise RegistryError(f"{db} is not a usable task registry: {exc}") from None
    finally:
        conn.close()


@dataclass(slots=True)
class _Batch:
    """Everything waiting for the next group commit."""

    intents: list[RequestRecord] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)  # one per intent
    request_notes: dict[str, RequestRecord] = field(default_factory=dict)
    task_notes: dict[str, TaskRecord] = field(default_factory=dict)
    appends: list[_Append] = field(default_factory=list)
    ended_claims: list[int] = field(default_factory=list)  # every line of these has ended

    def __bool__(self) -> bool:
        return bool(
            self.intents
            or self.request_notes
            or self.task_notes
            or self.appends
            or self.ended_claims
        )


class Checkpointer:
    """Copies the WAL back into the database from a thread of its own, every `interval`
    seconds. SQLite would otherwise checkpoint inside a commit, on the event loop, stalling
    every request for the copy and its fsync.

    A passive checkpoint never waits, so under steady load a commit always lands while it
    copies and the WAL never starts over: it grew by ~25 MB a second here. So once the WAL holds
    more than `limit_pages` and a passive round has copied all of it, a RESTART checkpoint makes
    the next commit write it from the start. That one takes the write lock: commits wait while
    it copies what was committed since the passive round, syncs, and waits up to `timeout` for
    readers to leave the WAL (~2.5 ms in all here; TRUNCATE's shrinking of the file took 4 ms
    more and doubled the p99 latency of requests, so the file keeps its largest size).
    """

    def __init__(
        self, path: Path, interval: float = 0.5, limit_pages: int = 1000, timeout: float = 0.02
    ) -> None:
        self._path = path
        self._interval = interval
        self._limit_pages = limit_pages
        self._timeout = timeout
        self._held_back = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bgtasks-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        failing = False
        try:
            while not self._stop.wait(self._interval):
                try:
                    self.checkpoint(conn)
                except sqlite3.Error as exc:
                    if not failing:
                        logger.warning("registry checkpoint failed (%s); retrying", exc)
                    failing = True
                else:
                    failing = False
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> bool:
        """One round: copy what can be copied without waiting, then restart a WAL past the
        limit. True when the next commit starts the WAL over."""
        busy, pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if pages <= self._limit_pages:  # -1 while another process checkpoints
            self._held_back = False
            return False
        if busy or copied < pages:
            # A reader on an older snapshot holds the copy back: waiting for it would hold
            # the write lock, so wait for a round that copies everything.
            if pages > 10 * self._limit_pages and not self._held_back:
                logger.warning("registry WAL at %d pages: a reader holds back checkpoints", pages)
                self._held_back = True
            return False
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return not busy


class DataFiles:
    """Long-lived O_APPEND descriptors, reopened when the file is removed or replaced."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self._fds: dict[str, int] = {}
        self._paths: dict[str, str] = {}  # a pathlib join per group commit costs more than its stat

    def lock(self, name: str) -> tuple[int, int, int]:
        """Lock `name` exclusively and return (fd, inode, size). Raises OSError."""
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = str(self._dir / name)
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(path, _OPEN_FLAGS, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        try:
            current = os.stat(path, follow_symlinks=False)
            same = (current.st_ino, current.st_dev) == (st.st_ino, st.st_dev)
        except FileNotFoundError:
            same = False
        if not same:
            self._close(name)
            fd = self._fds[name] = os.open(path, _OPEN_FLAGS, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
        return fd, st.st_ino, st.st_size

    def unlock(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _close(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        for name in list(self._fds):
            self._close(name)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return  # cancelled at a shutdown timeout
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _write_lines(fd: int, items: list[_Append]) -> None:
    """Append the lines, claimed in turn from the first one's offset, with one `os.write`, mark
    the ones written done and report each one's end. Whole lines in one write: no other
    writer's bytes can come between or inside them (and one syscall a flush, not one a line).
    On a short write (disk full) the lines that landed whole are kept; the rest fail, and any
    part of one is cut off, so that the next line does not follow half a line."""
    data = items[0][0].data if len(items) == 1 else b"".join([task.data for task, _ in items])
    error: OSError | None = None
    try:
        written = os.write(fd, data)
    except OSError as exc:
        written, error = 0, exc
    landed, kept = len(items), written
    if written != len(data):
        error = error or OSError(f"short write: {written} of {len(data)} bytes")
        landed = kept = 0
        while kept + len(items[landed][0].data) <= written:
            kept += len(items[landed][0].data)
            landed += 1
        if kept != written:
            try:
                os.ftruncate(fd, (items[0][0].offset or 0) + kept)
            except OSError:
                logger.exception("could not cut off a partly written line")
    now = time.time()
    for task, _ in items[:landed]:
        task.status, task.finished_at = TaskStatus.DONE, now
    for _, ended in items[:landed]:
        ended(None)
    for _, ended in items[landed:]:
        ended(error)


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Registry:
    """Persist requests and tasks, append lines, and recover the work of crashed processes."""

    def __init__(
        self, data_dir: Path, *, owner: str, retention: int, lock_timeout: float = 5.0
    ) -> None:
        self.data_dir = data_dir
        self.owner = owner
        self.retention = retention
        self.lock_timeout = lock_timeout
        # Prune every PRUNE_EVERY requests (each prune holds the loop while it deletes), or
        # often enough to stay within ~10% over retention.
        self._prune_every = max(1, min(PRUNE_EVERY, retention // 10))
        self._db_path = registry_path(data_dir)
        self._files = DataFiles(data_dir)
        # Its RESTART may keep commits waiting that long for readers: well within their busy
        # timeout.
        wait = min(0.02, BUSY_WAIT_S / 2, lock_timeout / 4)
        self._checkpointer = Checkpointer(self._db_path, timeout=wait)
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._owner_fd: int | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._stalled_since: float | None = None
        self._last_flush = 0.0
        self._flush_due = 0.0
        self._flush_urgent = False
        self._pending = _Batch()
        self._since_prune = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> list[TaskRecord]:
        """Create the schema, claim this process's owner lock and recover crashed owners'
        tasks. Returns the recovered tasks."""
        self._db_path.parent.mkdir(parents=True, exist_ok=True)
        owners = owners_dir(self.data_dir)
        owners.mkdir(parents=True, exist_ok=True)
        self._owner_fd = _lock_owner_file(owners / f"{self.owner}.lock", blocking=True)
        self._conn = connect(self._db_path, timeout=self.lock_timeout)
        _create_or_migrate(self._conn)
        recovered = self.recover_dead_owners()
        busy_ms = int(min(BUSY_WAIT_S, self.lock_timeout) * 1000)
        self._conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpointer.start()
        self._reader = connect(self._db_path, readonly=True, timeout=self.lock_timeout)
        return recovered

    def close(self) -> None:
        """Flush every pending change, close the database and release the owner lock."""
        self._checkpointer.stop()
        for _ in range(3):  # a flush that writes lines leaves their `done` for one more
            if self._conn is not None:
                self.flush()
        if self._flush_handle is not None:  # a retry that the last, stalled flush scheduled
            self._flush_handle.cancel()
            self._flush_handle = None
        # Unfinished tasks stay in the registry, unfinished, for the next start to recover.
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        self._conn = self._reader = None
        self._files.close()
        if self._owner_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(owners_dir(self.data_dir) / f"{self.owner}.lock")
            os.close(self._owner_fd)
            self._owner_fd = None

    # -- what the event loop calls -----------------------------------------------------------

    async def commit_intents(self, request: RequestRecord) -> None:
        """Durably record `request` and its queued tasks; returns after the group commit."""
        future = asyncio.get_running_loop().create_future()
        self._pending.intents.append(request)
        self._pending.waiters.append(future)
        self._schedule(0.0)
        await future

    def note_request(self, request: RequestRecord) -> None:
        """Record the request's status and response time at the next commit (not awaited)."""
        self._pending.request_notes[request.id] = request
        self._schedule(NOTE_WINDOW_S)

    def note_task(self, task: TaskRecord) -> None:
        """Record the task's current state at the next commit (not awaited)."""
        self._pending.task_notes[task.id] = task
        self._schedule(NOTE_WINDOW_S)

    def submit(self, task: TaskRecord, ended: Ended) -> None:
        """At the next group commit, claim an offset for the task's line, commit the claim,
        write the line and mark the task done; then call `ended(None)`, or `ended(error)`
        (OSError or RegistryError) if the line was not written. Lines submitted in turn are
        written in that order."""
        self._pending.appends.append((task, ended))
        self._schedule(0.0)

    def flush(self) -> None:
        """Commit (and write) whatever is pending now, without waiting for the loop."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._pending:
            self._flush()

    # -- reads (any thread that owns its own connection; the API uses the reader) ------------

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        conn = self._require(self._reader)
        row = conn.execute(
            f"SELECT {REQUEST_COLUMNS}, first_task, last_task FROM requests WHERE id = ?",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        result = dict(row)
        first, last = result.pop("first_task"), result.pop("last_task")
        tasks = conn.execute(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE pk BETWEEN ? AND ? AND request_id = ?"
            " ORDER BY pk",
            (first, last, request_id),
        )
        result["tasks"] = [dict(t) for t in tasks]
        return result

    def list_tasks(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        conn = self._require(self._reader)
        if status is None:
            rows = conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY rowid DESC LIMIT ?", (limit,)
            )
        else:
            rows = conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ? ORDER BY rowid DESC LIMIT ?",
                (status, limit),
            )
        return [dict(r) for r in rows]

    def count_unfinished(self) -> int:
        conn = self._require(self._reader)
        row = conn.execute(
            "SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')"
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _require(conn: sqlite3.Connection | None) -> sqlite3.Connection:
        if conn is None:
            raise RegistryError("the registry is not open")
        return conn

    # -- the group commit ----------------------------------------------------------------------

    def _schedule(self, within: float) -> None:
        """Make sure a flush runs within `within` seconds, but no sooner than COMMIT_GAP_S
        after the last one."""
        if self._flush_handle is not None and (self._flush_urgent or within >= NOTE_WINDOW_S):
            return  # hot path: what is scheduled is already as soon as this call could ask
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # closing, outside the loop: `close` flushes until nothing is pending
        due = max(loop.time() + within, self._last_flush + COMMIT_GAP_S)
        if self._flush_handle is not None:
            if self._flush_due <= due:
                return
            self._flush_handle.cancel()
        self._flush_due, self._flush_urgent = due, within == 0.0
        self._flush_handle = loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        with contextlib.suppress(RuntimeError):  # no loop while closing
            self._last_flush = asyncio.get_running_loop().time()
        batch, self._pending = self._pending, _Batch()
        try:
            self._cycle(batch)
        except Exception as exc:  # never leave a waiter hanging
            logger.exception("registry flush failed")
            error = RegistryError(f"task registry flush failed: {exc}")
            for future in batch.waiters:
                _settle(future, error)
            for _, ended in batch.appends:
                ended(error)
            self._keep_notes(batch)
            self._schedule(NOTE_WINDOW_S)

    def _cycle(self, batch: _Batch) -> None:
        conn = self._require(self._conn)
        by_file: dict[str, list[_Append]] = {}
        for task, ended in batch.appends:
            by_file.setdefault(task.file, []).append((task, ended))
        locked: list[tuple[str, int, list[_Append]]] = []
        claimed: list[int] = []
        try:
            # One fixed order across every process, or two workers can deadlock on the files.
            claimed_at = time.time()
            for name, items in sorted(by_file.items()):
                try:
                    fd, inode, offset = self._files.lock(name)
                except OSError as exc:
                    for _, ended in items:
                        ended(exc)
                    continue
                for task, _ in items:
                    task.inode, task.offset = inode, offset
                    offset += len(task.data)
                    if task.started_at is None:  # no delay: its write is its start
                        task.started_at = claimed_at
                locked.append((name, fd, items))
            try:
                claimed = self._commit(
                    conn, batch, [[task for task, _ in items] for _, _, items in locked]
                )
            except sqlite3.Error as exc:
                self._stalled(exc, batch, [item for _, _, items in locked for item in items])
                return
            self._stalled_since = None
            for request in batch.intents:
                request.accepted = True
            for future in batch.waiters:
                _settle(future, None)
            for _, fd, items in locked:
                _write_lines(fd, items)
        finally:
            for name, _, _ in locked:
                self._files.unlock(name)
            if claimed:
                # Every line of these claims has now ended, written or not (a failure is noted
                # by whoever `ended` reported it to): the claims end in the commit of those ends.
                self._pending.ended_claims.extend(claimed)
                for _, _, items in locked:
                    for task, _ in items:
                        if task.status == TaskStatus.DONE:
                            self._pending.task_notes[task.id] = task
                self._schedule(NOTE_WINDOW_S)

    def _stalled(self, exc: sqlite3.Error, batch: _Batch, appends: list[_Append]) -> None:
        """The commit failed (usually another process holds the lock): retry shortly, and after
        `lock_timeout` refuse the waiting intents and appends. State changes are never dropped."""
        now = time.monotonic()
        if self._stalled_since is None:
            self._stalled_since = now
            logger.warning("task registry busy (%s); retrying", exc)
        if now - self._stalled_since >= self.lock_timeout:
            error = RegistryError(f"task registry unavailable: {exc}")
            for future in batch.waiters:
                _settle(future, error)
            for _, ended in appends:
                ended(error)
            self._stalled_since = now
        else:
            pending = self._pending
            pending.intents[:0] = batch.intents
            pending.waiters[:0] = batch.waiters
            # Appends already refused (their file could not be opened) are not retried.
            pending.appends[:0] = appends
        self._keep_notes(batch)
        self._schedule(RETRY_S)

    def _keep_notes(self, batch: _Batch) -> None:
        """Carry an uncommitted batch's state changes over to the next one: they are never
        dropped (a claim left open would hold the prune's floor until the next start)."""
        for key, request in batch.request_notes.items():
            self._pending.request_notes.setdefault(key, request)
        for key, task in batch.task_notes.items():
            self._pending.task_notes.setdefault(key, task)
        self._pending.ended_claims.extend(batch.ended_claims)

    def _commit(
        self, conn: sqlite3.Connection, batch: _Batch, claims: list[list[TaskRecord]]
    ) -> list[int]:
        """One transaction: the intents, the request notes, a claim for each list of lines
        about to be written to one file, the task notes, the ended claims (and a prune).
        Returns the new claims' numbers."""
        intents, request_notes, task_notes = batch.intents, batch.request_notes, batch.task_notes
        conn.execute("BEGIN IMMEDIATE")
        try:
            if intents:
                # Keys are given here, not by SQLite, so that later updates can find each row
                # by it and a request's tasks are the keys first_task..last_task; the write
                # lock is held, so no other process takes the same ones.
                last = conn.execute("SELECT coalesce(max(pk), 0) FROM tasks").fetchone()[0]
                for pk, task in enumerate((t for r in intents for t in r.tasks), start=last + 1):
                    task.pk = pk
                conn.executemany(
                    # Sent at: not yet, the response waits for this commit (and binding None
                    # costs more than the write, see _update_tasks).
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
                    "INSERT INTO tasks (pk, id, request_id, seq, owner, file, line, status,"
                    " queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            t.pk,
                            t.id,
                            t.request_id,
                            t.seq,
                            self.owner,
                            t.file,
                            t.line,
                            t.status,
                            t.queued_at,
                        )
                        for r in intents
                        for t in r.tasks
                    ],
                )
            if request_notes:
                # A request whose tasks were accepted has had its row since their intents; any
                # other request is recorded now (in place of an earlier one with the same id).
                sent: list[tuple[Any, ...]] = []
                other: list[tuple[Any, ...]] = []
                for r in request_notes.values():
                    if r.accepted:
                        sent.append((r.response_sent_at, r.status_code, r.id))
                    else:
                        row = (r.id, r.method, r.path, r.received_at, r.response_sent_at)
                        other.append((*row, r.status_code))
                if sent:
                    conn.executemany(
                        "UPDATE requests SET response_sent_at = ?, status_code = ? WHERE id = ?",
                        sent,
                    )
                if other:
                    conn.executemany(
                        "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                        other,
                    )
            numbers = self._claim(conn, self.owner, claims) if claims else []
            if task_notes:
                self._update_tasks(conn, task_notes.values())
            if batch.ended_claims:
                # A claim is the prune's floor (see _oldest_open_claim) until it ends here, in
                # the commit of its tasks' ends.
                conn.executemany(
                    "UPDATE claims SET ended = 1 WHERE claim = ?",
                    [(claim,) for claim in batch.ended_claims],
                )
            self._since_prune += len(request_notes)  # each recorded request is noted once
            if self._since_prune >= self._prune_every:
                self._since_prune = 0
                self._prune(conn)
            conn.execute("COMMIT")
            return numbers
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _claim(conn: sqlite3.Connection, owner: str, claims: list[list[TaskRecord]]) -> list[int]:
        """Record each list of lines, placed one after another in one file from the first
        one's offset, as a claim numbered in the order claims are made. One row per file per
        commit, not a row update per line (~13,000 CPU instructions a line less)."""
        last = conn.execute("SELECT coalesce(max(claim), 0) FROM claims").fetchone()[0]
        rows = []
        for number, tasks in enumerate(claims, start=last + 1):
            for task in tasks:
                task.claim = number
            first = tasks[0]
            keys = _pack_keys([task.pk or 0 for task in tasks])
            rows.append((number, owner, first.file, first.inode, first.offset, keys))
        conn.executemany("INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, 0)", rows)
        return [row[0] for row in rows]

    @staticmethod
    def _update_tasks(conn: sqlite3.Connection, tasks: Iterable[TaskRecord]) -> None:
        """Store each task's state, one statement per shape.

        The common changes (started its delay, done) have statements of their own: binding a
        None costs the sqlite3 module a failed adapter lookup (~4,000 CPU instructions), more
        than the column write itself."""
        started: list[tuple[Any, ...]] = []
        done: list[tuple[Any, ...]] = []
        other: list[tuple[Any, ...]] = []
        for t in tasks:
            if t.error is None and t.started_at is not None:
                if t.status == TaskStatus.RUNNING and t.finished_at is None:
                    started.append((t.started_at, t.pk))
                    continue
                if t.status == TaskStatus.DONE and t.finished_at is not None:
                    done.append((t.started_at, t.finished_at, t.pk))
                    continue
            other.append((t.status, t.started_at, t.finished_at, t.error, t.pk))
        if started:
            conn.executemany(
                "UPDATE tasks SET status = 'running', started_at = ? WHERE pk = ?", started
            )
        if done:
            # Lines written together share their times (with no delay, the claim's and the
            # write's) and mostly follow each other's keys: one statement for each run of
            # consecutive keys (~4,000 CPU instructions a row less).
            runs: list[list[Any]] = []
            for started_at, finished_at, pk in done:
                run = runs[-1] if runs else None
                if run and run[3] == pk - 1 and run[0] == started_at and run[1] == finished_at:
                    run[3] = pk
                else:
                    runs.append([started_at, finished_at, pk, pk])
            conn.executemany(
                "UPDATE tasks SET status = 'done', started_at = ?, finished_at = ?"
                " WHERE pk BETWEEN ? AND ?",
                runs,
            )
        if other:
            conn.executemany(
                "UPDATE tasks SET status = ?, started_at = ?, finished_at = ?, error = ?"
                " WHERE pk = ?",
                other,
            )

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Keep the newest `retention` requests; older ones go once all their tasks ended.

        Requests and their tasks are keyed in the same order (both at the intent's commit), so
        the tasks of the requests past retention are the keys up to the newest one's last_task.
        Every statement goes by key, walking the rows past retention (the few it must keep
        among them too): the tasks table needs no index on request_id, which cost ~15 µs a
        request to keep. Ended claims go too, up to the oldest claim still open."""
        row = conn.execute(
            "SELECT rowid FROM requests ORDER BY rowid DESC LIMIT 1 OFFSET ?", (self.retention,)
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
            conn.execute(
                "DELETE FROM tasks WHERE pk <= ? AND status NOT IN ('queued', 'running')",
                (span[0],),
            )
        conn.execute(
            "DELETE FROM requests WHERE rowid <= ? AND (last_task IS NULL OR NOT EXISTS"
            " (SELECT 1 FROM tasks WHERE pk BETWEEN requests.first_task AND requests.last_task))",
            (cutoff,),
        )
        oldest = self._oldest_open_claim(conn)
        conn.execute(
            "DELETE FROM claims WHERE ended AND claim < ?",
            (oldest if oldest is not None else 1 << 62,),
        )

    @staticmethod
    def _oldest_open_claim(conn: sqlite3.Connection) -> int | None:
        """The oldest claim that has not ended, of any process (alive, or dead and not yet
        recovered). Recovery tells a lost line from a written one by the claims made after
        it, so the prune keeps every claim newer than this one. (The table holds the claims
        made since the last prune and those it kept: a scan is cheap.)"""
        row = conn.execute("SELECT min(claim) FROM claims WHERE NOT ended").fetchone()
        return None if row[0] is None else int(row[0])

    # -- crash recovery ----------------------------------------------------------------------

    def recover_dead_owners(self) -> list[TaskRecord]:
        """Finish the unfinished tasks of every process that no longer holds its owner lock.

        A task whose claimed bytes are already in the file is marked recovered without writing;
        a line cut short at the end of the file is completed; anything else is written now.
        """
        conn = self._require(self._conn)
        directory = owners_dir(self.data_dir)
        owners = {
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT owner FROM tasks WHERE status IN ('queued', 'running')"
            )
        }
        owners.update(path.stem for path in directory.glob("*.lock"))
        owners.discard(self.owner)
        recovered: list[TaskRecord] = []
        for owner in sorted(owners):
            path = directory / f"{owner}.lock"
            fd = _lock_owner_file(path, blocking=False)
            if fd is None:
                continue  # alive, or being recovered by a sibling worker
            try:
                recovered.extend(self._recover_owner(conn, owner))
                with contextlib.suppress(OSError):
                    os.unlink(path)
            finally:
                os.close(fd)
        return recovered

    def _recover_owner(self, conn: sqlite3.Connection, owner: str) -> list[TaskRecord]:
        rows = conn.execute(
            # Keys follow the order the intents were committed in: the order of the lines.
            "SELECT * FROM tasks WHERE owner = ? AND status IN ('queued', 'running') ORDER BY pk",
            (owner,),
        ).fetchall()
        tasks = [_task_from_row(row) for row in rows]
        _place_claimed(conn, owner, tasks)
        by_file: dict[str, list[TaskRecord]] = {}
        for task in tasks:
            by_file.setdefault(task.file, []).append(task)
        finished: list[TaskRecord] = []
        for name, file_tasks in by_file.items():
            try:
                finished.extend(self._recover_file(conn, owner, name, file_tasks))
            except OSError as exc:
                for task in file_tasks:
                    task.status = TaskStatus.FAILED
                    task.error = f"recovery failed: {_describe_error(exc)}"
                    task.finished_at = time.time()
                    finished.append(task)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE tasks SET status = ?, finished_at = ?, error = ? WHERE pk = ?",
            [(t.status, t.finished_at, t.error, t.pk) for t in finished],
        )
        conn.execute("UPDATE claims SET ended = 1 WHERE owner = ? AND NOT ended", (owner,))
        conn.execute("COMMIT")
        for task in finished:
            logger.warning(
                "recovered task %s of a stopped server: %s",
                task.describe(),
                task.status if task.error is None else task.error,
            )
        return finished

    def _recover_file(
        self, conn: sqlite3.Connection, owner: str, name: str, tasks: list[TaskRecord]
    ) -> list[TaskRecord]:
        fd, inode, size = self._files.lock(name)
        try:
            to_write: list[tuple[TaskRecord, int]] = []  # (task, bytes already present)
            complete: list[TaskRecord] = []
            for task in tasks:
                present = self._bytes_present(conn, fd, inode, size, task)
                if present == len(task.data):
                    complete.append(task)
                else:
                    to_write.append((task, present))
            # A line cut short can only be the last thing in the file: finish it first, in place.
            to_write.sort(key=lambda pair: pair[1] == 0)
            offset = size
            for task, present in to_write:
                task.inode = inode
                task.offset = offset - present
                offset += len(task.data) - present
            if to_write:
                # Claimed in the dead owner's name, so that if this process dies too, the next
                # recovery finds these claims (the latest claim of a task is the one it follows).
                conn.execute("BEGIN IMMEDIATE")
                self._claim(conn, owner, [[task for task, _ in to_write]])
                conn.execute("COMMIT")
            for task, present in to_write:
                rest = task.data[present:]
                if os.write(fd, rest) != len(rest):
                    raise OSError(f"short write while recovering {task.id}")
            now = time.time()
            for task in [*complete, *(task for task, _ in to_write)]:
                task.status, task.finished_at, task.error = TaskStatus.RECOVERED, now, None
            return [*complete, *(task for task, _ in to_write)]
        finally:
            self._files.unlock(name)

    @staticmethod
    def _bytes_present(
        conn: sqlite3.Connection, fd: int, inode: int, size: int, task: TaskRecord
    ) -> int:
        """How many leading bytes of the task's line are already where it claimed them."""
        if task.claim is None or task.offset is None or task.inode != inode:
            return 0
        later = conn.execute(
            "SELECT 1 FROM claims WHERE file = ? AND inode = ? AND claim > ? AND start <= ?"
            " LIMIT 1",
            (task.file, inode, task.claim, task.offset),
        ).fetchone()
        if later is not None:
            # A later claim found the file ending at or before this line's offset: this line
            # was not (all) there, and what is there now is someone else's.
            return 0
        found = os.pread(fd, len(task.data), task.offset)
        if found == task.data:
            return len(found)
        if found and task.data.startswith(found) and task.offset + len(found) == size:
            return len(found)
        return 0


@overload
def _lock_owner_file(path: Path, *, blocking: Literal[True]) -> int: ...
@overload
def _lock_owner_file(path: Path, *, blocking: Literal[False]) -> int | None: ...
def _lock_owner_file(path: Path, *, blocking: bool) -> int | None:
    """Open and exclusively lock an owner's lock file; None if another process holds it.

    A recoverer unlinks a dead owner's file while holding its lock, so a lock taken on a file
    that is no longer at `path` proves nothing: start again with the file that is there now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _task_from_row(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        id=row["id"],
        request_id=row["request_id"],
        seq=row["seq"],
        file=row["file"],
        line=row["line"],
        queued_at=row["queued_at"],
        status=TaskStatus(row["status"]),
        started_at=row["started_at"],
        data=row["line"].encode(),
        pk=row["pk"],
    )


def _pack_keys(keys: list[int]) -> str:
    """Task keys, in order, as runs: [4, 5, 6, 9] -> "4-6,9"."""
    runs: list[list[int]] = []
    for key in keys:
        if runs and runs[-1][1] == key - 1:
            runs[-1][1] = key
        else:
            runs.append([key, key])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def _unpack_keys(text: str) -> list[int]:
    keys: list[int] = []
    for run in text.split(","):
        first, _, last = run.partition("-")
        keys.extend(range(int(first), int(last or first) + 1))
    return keys


def _place_claimed(conn: sqlite3.Connection, owner: str, tasks: list[TaskRecord]) -> None:
    """Give each of a dead owner's unfinished tasks the place of its latest claim, if any:
    a claim's lines follow each other from its start, in the order of its keys."""
    by_key = {task.pk: task for task in tasks}
    claims = conn.execute(
        "SELECT claim, file, inode, start, tasks FROM claims WHERE owner = ? AND NOT ended"
        " ORDER BY claim",
        (owner,),
    ).fetchall()
    for claim, file, inode, start, keys in claims:
        offset = start
        for key in _unpack_keys(keys):
            task = by_key.get(key)
            if task is None:  # it ended: its line, written or not, still had its room
                row = conn.execute(
                    "SELECT line FROM tasks WHERE pk = ? AND owner = ? AND file = ?",
                    (key, owner, file),
                ).fetchone()
                if row is None:
                    break  # pruned: its length is unknown, so where the next lines went is too
                offset += len(row[0].encode())
                continue
            task.claim, task.inode, task.offset = claim, inode, offset
            offset += len(task.data)


def _create_or_migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a registry written by an older version up to date, in one
    transaction (sibling workers starting at once take turns)."""

    def run(script: str) -> None:  # executescript would commit first
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)

    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
        # The first three versions kept each line's claim on its task's row, and the first one
        # keyed tasks by their text id (one more B-tree to write per task). Each claim becomes
        # a claims row of its own, keyed as before: claims already made stay in their order.
        if "claim" in columns:
            key = "pk" if "pk" in columns else "rowid"
            conn.execute("ALTER TABLE tasks RENAME TO tasks_old")
            conn.execute("DROP INDEX IF EXISTS tasks_by_request")
            run(SCHEMA)
            conn.execute(
                f"INSERT INTO tasks SELECT {key}, id, request_id, seq, owner, file, line, status,"
                f" queued_at, started_at, finished_at, error FROM tasks_old ORDER BY {key}"
            )
            conn.execute(
                f"INSERT INTO claims SELECT claim, owner, file, inode, write_offset, {key},"
                " status NOT IN ('queued', 'running') FROM tasks_old WHERE claim IS NOT NULL"
            )
            conn.execute("DROP TABLE tasks_old")
            conn.execute("DROP TABLE IF EXISTS counters")
        # The first two versions found a request's tasks through an index on request_id.
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
        run(SCHEMA)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
