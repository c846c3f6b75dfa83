"""Follow the data directory's files like GNU `tail -F`, and optionally the server's events.

Nothing here prints: `Tailer` turns file changes and the server's events (`GET /events`, read
by bgtasks_cli.sse) into `TailEvent`s for the CLI, in the order it saw them. Changes are seen
through inotify (watchfiles' Rust backend) tuned for a few milliseconds of latency, with a
periodic re-stat of every followed file in case an event is dropped; a server event wakes the
watch at once.
"""

from __future__ import annotations

import codecs
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bgtasks_cli.ids import short_id
from server.paths import LOG_FILE, README_FILE

if TYPE_CHECKING:
    from bgtasks_cli.sse import EventStream, Item

FILE_CHOICES: dict[str, tuple[str, ...]] = {
    "log": (LOG_FILE,),
    "readme": (README_FILE,),
    "all": (LOG_FILE, README_FILE),
}

# watchfiles' defaults (1600/50 ms) cost ~100 ms per line; these cost ~2.5 ms.
DEBOUNCE_MS = 5
STEP_MS = 1
POLL_MS = 500
EVENTS = "events"  # the source of the server's events
_BLOCK = 1 << 16
_REMEMBERED = 10_000  # requests and tasks whose path or file later events are named with


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


class _Wake:
    """What ends a wait of the watch: `stop`, or a server event waiting to be given out."""

    def __init__(self, stop: threading.Event, events: EventStream | None) -> None:
        self.stop, self.events = stop, events

    def is_set(self) -> bool:
        return self.stop.is_set() or (self.events is not None and self.events.pending())


class Tailer:
    """Follow `files` (names in `data_dir`) like `tail -F`, optionally with the server's
    events from `events` (a stream not yet started: `follow` starts and closes it)."""

    def __init__(
        self,
        data_dir: Path,
        files: Sequence[str],
        *,
        backlog: int = 10,
        events: EventStream | None = None,
    ) -> None:
        if any(Path(name).name != name for name in files):
            raise ValueError(f"file names must be plain names in the data directory: {files}")
        self.data_dir = Path(data_dir)
        self.backlog = max(0, backlog)
        self.events = events
        self._files = [_File(name, self.data_dir / name) for name in files]
        self._since: float | None = None
        self._requests: dict[str, str] = {}  # request id: "METHOD /path"
        self._task_files: dict[str, str] = {}  # task id: the file it writes

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
        A tailer follows once: its files and its event stream are closed when this ends.
        """
        # Imported here, not at the top: watchfiles costs time that importing this module
        # just for its names should not pay.
        from watchfiles._rust_notify import RustNotify

        if self._since is None:
            self._start(0)
        if self.events is not None:
            self.events.start()
        wake = _Wake(stop, self.events)
        try:
            while not stop.is_set():
                dirs = self._watch_dirs()
                if not dirs:
                    # Nothing to watch until the data directory exists.
                    yield from self._check(None)
                    _wait(wake, POLL_MS / 1000)
                    continue
                try:
                    watcher = RustNotify([str(d) for d, _ in dirs], False, False, 0, False, True)
                except FileNotFoundError:
                    continue
                with watcher:
                    # Checking once the watch is in place catches what changed before it was.
                    yield from self._check(None)
                    while True:
                        raw = watcher.watch(DEBOUNCE_MS, STEP_MS, POLL_MS, wake)
                        if stop.is_set():
                            return
                        if raw == "signal":
                            raise KeyboardInterrupt
                        names = (
                            None
                            if raw == "timeout"
                            else set()
                            if raw == "stop"  # woken by a server event
                            else {os.path.basename(p) for _, p in raw}
                        )
                        yield from self._check(names)
                        if stop.is_set() or self._watch_dirs() != dirs:
                            break
        finally:
            for f in self._files:
                f.close()
            if self.events is not None:
                self.events.close()

    def _watch_dirs(self) -> list[tuple[Path, int]]:
        try:
            st = os.stat(self.data_dir)
        except OSError:
            return []
        return [(self.data_dir, st.st_ino)] if stat.S_ISDIR(st.st_mode) else []

    def _check(self, names: set[str] | None) -> Iterator[TailEvent]:
        for f in self._files:
            if names is None or f.name in names:
                yield from self._check_file(f)
        if self.events is not None:
            for item in self.events.wait(0):
                yield self._server_event(item)

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

    def _server_event(self, item: Item) -> TailEvent:
        """A server event, or news of the stream, as the follower shows it."""
        from bgtasks_cli.sse import StreamState

        now = time.time()
        if isinstance(item, StreamState):
            if item.up:
                return TailEvent(now, EVENTS, "connected", "following the server's events again")
            return TailEvent(now, EVENTS, "unavailable", item.reason)
        data = item.data
        rid, task_id = str(data.get("request_id") or ""), data.get("task_id")
        at = data.get("at")
        at = float(at) if isinstance(at, int | float) else now
        text = self._event_text(item.kind, data, rid, task_id)
        return TailEvent(at, EVENTS, "event", text, rid or None, task_id)

    def _event_text(self, kind: str, data: dict[str, Any], rid: str, task_id: str | None) -> str:
        if len(self._requests) > _REMEMBERED or len(self._task_files) > _REMEMBERED:
            self._requests.clear()
            self._task_files.clear()
        req = f"(req {short_id(rid)})"
        if kind == "request_received":
            self._requests[rid] = f"{data.get('method')} {data.get('path')}"
        if task_id is None:
            where = " ".join(filter(None, (self._requests.get(rid), req)))
            if kind == "request_received":
                return f"request received {where}"
            if kind == "response_sent":
                return f"response sent {data.get('status_code')} {where}"
            return f"{kind.replace('_', ' ')} {where}"
        if kind == "task_queued" and data.get("file"):
            self._task_files[task_id] = str(data["file"])
        file = self._task_files.get(task_id)
        to = f" -> {file}" if file else ""
        error = f" ({data['error']})" if data.get("error") else ""
        if kind == "task_queued":
            return f"task {task_id} queued{to} {req}"
        if kind == "task_started":
            return f"task {task_id} started (attempt {data.get('attempt')}){to}"
        if kind == "task_attempt_failed":
            return f"task {task_id} attempt {data.get('attempt')} failed{to}{error}"
        if kind.startswith("task_"):
            return f"task {task_id} {kind.removeprefix('task_')}{to}{error}"
        return f"{kind.replace('_', ' ')} task {task_id}{to}{error}"


def _wait(wake: _Wake, seconds: float) -> None:
    """Wait up to `seconds`, or until `wake` is set."""
    deadline = time.monotonic() + seconds
    while not wake.is_set() and time.monotonic() < deadline:
        time.sleep(STEP_MS / 1000)
