"""The claims protocol's rules (docs/protocol.md), one test named after each, on real files
and a real SQLite registry."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import sqlite3
import stat
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest

from server.paths import owners_dir, registry_path
from server.records import RequestRecord, TaskRecord
from server.registry.batch import NOTE_WINDOW_S
from server.registry.files import DataFiles
from server.registry.sqlite.prune import oldest_open_claim, prune
from server.status import TaskStatus
from tests.helpers import LiveServer
from tests.registry_helpers import (
    add_claim,
    add_task,
    append,
    make_db,
    one_line_request,
    recover,
    sqlite_registry,
    status_of,
)

LINE = "message to a@example.com\n"


def test_rule_1_a_request_s_tasks_are_recorded_before_its_response(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(delay=5.0)
    response = httpx.post(f"{live.url}/send-notification/a@example.com", params={"q": "hi"})
    # The response is in hand: its tasks must already be in the registry's file.
    conn = sqlite3.connect(f"file:{registry_path(live.data_dir)}?mode=ro", uri=True)
    rows = conn.execute(
        "SELECT line, status FROM tasks WHERE request_id = ? ORDER BY pk",
        (response.headers["x-request-id"],),
    ).fetchall()
    conn.close()
    assert [line for line, _ in rows] == ["found query: hi\n", LINE]
    assert all(status in ("queued", "running") for _, status in rows)


def test_rule_2_a_line_is_written_only_under_a_committed_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = sqlite_registry(tmp_path)
    seen: list[list[tuple[int, int, str]]] = []
    real_write = os.write

    def write_and_look(fd: int, data: bytes) -> int:
        # What another process would find in the registry at the moment of the write.
        conn = sqlite3.connect(f"file:{registry_path(tmp_path)}?mode=ro", uri=True)
        seen.append(conn.execute("SELECT start, ended, tasks FROM claims").fetchall())
        conn.close()
        return real_write(fd, data)

    async def run() -> None:
        await registry.open()
        request = one_line_request("r1", LINE)
        await registry.commit_intents(request)
        monkeypatch.setattr("server.registry.files.os.write", write_and_look)
        await append(registry, request.tasks[0])
        monkeypatch.setattr("server.registry.files.os.write", real_write)
        await registry.close()

    asyncio.run(run())
    assert seen == [[(0, 0, "[1]")]]  # claimed from offset 0 for task key 1, not yet ended
    assert (tmp_path / "log.txt").read_text() == LINE


def test_rule_3_one_commit_claims_each_file_once_with_its_lines_back_to_back(
    tmp_path: Path,
) -> None:
    (tmp_path / "README.md").write_bytes(b"# notes\n")
    registry = sqlite_registry(tmp_path)
    first = RequestRecord("r1", "POST", "/x", 1.0)
    second = RequestRecord("r2", "POST", "/x", 2.0)
    for request, file, line in [
        (first, "log.txt", "found query: a\n"),
        (first, "README.md", "intro\n"),
        (first, "log.txt", LINE),
        (second, "log.txt", "message to b@example.com\n"),
    ]:
        task_id = f"{request.id}-{len(request.tasks)}"
        task = TaskRecord(task_id, request.id, len(request.tasks), file, line, 1.0)
        task.data = line.encode()
        request.tasks.append(task)
    ends: list[BaseException | None] = []

    async def run() -> None:
        await registry.open()
        await registry.commit_intents(first)
        await registry.commit_intents(second)
        # submitted in this order, not in key order: written in this order
        for task in [second.tasks[0], *first.tasks]:
            registry.submit(task, ends.append)
        await registry.flush()
        await registry.close()

    asyncio.run(run())
    assert ends == [None] * 4
    conn = make_db(tmp_path)
    claims = conn.execute("SELECT file, start, tasks, ended FROM claims ORDER BY claim").fetchall()
    assert claims == [("README.md", 8, "[2]", 1), ("log.txt", 0, "[4,1,3]", 1)]
    assert (tmp_path / "log.txt").read_bytes() == (
        b"message to b@example.com\nfound query: a\nmessage to a@example.com\n"
    )
    rows = conn.execute("SELECT status, started_at IS NOT NULL FROM tasks").fetchall()
    assert rows == [("done", 1)] * 4


def test_rule_4_a_short_write_keeps_the_whole_lines_and_cuts_off_the_part_of_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = sqlite_registry(tmp_path)
    lines = ["found query: a\n", LINE, "found query: b\n", "x\n"]
    request = RequestRecord("r1", "POST", "/x", 1.0)
    for n, line in enumerate(lines):
        request.tasks.append(TaskRecord(f"t{n}", "r1", n, "log.txt", line, 1.0, data=line.encode()))
    ends: list[BaseException | None] = []
    real_write = os.write

    def disk_fills_up(fd: int, data: bytes) -> int:  # room for the first line and 3 bytes
        return real_write(fd, data[: len(lines[0]) + 3])

    async def run() -> None:
        await registry.open()
        await registry.commit_intents(request)
        monkeypatch.setattr("server.registry.files.os.write", disk_fills_up)
        for task in request.tasks[:3]:
            registry.submit(task, ends.append)
        await registry.flush()
        monkeypatch.setattr("server.registry.files.os.write", real_write)
        await append(registry, request.tasks[3])
        await registry.close()

    asyncio.run(run())
    assert ends[0] is None
    tried = sum(len(line) for line in lines[:3])
    assert [str(e) for e in ends[1:]] == [f"short write: {len(lines[0]) + 3} of {tried} bytes"] * 2
    assert (tmp_path / "log.txt").read_text() == "found query: a\nx\n"
    # (marking the two failed is the runner's part, on hearing of the error)
    done, queued = TaskStatus.DONE, TaskStatus.QUEUED
    assert [t.status for t in request.tasks] == [done, queued, queued, done]


def test_rule_5_a_claim_ends_in_the_commit_of_its_tasks_ends(tmp_path: Path) -> None:
    registry = sqlite_registry(tmp_path, retention=10)
    request = one_line_request("r1", LINE)
    floors: list[int | None] = []
    reader = make_db(tmp_path)

    async def run() -> None:
        await registry.open()
        floors.append(oldest_open_claim(reader))
        await registry.commit_intents(request)
        await append(registry, request.tasks[0])  # claimed and written; `done` rides a later commit
        floors.append(oldest_open_claim(reader))
        assert status_of(reader, "r1-t") == "queued"
        await asyncio.wait_for(registry.committed.wait(), NOTE_WINDOW_S * 20)  # the next commit
        floors.append(oldest_open_claim(reader))
        await registry.close()

    asyncio.run(run())
    assert request.tasks[0].claim is not None
    assert floors == [None, request.tasks[0].claim, None]  # open until the end is committed
    assert status_of(reader, "r1-t") == "done"


def test_rule_6_the_tasks_of_a_live_owner_are_left_alone(tmp_path: Path) -> None:
    conn = make_db(tmp_path)
    add_task(conn, "t1", "found query: a\n", owner="alive", status="queued")
    owners_dir(tmp_path).mkdir(parents=True)
    fd = os.open(owners_dir(tmp_path) / "alive.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert recover(tmp_path) == []
        assert status_of(conn, "t1") == "queued"
    finally:
        os.close(fd)  # the owner dies
    assert recover(tmp_path) == ["t1"]


def test_rule_7_a_claim_s_line_that_ended_still_takes_its_room(tmp_path: Path) -> None:
    """Keys 1-3 from offset 0: the first line's task is done, the second landed, the third
    did not. The done line's length places the others."""
    lines = ["found query: a\n", LINE, "found query: b\n"]
    log = tmp_path / "log.txt"
    log.write_bytes("".join(lines[:2]).encode())
    conn = make_db(tmp_path)
    keys = [
        add_task(conn, "t1", lines[0], status="done"),
        add_task(conn, "t2", lines[1], seq=1),
        add_task(conn, "t3", lines[2], seq=2),
    ]
    add_claim(conn, 1, keys, inode=log.stat().st_ino, start=0)
    assert recover(tmp_path) == ["t2", "t3"]
    assert log.read_bytes() == "".join(lines).encode()


def test_rule_8_identical_bytes_from_a_later_claim_do_not_count(tmp_path: Path) -> None:
    """t1 (owner "dead") claimed offset 0 and never wrote; t2, another owner's task with the
    same bytes, then claimed offset 0 and wrote its line there."""
    log = tmp_path / "log.txt"
    log.write_bytes(LINE.encode())
    inode = log.stat().st_ino
    conn = make_db(tmp_path)
    add_task(conn, "t1", LINE, inode=inode, offset=0, claim=1)
    add_task(conn, "t2", LINE, owner="other", status="done", inode=inode, offset=0, claim=2)
    assert recover(tmp_path) == ["t1"]
    assert log.read_bytes() == LINE.encode() * 2


def test_rule_8_a_later_claim_that_started_before_a_line_means_the_line_is_not_there(
    tmp_path: Path,
) -> None:
    """The dead owner claimed "aa" and "bb" from offset 0 and wrote nothing; another owner's
    later claim, also from 0, wrote "xx" and "bb". The "bb" at offset 3 is not the dead one's."""
    log = tmp_path / "log.txt"
    log.write_bytes(b"xx\nbb\n")
    inode = log.stat().st_ino
    conn = make_db(tmp_path)
    keys = [add_task(conn, "t1", "aa\n"), add_task(conn, "t2", "bb\n", seq=1)]
    add_claim(conn, 1, keys, inode=inode, start=0)
    add_claim(conn, 2, [keys[1] + 1, keys[1] + 2], owner="other", inode=inode, start=0, ended=True)
    assert recover(tmp_path) == ["t1", "t2"]
    assert log.read_bytes() == b"xx\nbb\naa\nbb\n"


def test_rule_9_a_line_cut_short_at_the_end_of_the_file_is_completed(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\nmessage to a@ex")
    conn = make_db(tmp_path)
    add_task(conn, "t1", LINE, inode=log.stat().st_ino, offset=8, claim=1)
    add_task(conn, "t2", "found query: b\n", status="queued", seq=1)
    assert recover(tmp_path) == ["t1", "t2"]
    assert log.read_bytes() == b"earlier\nmessage to a@example.com\nfound query: b\n"


def test_rule_10_a_recovery_that_died_after_writing_is_not_written_again(tmp_path: Path) -> None:
    """The dead owner claimed offset 8 (claim 1) and never wrote; another owner then wrote
    there (claim 2); the dead owner's recoverer claimed the end of the file in its name
    (claim 3), wrote the line, and died before marking it."""
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n" + b"someone\n" + LINE.encode())
    inode = log.stat().st_ino
    conn = make_db(tmp_path)
    key = add_task(conn, "t1", LINE, inode=inode, offset=8, claim=1)
    add_task(conn, "s1", "someone\n", owner="other", status="done", inode=inode, offset=8, claim=2)
    add_claim(conn, 3, [key], inode=inode, start=16)
    assert recover(tmp_path) == ["t1"]
    assert log.read_bytes() == b"earlier\nsomeone\n" + LINE.encode()


def test_rule_10_a_recovery_that_meets_a_full_disk_records_nothing_and_the_next_writes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead owner claimed two lines and wrote the first; its recoverer finds the disk
    full: it must not call the lines failed (a retry would write the first again), and the
    recovery after it writes the second, once."""
    log = tmp_path / "log.txt"
    log.write_bytes(b"one\n")
    inode = log.stat().st_ino
    conn = make_db(tmp_path)
    add_task(conn, "t1", "one\n", inode=inode, offset=0, claim=1)
    add_task(conn, "t2", "two\n", inode=inode, offset=4, claim=2)

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("server.registry.recovery.os.write", full)
    assert recover(tmp_path, owner="first") == []
    assert [status_of(conn, "t1"), status_of(conn, "t2")] == ["running", "running"]
    assert log.read_bytes() == b"one\n"
    monkeypatch.undo()
    assert recover(tmp_path, owner="second") == ["t1", "t2"]
    assert log.read_bytes() == b"one\ntwo\n"
    assert [status_of(conn, "t1"), status_of(conn, "t2")] == ["recovered", "recovered"]


def test_rule_11_a_dead_owner_s_unclaimed_tasks_are_adopted_and_written_once(
    tmp_path: Path,
) -> None:
    conn = make_db(tmp_path)
    add_task(conn, "t1", "found query: a\n", status="queued")
    add_task(conn, "t2", LINE, status="running", seq=1)  # asleep in its delay: never claimed
    assert recover(tmp_path) == ["t1", "t2"]
    assert (tmp_path / "log.txt").read_bytes() == b"found query: a\nmessage to a@example.com\n"
    rows = conn.execute("SELECT owner, status FROM tasks ORDER BY pk").fetchall()
    assert rows == [("fresh", "recovered")] * 2  # the adopter's, and marked as recovered
    assert recover(tmp_path, owner="again") == []  # nothing left to do
    assert (tmp_path / "log.txt").read_bytes().count(b"\n") == 2


def test_rule_12_pruning_keeps_the_claims_recovery_still_needs(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(LINE.encode())
    inode = log.stat().st_ino
    conn = make_db(tmp_path)
    add_task(conn, "t1", LINE, inode=inode, offset=0, claim=1)  # dead, never wrote
    add_task(conn, "t2", LINE, owner="other", status="done", inode=inode, offset=0, claim=2)
    for n in range(30):  # newer requests push t2's request past retention
        conn.execute(
            "INSERT INTO requests VALUES (?, 'POST', '/x', 2.0, 2.1, 200, NULL, NULL)", (f"new{n}",)
        )
    conn.execute("BEGIN IMMEDIATE")
    prune(conn, retention=10)
    conn.execute("COMMIT")
    # t2's row went with its request; its claim stays: t1's recovery depends on it
    assert conn.execute("SELECT count(*) FROM tasks WHERE id = 't2'").fetchone()[0] == 0
    assert conn.execute("SELECT claim FROM claims ORDER BY claim").fetchall() == [(1,), (2,)]
    recover(tmp_path)
    assert log.read_bytes() == LINE.encode() * 2


def test_rule_13_a_task_is_adopted_once_whoever_tries(tmp_path: Path) -> None:
    conn = make_db(tmp_path)
    add_task(conn, "t1", LINE, status="queued")

    async def adopt_twice() -> tuple[int, int]:
        first, second = sqlite_registry(tmp_path, "one"), sqlite_registry(tmp_path, "two")
        await first.store.open("one")
        await second.store.open("two")
        work = await first.store.dead_owner_work("dead")
        moved = [
            await first.store.adopt(work.tasks, "dead", "one"),
            await second.store.adopt(work.tasks, "dead", "two"),
        ]
        await first.store.close()
        await second.store.close()
        return len(moved[0]), len(moved[1])

    assert asyncio.run(adopt_twice()) == (1, 0)
    assert conn.execute("SELECT owner FROM tasks").fetchall() == [("one",)]


# -- around the rules -----------------------------------------------------------------------


def test_a_line_already_at_its_claimed_offset_is_not_written_again(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n" + LINE.encode())
    conn = make_db(tmp_path)
    add_task(conn, "t1", LINE, inode=log.stat().st_ino, offset=8, claim=1)
    assert recover(tmp_path) == ["t1"]
    assert log.read_bytes() == b"earlier\n" + LINE.encode()
    assert status_of(conn, "t1") == "recovered"


def test_a_claimed_line_that_never_landed_is_written(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n")
    conn = make_db(tmp_path)
    add_task(conn, "t1", LINE, inode=log.stat().st_ino, offset=8, claim=1)
    recover(tmp_path)
    assert log.read_bytes() == b"earlier\n" + LINE.encode()


def test_a_replaced_file_gets_the_line(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(LINE.encode())
    conn = make_db(tmp_path)
    add_task(conn, "t1", LINE, inode=log.stat().st_ino + 1, offset=0, claim=1)
    recover(tmp_path)
    assert log.read_bytes() == LINE.encode() * 2


def test_a_claim_s_lines_are_placed_one_after_another_and_only_the_missing_ones_written(
    tmp_path: Path,
) -> None:
    """One claim of three lines (keys 1, 3 and 4: key 2 is another file's) from offset 8:
    the first landed whole, the second in part, the third not at all."""
    lines = ["found query: a\n", LINE, "found query: b\n"]
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n" + lines[0].encode() + b"message to")
    conn = make_db(tmp_path)
    keys = [add_task(conn, "t1", lines[0])]
    add_task(conn, "other", "x\n", file="README.md", status="queued")
    keys += [add_task(conn, "t2", lines[1], seq=1), add_task(conn, "t3", lines[2], seq=2)]
    add_claim(conn, 7, keys, inode=log.stat().st_ino, start=8)
    assert sorted(recover(tmp_path)) == ["other", "t1", "t2", "t3"]
    assert log.read_bytes() == b"earlier\n" + "".join(lines).encode()
    assert (tmp_path / "README.md").read_bytes() == b"x\n"
    assert conn.execute("SELECT count(*) FROM claims WHERE NOT ended").fetchone()[0] == 0


def test_recovery_never_writes_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    (data / "log.txt").symlink_to(outside)
    conn = make_db(data)
    add_task(conn, "t1", "found query: a\n", status="queued")
    recover(data)
    assert outside.read_bytes() == b""
    row = conn.execute("SELECT status, last_error FROM tasks WHERE id = 't1'").fetchone()
    assert row[0] == "failed" and "symbolic links" in row[1]


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def make_null_device(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (make_fifo, "a FIFO"),
        (make_socket, "a socket"),
        (make_null_device, "a character device"),
    ],
    ids=["fifo", "socket", "null-device"],
)
def test_a_line_whose_file_is_not_a_regular_file_fails_and_nothing_blocks(
    tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    """Something else where a data file should be (a FIFO nobody reads would block a write
    once its buffer is full; a device would swallow the lines): its lines fail at once with a
    clear error, the other file's lines are written, and the event loop is never held."""
    try:
        make(tmp_path / "log.txt")
    except PermissionError as exc:
        pytest.skip(f"cannot make {kind} here: {exc}")
    registry = sqlite_registry(tmp_path)
    ends: dict[str, BaseException | None] = {}
    requests = [one_line_request(f"r{n}", "x" * 500 + "\n") for n in range(200)]
    readme = one_line_request("readme", "\n## FastAPI 框架精讲", file="README.md")

    async def run() -> None:
        await registry.open()
        for request in [*requests, readme]:
            await registry.commit_intents(request)
        for request in [*requests, readme]:
            task = request.tasks[0]
            registry.submit(task, partial(ends.__setitem__, task.id))
        await registry.flush()
        await registry.close()

    # A write that blocked would never return: run it where the test can stop waiting.
    worker = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the registry blocked on the FIFO"
    errors = {str(error) for key, error in ends.items() if key != "readme-t"}
    assert errors == {f"log.txt is {kind}, not a regular file"}
    assert ends["readme-t"] is None
    assert (tmp_path / "README.md").read_text() == "\n## FastAPI 框架精讲"


def test_rule_3_one_process_s_recovery_and_group_commit_take_turns_on_a_file(
    tmp_path: Path,
) -> None:
    """`flock` on one descriptor does not keep one process's users apart: the file's own
    turn does, so two placements in one process never read the same size."""

    async def run() -> bool:
        files = DataFiles(tmp_path)
        await files.lock("log.txt")
        second = asyncio.create_task(files.lock("log.txt"))
        await asyncio.sleep(0.05)
        waited = not second.done()
        files.unlock("log.txt")
        await second
        files.unlock("log.txt")
        files.close()
        return waited

    assert asyncio.run(run())


def test_rule_3_a_file_another_process_holds_is_waited_for_without_stopping_the_loop(
    tmp_path: Path,
) -> None:
    (tmp_path / "log.txt").touch()
    other = os.open(tmp_path / "log.txt", os.O_RDWR)  # another open file: as another process
    fcntl.flock(other, fcntl.LOCK_EX)

    async def run() -> int:
        files = DataFiles(tmp_path)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        locking = asyncio.create_task(files.lock("log.txt"))
        await asyncio.sleep(0.05)
        assert not locking.done()
        fcntl.flock(other, fcntl.LOCK_UN)
        await locking
        ticker.cancel()
        files.unlock("log.txt")
        files.close()
        return ticks

    try:
        assert asyncio.run(run()) > 5  # the loop ran on while the lock was held elsewhere
    finally:
        os.close(other)
