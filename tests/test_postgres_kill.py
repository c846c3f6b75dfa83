"""`kill -9` of one of two processes that share a PostgreSQL registry, each with a data
directory of its own, while both are under load (issue #15).

Process a is killed at a random moment, b survives. At the kill, a's tasks are of four kinds
(read from the store once a's sessions are gone): ended by a itself; claimed and not ended
(their lines may be in a's file: only a's directory can tell, so they wait for it); never
claimed (b adopts them and writes them to its own file, within ADOPTION_DEADLINE_S); and never
claimed but queued behind a claimed task of their request (they wait with it, or they would be
written before a line that may not be there yet). Then `bgtasks serve` is started again on a's
directory: it resolves the claimed lines and runs the tasks that waited. In the end every
acknowledged request's two lines are present exactly once across the two `log.txt` files, and
in order.

Order: a request's `found query` task runs before its `message to` task. In one file, the
first line's offset is lower. In two files (a ran the first and died, the second was adopted),
offsets say nothing; the store's times do: the second task started (`started_at`, set by the
process that ran it, on this same host's clock) no earlier than the first ended (`finished_at`).
That holds because a dead owner's task is adopted only when no earlier task of its request is
claimed and unfinished elsewhere: the first has ended, and its end was committed, before anyone
could start the second.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import ServerProcess, wait_until
from tests.loadgen import post_all

pytestmark = pytest.mark.parametrize("store", ["postgresql"], indirect=True)

SEED = int(os.environ.get("BGTASKS_TEST_SEED", "20261215"))  # set it to replay a failure
PER_PROCESS = 300
ADOPTION_DEADLINE_S = 5.0
LINE = re.compile(rb"found query: (k\d+[ab]\d+)\n|message to (k\d+[ab]\d+)@example\.com\n")
SIDES = ("a", "b")  # a is killed, b survives
UNFINISHED = ("queued", "running")


def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def paths_for(round_: int, side: str, count: int) -> list[str]:
    return [
        f"/send-notification/k{round_}{side}{i}@example.com?q=k{round_}{side}{i}"
        for i in range(count)
    ]


def owner_of(database: str, server: ServerProcess) -> str:
    found = rows(database, "SELECT owner FROM bgtasks.owners WHERE pid = %s", server.proc.pid)
    assert len(found) == 1, f"no single owner row for pid {server.proc.pid}: {found}"
    return str(found[0][0])


def both_kinds(conn: psycopg.Connection[Any], owner: str) -> bool:
    """Whether `owner` has unfinished tasks both claimed and not claimed."""
    found = conn.execute(
        "SELECT count(*) FILTER (WHERE claim IS NULL), count(*) FILTER (WHERE claim IS NOT NULL)"
        " FROM bgtasks.tasks WHERE owner = %s AND status IN ('queued', 'running')",
        (owner,),
    ).fetchone()
    return found is not None and found[0] > 0 and found[1] > 0


def sessions_of(conn: psycopg.Connection[Any], owner: str) -> list[tuple[Any, ...]]:
    """`owner`'s sessions: (pid, state, when the state last changed)."""
    return conn.execute(
        "SELECT pid, state, state_change FROM pg_stat_activity WHERE application_name LIKE %s"
        " ORDER BY pid",
        (f"bgtasks {owner} %",),
    ).fetchall()


def kill_with_both_kinds(server: ServerProcess, database: str, owner: str) -> float:
    """`kill -9` the server at the first moment at which its committed tasks are both claimed
    and not claimed. It is stopped (SIGSTOP) to look: once what it sent has reached its
    sessions and they are idle, the store holds what a kill at that moment leaves (a session
    that did nothing while the store was read did not change it). Otherwise the server goes
    on (SIGCONT) and is looked at again. Returns the time of the kill."""
    pid = server.proc.pid
    deadline = time.monotonic() + 15
    with psycopg.connect(database, autocommit=True) as conn:
        for _ in range(500):
            if time.monotonic() > deadline:
                break
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.02)
            before = sessions_of(conn, owner)
            if (
                all(state != "active" for _, state, _ in before)
                and both_kinds(conn, owner)
                and sessions_of(conn, owner) == before
            ):
                killed_at = time.monotonic()
                server.proc.kill()
                os.kill(pid, signal.SIGCONT)  # a stopped process dies of SIGKILL all the same
                server.proc.wait(timeout=10)
                return killed_at
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.003)
    pytest.fail("the server never had tasks both claimed and not claimed")


@dataclass
class AtTheKill:
    """The dead owner's tasks, by id, as the store has them once its sessions are gone."""

    ended: set[str] = field(default_factory=set)
    claimed: set[str] = field(default_factory=set)
    unclaimed: set[str] = field(default_factory=set)  # the survivor adopts these
    held: set[str] = field(default_factory=set)  # unclaimed, behind a claimed task

    def describe(self) -> str:
        return (
            f"{len(self.ended)} ended, {len(self.claimed)} claimed, {len(self.unclaimed)}"
            f" unclaimed, {len(self.held)} held behind a claimed one"
        )


def tasks_at_the_kill(database: str, dead: str) -> AtTheKill:
    """Classify the dead owner's tasks (their ids start with its id). Only a never-claimed
    task changes owner (rule 11), so one the survivor already took counts as unclaimed: the
    survivor's watch may act before this read."""
    found = AtTheKill()
    tasks = rows(
        database,
        "SELECT id, request_id, seq, owner, status, claim FROM bgtasks.tasks WHERE id LIKE %s",
        f"{dead}-%",
    )
    claimed_at: dict[str, int] = {}  # request -> lowest seq of its claimed, unfinished tasks
    for task_id, request_id, seq, owner, status, claim in tasks:
        if owner == dead and status in UNFINISHED and claim is not None:
            found.claimed.add(task_id)
            claimed_at[request_id] = min(seq, claimed_at.get(request_id, seq))
    for task_id, request_id, seq, owner, status, claim in tasks:
        if owner != dead or (status in UNFINISHED and claim is None):
            if claimed_at.get(request_id, seq) < seq:
                found.held.add(task_id)
            else:
                found.unclaimed.add(task_id)
        elif status not in UNFINISHED:
            found.ended.add(task_id)
    return found


@dataclass
class Round:
    """What one round did, for its checks and its failure messages."""

    seed: int
    round_: int
    delay: float
    drawn_s: float = 0.0  # the random wait, once a has written a line
    kill_after_s: float = 0.0
    at_kill: AtTheKill = field(default_factory=AtTheKill)
    adopted_s: float | None = None  # from the kill until the store shows them all adopted
    written_s: float | None = None  # ... until the survivor has written them all
    acked: dict[str, int] = field(default_factory=dict)
    in_two_files: int = 0

    def describe(self) -> str:
        return (
            f"[seed {self.seed} round {self.round_} delay {self.delay}: drew"
            f" {self.drawn_s:.3f} s, killed {self.kill_after_s:.3f} s into the load; dead"
            f" owner's tasks:"
            f" {self.at_kill.describe()}; adopted after {self.adopted_s} s, written after"
            f" {self.written_s} s; acknowledged {self.acked}; {self.in_two_files} requests"
            " in two files]"
        )


def load_both(urls: dict[str, str], paths: dict[str, list[str]], out: dict[str, list[Any]]) -> None:
    async def both() -> None:
        results = await asyncio.gather(
            *(post_all(urls[side], paths[side], timeout=20, concurrency=50) for side in SIDES)
        )
        out.update(zip(SIDES, results, strict=True))

    asyncio.run(both())


def wait_for_adoption(database: str, found: Round, survivor: str, killed_at: float) -> None:
    """Poll the store until every unclaimed task of the dead owner is the survivor's
    (adopted) and `recovered` (written), or until the deadline."""
    ids = sorted(found.at_kill.unclaimed)
    with psycopg.connect(database, autocommit=True) as conn:
        while time.monotonic() <= killed_at + ADOPTION_DEADLINE_S:
            states = conn.execute(
                "SELECT owner, status FROM bgtasks.tasks WHERE id = ANY(%s)", (ids,)
            ).fetchall()
            now = round(time.monotonic() - killed_at, 3)
            if found.adopted_s is None and all(owner == survivor for owner, _ in states):
                found.adopted_s = now
            if all(owner == survivor and status == "recovered" for owner, status in states):
                found.written_s = now
                return
            time.sleep(0.01)


def kill_round(
    start: Callable[..., ServerProcess],
    database: str,
    base: Path,
    *,
    seed: int,
    round_: int,
    delay: float,
) -> Round:
    """One round: load both, kill a, check b's adoption, start a's directory again, check
    every line. Returns what happened."""
    found = Round(seed, round_, delay)
    rng = random.Random(f"{seed}/{round_}/{delay}")
    dirs = {side: base / f"round{round_}" / side for side in SIDES}
    servers = {
        side: start(data_dir=dirs[side], delay=delay, args=("--no-access-log",)) for side in SIDES
    }
    dead, survivor = owner_of(database, servers["a"]), owner_of(database, servers["b"])
    paths = {side: paths_for(round_, side, PER_PROCESS) for side in SIDES}
    results: dict[str, list[Any]] = {}
    loader = threading.Thread(
        target=load_both, args=({s: servers[s].url for s in SIDES}, paths, results)
    )
    began = time.monotonic()
    loader.start()
    # A random moment once a has written a line, then the first instant at which it has
    # tasks both claimed and not claimed.
    wait_until(lambda: (dirs["a"] / "log.txt").exists(), timeout=20, step=0.005)
    found.drawn_s = rng.uniform(0.0, 0.3)
    time.sleep(found.drawn_s)
    killed_at = kill_with_both_kinds(servers["a"], database, dead)
    found.kill_after_s = killed_at - began
    with psycopg.connect(database, autocommit=True) as conn:
        wait_until(lambda: not sessions_of(conn, dead), timeout=10, step=0.005)
    found.at_kill = tasks_at_the_kill(database, dead)
    assert found.at_kill.unclaimed, f"the kill left nothing to adopt {found.describe()}"
    assert found.at_kill.claimed, f"the kill left no claimed line {found.describe()}"
    wait_for_adoption(database, found, survivor, killed_at)
    loader.join(timeout=60)
    assert not loader.is_alive(), f"the load did not end {found.describe()}"
    found.acked = {side: results[side].count(200) for side in SIDES}
    assert found.written_s is not None, (
        f"the survivor did not write the dead owner's unclaimed tasks within"
        f" {ADOPTION_DEADLINE_S} s {found.describe()}"
    )
    held = rows(
        database,
        "SELECT id FROM bgtasks.tasks WHERE id = ANY(%s) AND owner <> %s",
        sorted(found.at_kill.held),
        dead,
    )
    assert not held, f"the survivor took tasks behind a claimed one: {held} {found.describe()}"

    again = start(data_dir=dirs["a"], delay=delay, args=("--no-access-log",))
    wait_until(
        lambda: httpx.get(f"{again.url}/health", timeout=5).json()["unfinished_tasks"] == 0,
        timeout=30,
    )
    check_lines(database, found, dirs, results)
    for server in (servers["b"], again):
        server.stop(signal.SIGTERM, timeout=30)
    return found


@dataclass
class Landed:
    """Where a line is, and its task's row."""

    side: str
    offset: int
    task_id: str
    status: str
    started_at: float | None
    finished_at: float | None


def where_lines_are(database: str, found: Round, dirs: dict[str, Path]) -> dict[bytes, Landed]:
    """Every line of both files: none malformed, none twice (in one file or across both)."""
    tasks = {
        line.encode(): rest
        for line, *rest in rows(
            database,
            "SELECT line, id, status, started_at, finished_at FROM bgtasks.tasks",
        )
    }
    where: dict[bytes, Landed] = {}
    for side in SIDES:
        path = dirs[side] / "log.txt"
        offset = 0
        for line in (path.read_bytes() if path.exists() else b"").splitlines(keepends=True):
            assert LINE.fullmatch(line), f"malformed line {line!r} in {side} {found.describe()}"
            assert line not in where, (
                f"written twice: {line!r} in {where[line].side} and {side} {found.describe()}"
            )
            assert line in tasks, f"a line no task has: {line!r} {found.describe()}"
            where[line] = Landed(side, offset, *tasks[line])
            offset += len(line)
    return where


def check_lines(
    database: str, found: Round, dirs: dict[str, Path], results: dict[str, list[Any]]
) -> None:
    """Exactly once across both files, in order within each request, each line where the
    protocol puts it, and every task ended well."""
    where = where_lines_are(database, found, dirs)
    sent = {
        f"k{found.round_}{side}{i}": results[side][i] for side in SIDES for i in range(PER_PROCESS)
    }
    for line in where:
        match = LINE.fullmatch(line)
        assert match is not None
        label = (match[1] or match[2]).decode()
        assert label in sent, f"a line of a request never sent: {line!r} {found.describe()}"
    for label, status in sent.items():
        first = where.get(f"found query: {label}\n".encode())
        second = where.get(f"message to {label}@example.com\n".encode())
        if status == 200:
            assert first and second, f"acknowledged {label} lost a line {found.describe()}"
        if first is None or second is None:
            continue  # a request that got no answer may have lines, at most once each
        if first.side == second.side:
            assert first.offset < second.offset, f"{label} out of order {found.describe()}"
        else:
            found.in_two_files += 1
            assert first.finished_at is not None and second.started_at is not None
            assert first.finished_at <= second.started_at, (
                f"{label}'s second task started before its first ended: {first} {second}"
                f" {found.describe()}"
            )
    by_id = {landed.task_id: landed for landed in where.values()}
    for task_id in found.at_kill.claimed:
        assert task_id in by_id, f"claimed {task_id} has no line {found.describe()}"
        landed = by_id[task_id]
        assert (landed.side, landed.status) == ("a", "recovered"), (
            f"claimed {task_id} not resolved in a: {landed} {found.describe()}"
        )
    for task_id in found.at_kill.unclaimed:
        assert by_id[task_id].side == "b", f"adopted {task_id} not in b {found.describe()}"
    for task_id in found.at_kill.held:
        assert by_id[task_id].status == "recovered", f"{task_id} {found.describe()}"
    statuses = dict(rows(database, "SELECT status, count(*) FROM bgtasks.tasks GROUP BY 1"))
    assert set(statuses) <= {"done", "recovered"}, f"{statuses} {found.describe()}"


@pytest.mark.parametrize("delay", [0.2, 0.0])
def test_kill_9_of_one_of_two_processes_loses_and_duplicates_nothing(
    server_process: Callable[..., ServerProcess], store: str, tmp_path: Path, delay: float
) -> None:
    found = kill_round(server_process, store, tmp_path, seed=SEED, round_=0, delay=delay)
    print(found.describe())


@pytest.mark.slow
def test_kill_9_of_one_of_two_processes_ten_rounds(
    server_process: Callable[..., ServerProcess], store: str, tmp_path: Path
) -> None:
    """Ten rounds on one database (each with two fresh data directories), the delays
    alternating: what earlier rounds left in the store (ended claims, recovered owners) is
    there for every later one."""
    for round_ in range(10):
        found = kill_round(
            server_process, store, tmp_path, seed=SEED, round_=round_, delay=(0.2, 0.0)[round_ % 2]
        )
        print(found.describe())
