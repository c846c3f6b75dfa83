"""The PostgreSQL store: several processes, on several data directories, share one database;
liveness is the database's, a dead owner's unclaimed work is adopted while the others serve,
and a process cut off from the database never writes a task it no longer owns."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from server.records import RequestRecord, TaskRecord
from server.registry import Registry, RegistryError, StoreBusy
from server.registry.postgres import PostgresStore
from server.registry.recovery import recover_dead_owners
from server.registry.store import Changes
from server.status import TaskStatus
from tests.helpers import ServerProcess, spawn_server, wait_until
from tests.postgres import fresh_database
from tests.registry_helpers import a_log, append, die_after_claiming, pg_registry, two_tasks

LINE = re.compile(rb"found query: r(\d+)\n|message to r(\d+)@example\.com\n")


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def one_task(request_id: str, line: str) -> RequestRecord:
    request = RequestRecord(request_id, "POST", "/x", time.time())
    request.tasks.append(
        TaskRecord(
            f"{request_id}-1", request_id, 0, "log.txt", line, time.time(), data=line.encode()
        )
    )
    return request


def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def test_a_claim_drops_a_task_another_owner_adopted(database: str, tmp_path: Path) -> None:
    """Rule 13 on PostgreSQL: owner a's task is adopted by b while a still runs (as after a
    partition); a's claim of it takes nothing, so a does not write it, and b does."""
    request = one_task("r1", "message to a@example.com\n")
    ends: list[BaseException | None] = []

    async def run() -> None:
        a = pg_registry(database, tmp_path / "a", "0000000a")
        b = pg_registry(database, tmp_path / "b", "0000000b")
        await a.open()
        await b.open()
        await a.commit_intents(request)
        moved = await b.store.adopt(request.tasks, "0000000a", "0000000b")
        assert [task.id for task in moved] == ["r1-1"]
        a.submit(request.tasks[0], ends.append)  # a's copy of the task wakes and tries
        await a.flush()
        b.submit(moved[0], ends.append)
        await b.flush()
        await a.close()
        await b.close()

    asyncio.run(run())
    assert [type(end).__name__ for end in ends] == ["TaskDropped", "NoneType"]
    assert not (tmp_path / "a" / "log.txt").read_bytes()
    assert (tmp_path / "b" / "log.txt").read_bytes() == b"message to a@example.com\n"
    assert rows(database, "SELECT owner, status FROM bgtasks.tasks") == [("0000000b", "recovered")]


def test_a_request_s_next_task_waits_for_its_line_claimed_in_a_dead_owner_s_directory(
    database: str, tmp_path: Path
) -> None:
    """Owner a claims the first line of a request in its directory and dies before writing
    it. Live b cannot see that directory: had it adopted the request's second task, it would
    write it before the first line exists (the restart writes that one). The second task waits
    with the first; a's directory, started again, writes both, in order."""
    request = two_tasks("r1", "x")
    ends: list[BaseException | None] = []

    async def run() -> tuple[list[TaskRecord], list[TaskRecord]]:
        a = pg_registry(database, tmp_path / "a", "0000000a")
        b = pg_registry(database, tmp_path / "b", "0000000b")
        await a.open()
        await b.open()
        await a.commit_intents(request)
        await die_after_claiming(a, request.tasks[0])
        for _ in range(500):  # its session ends a moment after its socket closes
            if not await b.store.is_alive("0000000a"):
                break
            await asyncio.sleep(0.01)
        assert not await b.store.is_alive("0000000a")
        _, by_b = await recover_dead_owners(b.store, b._files, b._owners, b.owner, at_start=False)
        for task in by_b:
            b.submit(task, ends.append)
        await b.flush()
        again = pg_registry(database, tmp_path / "a", "0000000c")
        by_restart = await again.open()
        for task in by_restart:
            again.submit(task, ends.append)
        await again.flush()
        await again.close()
        await b.close()
        return by_b, by_restart

    by_b, by_restart = asyncio.run(run())
    assert by_b == []
    assert [task.id for task in by_restart] == ["r1-2"]
    assert ends == [None]
    assert not (tmp_path / "b" / "log.txt").exists()
    in_order = b"found query: x\nmessage to x@example.com\n"
    assert (tmp_path / "a" / "log.txt").read_bytes() == in_order
    assert rows(database, "SELECT id, owner, status FROM bgtasks.tasks ORDER BY id") == [
        ("r1-1", "0000000a", "recovered"),
        ("r1-2", "0000000c", "recovered"),
    ]


def test_tasks_read_by_status_and_the_registry_still_takes_work(
    database: str, tmp_path: Path
) -> None:
    """`GET /tasks?status=` on PostgreSQL: the filtered read has the rows of the unfiltered
    one (owner and host too); a read that failed as a fault would stop all work."""

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        a = pg_registry(database, tmp_path / "a", "0000000a")
        await a.open()
        try:
            first = one_task("r1", "x\n")
            await a.commit_intents(first)
            await append(a, first.tasks[0])
            await a.flush()
            done = await a.list_tasks(TaskStatus.DONE, 10)
            every = await a.list_tasks(None, 10)
            await a.commit_intents(one_task("r2", "y\n"))
        finally:
            await a.close()
        return done, every

    done, every = asyncio.run(run())
    assert done == [row for row in every if row["status"] == "done"]
    assert [(row["id"], row["owner"]) for row in done] == [("r1-1", "0000000a")]
    assert done[0]["host"]


def test_a_commit_that_failed_does_not_fail_the_commits_after_it(
    database: str, tmp_path: Path
) -> None:
    """psycopg prepares a statement run five times; one skipped in a pipeline after a failed
    statement was counted as prepared, and every later commit then failed on it."""

    async def run() -> None:
        store = PostgresStore(database, tmp_path, retention=10_000, lock_timeout=0.3)
        a = Registry(tmp_path, owner="0000000a", store=store, lock_timeout=0.3)
        await a.open()
        try:
            for n in range(4):  # the commit that fails is the fifth of each statement
                await a.commit_intents(one_task(f"r{n}", "x\n"))
            bad = one_task("bad", "x\n")
            bad.method = "P\x00ST"  # text PostgreSQL refuses: this commit fails
            with pytest.raises(RegistryError):
                await a.commit_intents(bad)
            await a.commit_intents(one_task("after", "x\n"))
        finally:
            await a.close()

    asyncio.run(run())


def test_the_database_says_who_is_alive(database: str, tmp_path: Path) -> None:
    async def run() -> tuple[bool, bool, int]:
        a = pg_registry(database, tmp_path / "a", "0000000a")
        b = pg_registry(database, tmp_path / "b", "0000000b")
        await a.open()
        await b.open()
        both = await a.store.live_owners()
        await b.close()
        alive = await a.store.is_alive("0000000a"), await a.store.is_alive("0000000b")
        await a.close()
        return *alive, both

    assert asyncio.run(run()) == (True, False, 2)


def test_only_this_database_s_owners_are_alive(database: str, tmp_path: Path) -> None:
    """Advisory locks are per database, but `pg_locks` shows every database's: an owner of
    another registry on the same server (another deployment, another test) is not one of
    this registry's."""

    async def run() -> tuple[int, bool, bool]:
        with fresh_database() as other:
            elsewhere = pg_registry(other, tmp_path / "b", "0000000b")
            await elsewhere.open()
            here = pg_registry(database, tmp_path / "a", "0000000a")
            await here.open()
            try:
                return (
                    await here.store.live_owners(),
                    await here.store.is_alive("0000000a"),
                    await here.store.is_alive("0000000b"),
                )
            finally:
                await here.close()
                await elsewhere.close()

    assert asyncio.run(run()) == (1, True, False)


def test_one_owner_id_cannot_be_alive_twice(database: str, tmp_path: Path) -> None:
    async def run() -> None:
        first = pg_registry(database, tmp_path / "a", "0000000a")
        await first.open()
        try:
            with pytest.raises(Exception, match="already has owner id 0000000a"):
                await pg_registry(database, tmp_path / "b", "0000000a").open()
        finally:
            await first.close()

    asyncio.run(run())


def test_a_lost_connection_is_made_again_and_the_owner_lock_taken_again(
    database: str, tmp_path: Path
) -> None:
    async def run() -> bool:
        a = pg_registry(database, tmp_path / "a", "0000000a")
        await a.open()
        rows(
            database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'bgtasks 0000000a commits'",
        )
        request = one_task("r1", "x\n")
        with pytest.raises(StoreBusy):  # the commit that finds the connection gone fails ...
            await a.store.commit(Changes(intents=[request]), [], [])
        await a.commit_intents(request)  # ... and the next one connects again
        await append(a, request.tasks[0])
        alive = await a.store.is_alive("0000000a")
        await a.close()
        return alive

    assert asyncio.run(run()) is True
    assert (tmp_path / "a" / "log.txt").read_bytes() == b"x\n"


# -- processes --------------------------------------------------------------------------------


def serve(data_dir: Path, url: str, *, delay: float, args: tuple[str, ...] = ()) -> ServerProcess:
    return spawn_server(data_dir, delay=delay, args=args, env={"BGTASKS_DATABASE_URL": url})


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(timeout=10)


def owner_of(server: ServerProcess, request_id: str) -> str:
    body = httpx.get(f"{server.url}/requests/{request_id}").json()
    return str(body["tasks"][0]["id"].split("-")[0])


def test_a_process_cut_off_from_the_database_does_not_write_what_another_adopted(
    database: str, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """Terminate process a's commit session while its tasks sleep their delay: its lock goes
    with it, so b adopts a's tasks and writes them; a, waking, finds them gone at its claim."""
    a = serve(tmp_path / "a", database, delay=3.0)
    servers.append(a)
    b = serve(tmp_path / "b", database, delay=0.0)
    servers.append(b)
    ids = [
        httpx.post(f"{a.url}/send-notification/r{n}@example.com", params={"q": f"r{n}"}).headers[
            "x-request-id"
        ]
        for n in range(5)
    ]
    owner = owner_of(a, ids[0])
    # Once a has recorded that its first tasks sleep, it has nothing to say to the database
    # until they wake: its commit session is idle when it is cut.
    asleep = "SELECT count(*) FROM bgtasks.tasks WHERE status = 'running' AND started_at > 0"
    wait_until(lambda: rows(database, asleep) == [(5,)])
    terminated = rows(
        database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        f"bgtasks {owner} commits",
    )
    assert terminated == [(True,)]
    # b looks for dead owners every second; a's tasks sleep 3 s.
    wait_until(lambda: a_log(tmp_path / "b").count(b"\n") == 10, timeout=8)
    # a's tasks wake, one request's after another's, and find them gone at their claims.
    dropped = "was cancelled or adopted by another process"
    wait_until(lambda: a.log().count(dropped) == 10, timeout=15)
    assert a_log(tmp_path / "a") == b""
    lines = a_log(tmp_path / "b").splitlines(keepends=True)
    assert sorted(lines) == sorted(
        [f"found query: r{n}\n".encode() for n in range(5)]
        + [f"message to r{n}@example.com\n".encode() for n in range(5)]
    )
    statuses = rows(database, "SELECT DISTINCT status FROM bgtasks.tasks")
    assert statuses == [("recovered",)]


def test_a_lost_host_s_claimed_lines_are_rewritten_elsewhere_on_an_operator_s_word(
    database: str, tmp_path: Path
) -> None:
    """Owner a claims a request's first line in its directory and its host is lost for good.
    The line waits for that directory; an operator rewrites it on host b (`POST
    /owners/{id}/rewrite`), which also frees the request's next task, in order."""
    from server.config import Settings
    from tests.helpers import serve_in_thread

    request = two_tasks("r1", "x")

    async def a_dies() -> None:
        a = pg_registry(database, tmp_path / "a", "0000000a")
        await a.open()
        await a.commit_intents(request)
        await die_after_claiming(a, request.tasks[0])

    asyncio.run(a_dies())
    settings = Settings(data_dir=tmp_path / "b", delay=0, database_url=database)
    with serve_in_thread(settings) as b:
        owner = wait_until(
            lambda: (r := httpx.get(f"{b.url}/owners/0000000a")).json()["waiting"] and r
        )
        body = owner.json()
        assert body["alive"] is False and body["data_dir"] != ""
        assert [line["id"] for line in body["waiting"]] == ["r1-1"]
        assert not a_log(tmp_path / "b")  # b adopted nothing behind the waiting line
        rewritten = httpx.post(f"{b.url}/owners/0000000a/rewrite").json()
        assert [line["id"] for line in rewritten["rewritten"]] == ["r1-1"]
        assert "twice" in rewritten["warning"]
        # The request's second task is no longer held: b's watch adopts it, after the first.
        wait_until(lambda: a_log(tmp_path / "b").count(b"\n") == 2)
        assert a_log(tmp_path / "b") == b"found query: x\nmessage to x@example.com\n"
        assert httpx.get(f"{b.url}/owners/0000000a").json()["waiting"] == []
        alive = httpx.post(f"{b.url}/owners/{b.app.state.registry.owner}/rewrite")
        assert alive.status_code == 409
    assert rows(database, "SELECT DISTINCT status FROM bgtasks.tasks") == [("recovered",)]
    assert rows(database, "SELECT count(*) FROM bgtasks.claims WHERE NOT ended") == [(0,)]
