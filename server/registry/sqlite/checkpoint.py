"""The SQLite registry's WAL checkpoints, copied back into the database from a thread."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

logger = logging.getLogger("bgtasks.registry")


class Checkpointer:
    """Copies the WAL back into the database from a thread of its own, every `interval`
    seconds. SQLite would otherwise checkpoint inside a commit, on the event loop, stalling
    every request for the copy and its fsync.

    A passive checkpoint never waits, so under steady load a commit always lands while it
    copies and the WAL never starts over: it would grow for as long as the load lasts. So once
    the WAL holds more than `limit_pages` and a passive round has copied all of it, a RESTART
    checkpoint makes the next commit write it from the start. That one takes the write lock:
    commits wait while it copies what was committed since the passive round, syncs, and waits
    up to `timeout` for readers to leave the WAL. The file keeps its largest size, as shrinking
    it (TRUNCATE) would hold the write lock longer (docs/performance.md has the figures).
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
