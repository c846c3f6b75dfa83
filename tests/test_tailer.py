"""The file follower: `tail -F` behaviour on real files, and the server's events in between."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bgtasks_cli.sse import EventStream, Item, ServerEvent, StreamState
from bgtasks_cli.tailer import FILE_CHOICES, Tailer, TailEvent
from tests.helpers import free_port

WAIT = 5.0


class Follower:
    """Runs `Tailer.follow` in a thread and collects what it yields."""

    def __init__(self, tailer: Tailer) -> None:
        self.stop = threading.Event()
        self.events: queue.Queue[TailEvent] = queue.Queue()
        self.seen: list[TailEvent] = []
        self._thread = threading.Thread(target=self._run, args=(tailer,), daemon=True)
        self._thread.start()

    def _run(self, tailer: Tailer) -> None:
        for event in tailer.follow(self.stop):
            self.events.put(event)

    def until(self, match: Callable[[TailEvent], bool]) -> TailEvent:
        """Wait (up to WAIT seconds) for an event matching `match`; keep all seen ones."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching event; saw {self.seen}") from None
            self.seen.append(event)
            if match(event):
                return event

    def line(self, text: str, source: str | None = None) -> TailEvent:
        return self.until(
            lambda e: e.kind == "line" and e.text == text and source in (None, e.source)
        )

    def kind(self, kind: str, source: str) -> TailEvent:
        return self.until(lambda e: e.kind == kind and e.source == source)

    def close(self) -> float:
        """Stop following; return how long the thread took to finish."""
        started = time.monotonic()
        self.stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()
        return time.monotonic() - started


@pytest.fixture
def follow(tmp_path: Path) -> Iterator[Callable[..., Follower]]:
    followers: list[Follower] = []

    def start(
        files: tuple[str, ...] = FILE_CHOICES["all"], *, events: EventStream | None = None
    ) -> Follower:
        tailer = Tailer(tmp_path, files, events=events)
        tailer.initial()
        followers.append(Follower(tailer))
        return followers[-1]

    yield start
    for follower in followers:
        follower.close()


def append(path: Path, data: bytes | str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)


def test_backlog_gives_last_lines_in_file_order(tmp_path: Path) -> None:
    (tmp_path / "log.txt").write_text("".join(f"line {i}\n" for i in range(20)))
    (tmp_path / "README.md").write_text("# Title\n## A 框架精讲\n\n> intro\n## B 框架精讲")
    events = Tailer(tmp_path, FILE_CHOICES["all"], backlog=3).initial()
    assert [(e.source, e.text) for e in events] == [
        ("log.txt", "line 17"),
        ("log.txt", "line 18"),
        ("log.txt", "line 19"),
        ("README.md", ""),
        ("README.md", "> intro"),
        ("README.md", "## B 框架精讲"),
    ]
    assert {e.kind for e in events} == {"line"}
    assert Tailer(tmp_path, ("log.txt",), backlog=0).initial() == []
    assert len(Tailer(tmp_path, ("log.txt",), backlog=100).initial()) == 20


def test_backlog_skips_missing_files(tmp_path: Path) -> None:
    append(tmp_path / "log.txt", "only\n")
    assert [e.text for e in Tailer(tmp_path, FILE_CHOICES["all"]).initial()] == ["only"]


def test_appended_line_appears(tmp_path: Path, follow: Callable[..., Follower]) -> None:
    append(tmp_path / "log.txt", "old\n")
    follower = follow()
    append(tmp_path / "log.txt", "message to a@b.c\n")
    event = follower.line("message to a@b.c")
    assert event.source == "log.txt"
    assert all(e.text != "old" for e in follower.seen)


def test_partial_heading_shows_at_once_without_spurious_blank(
    tmp_path: Path, follow: Callable[..., Follower]
) -> None:
    readme = tmp_path / "README.md"
    append(readme, "# Title")
    follower = follow(("README.md",))
    append(readme, "\n## FastAPI 框架精讲")
    follower.line("## FastAPI 框架精讲")
    append(readme, "\n\n> intro text")
    follower.line("> intro text")
    append(readme, "\n## Django 框架精讲")
    follower.line("## Django 框架精讲")
    # The newline ending an already-shown line adds nothing; the intro's blank line is kept.
    assert [e.text for e in follower.seen] == [
        "## FastAPI 框架精讲",
        "",
        "> intro text",
        "## Django 框架精讲",
    ]


def test_truncation_then_new_line(tmp_path: Path, follow: Callable[..., Follower]) -> None:
    log = tmp_path / "log.txt"
    append(log, "one\ntwo\n")
    follower = follow(("log.txt",))
    os.truncate(log, 0)
    follower.kind("truncated", "log.txt")
    append(log, "after\n")
    follower.line("after", "log.txt")


def test_delete_then_recreate(tmp_path: Path, follow: Callable[..., Follower]) -> None:
    log = tmp_path / "log.txt"
    append(log, "one\n")
    follower = follow(("log.txt",))
    log.unlink()
    follower.kind("removed", "log.txt")
    append(log, "fresh\n")
    follower.kind("created", "log.txt")
    follower.line("fresh", "log.txt")


def test_replaced_file_is_followed_from_start(
    tmp_path: Path, follow: Callable[..., Follower]
) -> None:
    log = tmp_path / "log.txt"
    append(log, "one\n")
    follower = follow(("log.txt",))
    (tmp_path / "new.txt").write_text("first\nsecond\n")
    os.replace(tmp_path / "new.txt", log)
    follower.kind("created", "log.txt")
    follower.line("first")
    follower.line("second")


def test_file_created_after_start(tmp_path: Path, follow: Callable[..., Follower]) -> None:
    follower = follow()
    append(tmp_path / "README.md", "# Title\nbody\n")
    follower.kind("created", "README.md")
    follower.line("# Title", "README.md")
    follower.line("body", "README.md")


def test_utf8_split_across_writes(tmp_path: Path, follow: Callable[..., Follower]) -> None:
    readme = tmp_path / "README.md"
    append(readme, "")
    follower = follow(("README.md",))
    data = "héllo 框架\n".encode()
    cut = data.index("框".encode()) + 1
    append(readme, data[:cut])
    follower.line("héllo ")
    append(readme, data[cut:])
    follower.line("héllo 框架")
    assert all("\ufffd" not in e.text for e in follower.seen)


class FakeStream:
    """What the tailer asks of an event stream, fed by the test."""

    def __init__(self) -> None:
        self.items: queue.Queue[Item] = queue.Queue()
        self.started = self.closed = False

    def start(self) -> FakeStream:
        self.started = True
        return self

    def pending(self) -> bool:
        return not self.items.empty()

    def wait(self, timeout: float) -> list[Item]:
        out = []
        while not self.items.empty():
            out.append(self.items.get())
        return out

    def close(self) -> None:
        self.closed = True


def test_server_events_in_the_order_seen(tmp_path: Path, follow: Callable[..., Follower]) -> None:
    stream = FakeStream()
    follower = follow(events=stream)
    rid = "18ed3dec12345678" + "9fb9bac95447752a"

    def event(kind: str, task_id: str | None = None, **details: object) -> None:
        data = {"request_id": rid, "task_id": task_id, "at": 12.5, **details}
        stream.items.put(ServerEvent(kind, "c/0", data))

    event("request_received", method="POST", path="/send-notification/a@b.c")
    event("task_queued", "3f2a-1", file="log.txt")
    event("response_sent", status_code=200)
    sent = follower.until(lambda e: e.text.startswith("response sent"))
    assert sent.text == "response sent 200 POST /send-notification/a@b.c (req …5447752a)"
    assert (sent.source, sent.kind, sent.request_id, sent.at) == ("events", "event", rid, 12.5)
    event("task_started", "3f2a-1", attempt=1)
    follower.until(lambda e: e.text == "task 3f2a-1 started (attempt 1) -> log.txt")
    append(tmp_path / "log.txt", "message to a@b.c\n")
    follower.line("message to a@b.c", "log.txt")
    event("task_attempt_failed", "3f2a-1", attempt=1, error="disk full")
    event("task_done", "3f2a-1")
    done = follower.until(lambda e: e.text.startswith("task 3f2a-1 done"))
    assert done.text == "task 3f2a-1 done -> log.txt"
    assert (done.task_id, done.request_id) == ("3f2a-1", rid)
    texts = [e.text for e in follower.seen]
    assert texts.index("message to a@b.c") < texts.index(
        "task 3f2a-1 attempt 1 failed -> log.txt (disk full)"
    )
    stream.items.put(StreamState(up=False, reason="gone"))
    down = follower.kind("unavailable", "events")
    assert down.text == "gone"
    assert stream.started and not stream.closed
    follower.close()
    assert stream.closed


def test_stop_is_honoured_quickly(tmp_path: Path) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{free_port()}") as http:
        tailer = Tailer(tmp_path, FILE_CHOICES["all"], events=EventStream(http))
        follower = Follower(tailer)
        follower.kind("unavailable", "events")
        time.sleep(0.3)
        assert follower.close() < 2.0


def test_missing_data_dir_is_waited_for(tmp_path: Path) -> None:
    data_dir = tmp_path / "later"
    tailer = Tailer(data_dir, FILE_CHOICES["log"])
    assert tailer.initial() == []
    follower = Follower(tailer)
    data_dir.mkdir()
    append(data_dir / "log.txt", "hello\n")
    follower.line("hello", "log.txt")
    assert follower.close() < 2.0


def test_does_not_import_fastapi_or_uvicorn(tmp_path: Path) -> None:
    code = f"""
import sys, threading
from pathlib import Path
import httpx
from bgtasks_cli.sse import EventStream
from bgtasks_cli.tailer import Tailer
stop = threading.Event()
threading.Timer(0.3, stop.set).start()
http = httpx.Client(base_url="http://127.0.0.1:{free_port()}")
list(Tailer(Path({str(tmp_path)!r}), ("log.txt",), events=EventStream(http)).follow(stop))
print(sorted({{"fastapi", "uvicorn", "server.registry"}} & set(sys.modules)))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "[]"
