"""The task runner against a registry that ends lines only when told to."""

from __future__ import annotations

import asyncio
from typing import cast

from server.records import RequestRecord, TaskRecord
from server.registry import Ended, Registry
from server.registry.store import Failure
from server.retries import RetryPolicy
from server.runner import TaskRunner
from server.status import TaskStatus
from tests.helpers import eventually


class HeldRegistry:
    """Takes submitted lines and ends them when the test says so."""

    owner = "test"

    def __init__(self) -> None:
        self.submitted: list[tuple[TaskRecord, Ended]] = []
        self.noted: list[tuple[str, str]] = []
        self.failures: list[Failure] = []
        self.flushes = 0

    def lines(self) -> list[str]:
        return [task.line for task, _ in self.submitted]

    def submit(self, task: TaskRecord, ended: Ended) -> None:
        self.submitted.append((task, ended))

    async def flush(self) -> None:
        self.flushes += 1

    def note_task(self, task: TaskRecord) -> None:
        self.noted.append((task.id, task.status))

    def note_failure(self, failure: Failure) -> None:
        self.failures.append(failure)


# These tests are about order, slots and shutdown: a failed attempt is the task's last. The
# retries of failed attempts: tests/test_retries.py.
ONE_ATTEMPT = RetryPolicy(max_attempts=1)


def accepted_request(runner: TaskRunner, name: str) -> RequestRecord:
    request = RequestRecord(name, "POST", "/x", 1.0)
    runner.new_task(request, "log.txt", f"found query: {name}\n")
    runner.new_task(request, "log.txt", f"message to {name}@example.com\n")
    runner.accept(request)
    return request


async def two_started(
    delay: float,
) -> tuple[HeldRegistry, TaskRunner, RequestRecord, RequestRecord]:
    """Requests a and b accepted and started, in that order, on a runner with one slot."""
    registry = HeldRegistry()
    runner = TaskRunner(cast(Registry, registry), delay=delay, max_running=1, retries=ONE_ATTEMPT)
    a, b = accepted_request(runner, "a"), accepted_request(runner, "b")
    await runner.start(a)
    await runner.start(b)
    return registry, runner, a, b


def test_no_delay_lines_keep_their_order_and_the_cap_holds() -> None:
    async def scenario() -> None:
        registry = HeldRegistry()
        runner = TaskRunner(cast(Registry, registry), delay=0, max_running=2, retries=ONE_ATTEMPT)
        first, second = accepted_request(runner, "a"), accepted_request(runner, "b")
        starts = [asyncio.create_task(runner.start(r)) for r in (first, second)]
        await eventually(lambda: len(registry.submitted) >= 2)
        assert [t.line for t, _ in registry.submitted] == [
            "found query: a\n",
            "message to a@example.com\n",
        ]  # two slots: the second request waits
        registry.submitted[0][1](None)
        registry.submitted[0][1](None)  # a second report of the same line changes nothing
        await eventually(lambda: len(registry.submitted) >= 3)
        assert len(registry.submitted) == 3  # one slot came back, one line more
        registry.submitted[1][1](OSError("disk full"))
        await eventually(lambda: len(registry.submitted) >= 4)
        assert [t.line for t, _ in registry.submitted][2:] == [
            "found query: b\n",
            "message to b@example.com\n",
        ]
        failed = registry.submitted[1][0]
        assert failed.status == TaskStatus.FAILED and failed.last_error == "OSError: disk full"
        await asyncio.gather(*starts)

        drain = asyncio.create_task(runner.drain(timeout=5))
        await eventually(lambda: registry.flushes >= 1)
        assert not drain.done() and registry.flushes == 1  # waits for the submitted lines
        for task, ended in registry.submitted[2:]:
            task.status = TaskStatus.DONE
            ended(None)
        await asyncio.wait_for(drain, 1)
        assert not runner.unfinished

    asyncio.run(scenario())


def test_drain_gives_up_on_submitted_lines_after_its_timeout() -> None:
    async def scenario() -> None:
        registry = HeldRegistry()
        runner = TaskRunner(cast(Registry, registry), delay=0, max_running=10)
        request = accepted_request(runner, "a")
        await runner.start(request)
        await asyncio.wait_for(runner.drain(timeout=0.05), 1)
        # still unfinished: the registry's close writes what was submitted, the next start the rest
        assert len(runner.unfinished) == 2

    asyncio.run(scenario())


def test_with_a_delay_a_request_s_tasks_run_in_turn_and_sleeping_tasks_hold_their_slot() -> None:
    async def scenario() -> None:
        registry, runner, a, b = await two_started(delay=0.02)
        assert [t.status for t in (*a.tasks, *b.tasks)] == [
            TaskStatus.RUNNING,
            TaskStatus.QUEUED,
            TaskStatus.QUEUED,
            TaskStatus.QUEUED,
        ]
        assert registry.noted == [
            (a.tasks[0].id, TaskStatus.RUNNING)
        ]  # asleep, and the registry knows
        await eventually(lambda: len(registry.lines()) >= 1)  # after a's delay
        assert registry.lines() == ["found query: a\n"]
        queued = [TaskStatus.QUEUED, TaskStatus.QUEUED]
        assert [t.status for t in b.tasks] == queued  # the one slot is a's until it ends
        registry.submitted[0][1](None)
        await eventually(lambda: len(registry.lines()) >= 2)
        # b was waiting for the slot before a's next task was: it goes first
        assert registry.lines()[1:] == ["found query: b\n"]
        registry.submitted[1][1](OSError("disk full"))
        await eventually(lambda: len(registry.lines()) >= 3)
        assert b.tasks[0].status == TaskStatus.FAILED
        assert registry.lines()[2:] == ["message to a@example.com\n"]
        registry.submitted[2][1](None)
        await eventually(lambda: len(registry.lines()) >= 4)
        assert registry.lines()[3:] == ["message to b@example.com\n"]  # a failure ends no chain
        registry.submitted[3][1](None)
        await asyncio.wait_for(runner.drain(timeout=5), 1)
        assert not runner.unfinished

    asyncio.run(scenario())


def test_drain_leaves_sleeping_and_waiting_tasks_for_the_next_start() -> None:
    async def scenario() -> None:
        registry, runner, a, _ = await two_started(delay=30)
        asleep = [timer for timer, _ in runner._timers.values()]
        await asyncio.wait_for(runner.drain(timeout=0.05), 1)
        assert len(runner.unfinished) == 4 and not registry.submitted
        assert a.tasks[0].status == TaskStatus.RUNNING  # recorded as started: recovery writes it
        assert len(asleep) == 1 and asleep[0].cancelled()

    asyncio.run(scenario())


def test_after_drain_gives_up_a_late_end_starts_nothing_more() -> None:
    async def scenario() -> None:
        registry = HeldRegistry()
        runner = TaskRunner(cast(Registry, registry), delay=0, max_running=1)
        await runner.start(accepted_request(runner, "a"))
        await asyncio.wait_for(runner.drain(timeout=0.05), 1)
        assert registry.lines() == ["found query: a\n"]  # the second waits for the slot
        registry.submitted[0][1](None)  # written by the registry's close, after the drain
        assert registry.lines() == ["found query: a\n"]
        assert [t.line for t in runner.unfinished.values()] == ["message to a@example.com\n"]

    asyncio.run(scenario())
