"""Follow the data directory's files like GNU `tail -F`, and optionally the server's events.

Nothing here prints: `Tailer` turns file and registry changes into `TailEvent`s for the CLI.
Changes are seen through inotify (watchfiles' Rust backend) tuned for a few milliseconds of
latency, with a periodic re-stat of every followed file in case an event is dropped.
"""

from __future__ import annotations

import codecs
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bgtasks_cli.ids import short_id
from server.paths import LOG_FILE, README_FILE, STATE_DIR, registry_path

FILE_CHOICES: dict[str, tuple[str, ...]] = {
    "log": (LOG_FILE,),
    "readme": (README_FILE,),
    "all": (LOG_FILE, README_FILE),
}

# watchfiles' defaults (1600/50 ms) cost ~100 ms per line; these cost ~2.5 ms.
DEBOUNCE_MS = 5
STEP_MS = 1
POLL_MS = 500
# Registry rows are committed a little after the fact and not in time order.
LOOKBACK_S = 5.0
_BLOCK = 1 << 16
_DB_NAMES = frozenset({"registry.db", "registry.db-wal"})


@dataclass(frozen=True, slots=True)
class TailEvent:
    """One thing the follower saw: a line, a notice about a file, or a server event. `at` is
    when it was seen; a `backlog` line was already there when the follower started."""

    at: float
    source: str
    kind: str
    text: str
    request_id: str | None = None
    task_id: str | None = None
    backlog: bool = False


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _line_start(buf: bytes, lines: int) -> int | None:
    """Where the last `lines` lines of `buf` start, or None if `buf` holds fewer."""
    ended = buf.endswith(b"\n")
    # An unended last line is always wanted: it is the partial line the follower continues.
    need = lines or (0 if ended else 1)
    end = len(buf) - 1 if ended else len(buf)
    for _ in range(need):
        end = buf.rfind(b"\n", 0, end)
        if end < 0:
            return None
    return end + 1


def _read_tail(fd: int, size: int, lines: int) -> bytes:
    """The last `lines` lines of the file's first `size` bytes, plus any unended last line."""
    pos, buf = size, b""
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        start = _line_start(buf, lines)
        if start is not None:
            return buf[start:]
    return buf


@dataclass(slots=True)
class _File:
    """A followed file: the open descriptor, how far it was read, and the line being built."""

    name: str
    path: Path
    fd: int | None = None
    ident: tuple[int, int] | None = None
    pos: int = 0
    decoder: codecs.IncrementalDecoder = field(default_factory=_decoder)
    pending: str = ""
    # Whether `pending` holds text (or a line start) not yet given out as a "line" event.
    unshown: bool = True

    def open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return False
        self.fd, self.ident = fd, (st.st_ino, st.st_dev)
        self.restart()
        return True

    def restart(self) -> None:
        self.pos, self.pending, self.unshown = 0, "", True
        self.decoder = _decoder()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.ident = None

    def drain(self) -> list[str]:
        """Read to the end of the file and return the lines (or partial last line) to show."""
        assert self.fd is not None
        chunks = []
        while data := os.pread(self.fd, _BLOCK, self.pos):
            self.pos += len(data)
            chunks.append(data)
        return self.feed(self.decoder.decode(b"".join(chunks))) if chunks else []

    def feed(self, text: str) -> list[str]:
        *ended, rest = text.split("\n")
        out = []
        for piece in ended:
            self.pending += piece
            # A newline that only ends an already-shown partial line adds nothing to show.
            if piece or self.unshown:
                out.append(self.pending)
            self.pending, self.unshown = "", True
        if rest:
            self.pending += rest
            out.append(self.pending)
            self.unshown = False
        return out


class Tailer:
    """Follow `files` (names in `data_dir`) like `tail -F`, optionally with server events."""

    def __init__(
        self, data_dir: Path, files: Sequence[str], *, backlog: int = 10, events: bool = False
    ) -> None:
        if any(Path(name).name != name for name in files):
            raise ValueError(f"file names must be plain names in the data directory: {files}")
        self.data_dir = Path(data_dir)
        self.backlog = max(0, backlog)
        self.events = events
        self._files = [_File(name, self.data_dir / name) for name in files]
        self._since: float | None = None
        self._db: sqlite3.Connection | None = None
        self._seen: dict[tuple[str, str], float] = {}

    def initial(self) -> list[TailEvent]:
        """The last `backlog` lines of each existing file; the follower then starts at their end."""
        return self._start(self.backlog)

    def _start(self, backlog: int) -> list[TailEvent]:
        self._since = time.time()
        out: list[TailEvent] = []
        for f in self._files:
            if not f.open():
                continue
            assert f.fd is not None
            size = os.fstat(f.fd).st_size
            *lines, f.pending = (
                _read_tail(f.fd, size, backlog).decode("utf-8", "replace").split("\n")
            )
            f.pos = size
            # A partial last line counts as shown even with no backlog: its end adds nothing.
            f.unshown = not f.pending
            if backlog:
                shown = [*lines, f.pending] if f.pending else lines
                out += self._events(f.name, [("line", line) for line in shown], backlog=True)
        return out

    def follow(self, stop: threading.Event) -> Iterator[TailEvent]:
        """Yield new lines, file notices and server events until `stop` is set.

        Follows from where `initial` left off (from the current ends if it was not called).
        A tailer follows once: its files are closed when this generator ends.
        """
        # Imported here and in `_server_events`, not at the top: watchfiles and the registry
        # (asyncio) cost ~90 ms, which importing this module just for its names should not pay.
        from watchfiles._rust_notify import RustNotify

        if self._since is None:
            self._start(0)
        try:
            while not stop.is_set():
                dirs = self._watch_dirs()
                if not dirs:
                    # Nothing to watch until the data directory exists.
                    yield from self._check(None)
                    stop.wait(POLL_MS / 1000)
                    continue
                try:
                    watcher = RustNotify([str(d) for d, _ in dirs], False, False, 0, False, True)
                except FileNotFoundError:
                    continue
                with watcher:
                    # Checking once the watch is in place catches what changed before it was.
                    yield from self._check(None)
                    while True:
                        raw = watcher.watch(DEBOUNCE_MS, STEP_MS, POLL_MS, stop)
                        if raw == "stop":
                            return
                        if raw == "signal":
                            raise KeyboardInterrupt
                        names = None if raw == "timeout" else {os.path.basename(p) for _, p in raw}
                        yield from self._check(names)
                        if stop.is_set() or self._watch_dirs() != dirs:
                            break
        finally:
            for f in self._files:
                f.close()
            if self._db is not None:
                self._db.close()
                self._db = None

    def _watch_dirs(self) -> list[tuple[Path, int]]:
        dirs = [self.data_dir, self.data_dir / STATE_DIR] if self.events else [self.data_dir]
        found = []
        for d in dirs:
            try:
                st = os.stat(d)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                found.append((d, st.st_ino))
        return found

    def _check(self, names: set[str] | None) -> Iterator[TailEvent]:
        for f in self._files:
            if names is None or f.name in names:
                yield from self._check_file(f)
        if self.events and (names is None or names & _DB_NAMES):
            yield from self._server_events()

    def _check_file(self, f: _File) -> list[TailEvent]:
        out: list[tuple[str, str]] = []
        try:
            st: os.stat_result | None = os.stat(f.path)
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            st = None
        replaced = False
        if f.fd is not None:
            same = st is not None and (st.st_ino, st.st_dev) == f.ident
            if same and st is not None and st.st_size < f.pos:
                out.append(("truncated", "file truncated"))
                f.restart()
            out += [("line", line) for line in f.drain()]
            if same:
                return self._events(f.name, out)
            f.close()
            if st is None:
                out.append(("removed", "file removed"))
                return self._events(f.name, out)
            replaced = True
        elif st is None:
            return []
        if f.open():
            out.append(
                ("created", "file replaced; following the new file" if replaced else "file created")
            )
            out += [("line", line) for line in f.drain()]
        return self._events(f.name, out)

    @staticmethod
    def _events(
        source: str, items: list[tuple[str, str]], *, backlog: bool = False
    ) -> list[TailEvent]:
        now = time.time()
        return [TailEvent(now, source, kind, text, backlog=backlog) for kind, text in items]

    def _server_events(self) -> list[TailEvent]:
        """New request and task events from the registry, each given once."""
        now = time.time()
        since = max(self._since or now, now - LOOKBACK_S)
        try:
            if self._db is None:
                path = registry_path(self.data_dir)
                if not path.exists():
                    return []
                from server.registry import connect

                self._db = connect(path, readonly=True)
            requests = self._db.execute(
                "SELECT id, method, path, received_at, response_sent_at, status_code FROM requests"
                " WHERE received_at >= ?1 OR response_sent_at >= ?1",
                (since,),
            ).fetchall()
            tasks = self._db.execute(
                "SELECT id, request_id, file, line, status, started_at, finished_at, last_error"
                " FROM tasks WHERE started_at >= ?1 OR finished_at >= ?1",
                (since,),
            ).fetchall()
        except sqlite3.Error:
            # Not created yet, or replaced under us: reopen on the next look.
            if self._db is not None:
                self._db.close()
            self._db = None
            return []
        found: list[TailEvent] = []

        def add(key: str, at: float | None, text: str, req: str, task: str | None = None) -> None:
            if at is not None and at >= since and (key, task or req) not in self._seen:
                self._seen[key, task or req] = at
                found.append(TailEvent(at, "server", "event", text, req, task))

        for r in requests:
            where = f"{r['method']} {r['path']} (req {short_id(r['id'])})"
            add("received", r["received_at"], f"request received {where}", r["id"])
            add("sent", r["response_sent_at"], f"response sent {r['status_code']} {where}", r["id"])
        for t in tasks:
            what = f"{t['line']!r} -> {t['file']}"
            add(
                "started",
                t["started_at"],
                f"task {t['id']} started: {what}",
                t["request_id"],
                t["id"],
            )
            error = f" ({t['last_error']})" if t["last_error"] else ""
            text = f"task {t['id']} {t['status']}: {what}{error}"
            add("finished", t["finished_at"], text, t["request_id"], t["id"])
        # Rows older than the look-back window are never queried again, so forget them.
        self._seen = {k: at for k, at in self._seen.items() if at >= since}
        return sorted(found, key=lambda e: e.at)
