"""Prometheus metrics, kept in prometheus-client's multiprocess files so that `/metrics` is
right across `serve --workers N`: every worker writes its own files in `.bgtasks/metrics/`
of the data directory, and whichever worker answers a scrape reads them all.

Counts start over with each run of the server. A process that opens the directory while no
other live process has files there starts a new run and removes the files of dead ones; one
that starts beside live siblings (a worker uvicorn started again) keeps a dead sibling's counts,
so totals never go back within a run. `bgtasks_tasks_unfinished` is a `livesum` gauge: the
gauges of dead processes are dropped (`mark_process_dead`) at every start and every scrape.

What is observed is per task (when it ends) and per group commit, never per row of a commit,
and it is tallied here in plain numbers first: writing one value to prometheus-client's files
costs 9,000-17,000 instructions (a lock, a `getpid` and the write, per counter or histogram),
~17 of them per notify request, which took notify from 1.09 M instructions to 1.26 M; tallied,
1.12 M (benchmarks/instructions.py). The tallies go to the files every FLUSH_S seconds while
there are any, so a scrape may lag that much behind.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from server.paths import LOG_FILE, README_FILE, STATE_DIR
from server.records import RequestRecord, TaskRecord
from server.status import ENDED, SUCCEEDED

METRICS_DIR = "metrics"
FLUSH_S = 0.25
# Seconds. The 1.01 and 2.01 bounds tell a task that waited its one default second of delay
# (or two, behind the request's first task) from one that took longer.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 1.01, 1.1, 1.5, 2.0, 2.01, 2.1, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
COMMIT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_FILE_NAME = re.compile(r"[a-z_]+_(\d+)\.db")
# prometheus-client chooses where a child of a metric keeps its value when the child is made,
# from a global of its own (picked at its import, from this variable) and this variable.
# `_Instruments._bound` points both at one directory while its children are made; this lock
# keeps two apps of one process (in tests) from doing so at once.
_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_binding = threading.Lock()


def metrics_dir(data_dir: Path) -> Path:
    return data_dir / STATE_DIR / METRICS_DIR


class Metrics:
    """The service's metrics, an `Observer` (server/observe.py). Nothing is observed until
    `open`, which the app's lifespan calls before any task runs, nor after `close`."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = metrics_dir(data_dir)
        self._on: _Instruments | None = None
        self._tally: _Tally | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._requests: dict[str, RequestRecord] = {}  # by task id, until the task ends

    def open(self) -> None:
        """Make the directory (never through a symbolic link), start a new run if no live
        process has files there, and make every metric. Raises OSError if it cannot."""
        for path in (self.directory.parent, self.directory):
            if path.is_symlink():
                raise OSError(f"{path} is a symbolic link; bgtasks writes only inside its data dir")
        with _binding:
            self._on = _Instruments.open(self.directory)
        self._tally = _Tally()

    def close(self) -> None:
        """Write what is tallied and close the files (their counts stay for the run's other
        processes)."""
        self.flush()
        self._tally = None
        with _binding:
            if self._on is not None:
                self._on.close()
                self._on = None

    def flush(self) -> None:
        """Write the tallies to the files."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._on is not None and self._tally is not None:
            self._tally = self._on.add(self._tally)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Every live and dead process's metrics of this run, in the format `accept` asks
        for (Prometheus' text format unless it asks for OpenMetrics); and its media type.
        Reads files: call it off the event loop."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder
        from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

        for pid in _dead(_pids(self.directory)):
            mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        encode, media_type = choose_encoder(accept or "")
        return encode(registry), media_type

    def _soon(self) -> None:
        """Make sure the tallies are written within FLUSH_S."""
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the loop: now
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_S, self.flush)

    # -- what the runner and the registry report (server/observe.py) -------------------------

    def accepted(self, request: RequestRecord) -> None:
        tally = self._tally
        if tally is None:
            return
        for task in request.tasks:
            self._requests[task.id] = request
        tally.unfinished += len(request.tasks)
        self._soon()

    def adopted(self, tasks: Sequence[TaskRecord]) -> None:
        if self._tally is not None:
            self._tally.unfinished += len(tasks)
            self._soon()

    def attempt_failed(self, task: TaskRecord) -> None:
        if self._tally is not None:
            self._tally.retries += 1
            self._soon()

    def ended(self, task: TaskRecord) -> None:
        tally = self._tally
        if tally is None:
            return
        request = self._requests.pop(task.id, None)
        tally.unfinished -= 1
        tally.count(task)
        started, finished = task.started_at, task.finished_at
        if started is not None:
            tally.wait.observe(started - task.queued_at)
            if finished is not None:
                tally.run.observe(finished - started)
        if task.status in SUCCEEDED and finished is not None and request is not None:
            sent = request.response_sent_at
            if sent is not None:
                tally.response_to_write.observe(finished - sent)
        self._soon()

    def committed(self, seconds: float, size: int) -> None:
        tally = self._tally
        if tally is not None:
            tally.commit.observe(seconds)
            tally.batch.observe(size)
            self._soon()

    def recovered(self, finished: Sequence[TaskRecord], adopted: Sequence[TaskRecord]) -> None:
        tally = self._tally
        if tally is None:
            return
        tally.recovered += len(finished) + len(adopted)
        for task in finished:
            tally.count(task)
        self._soon()


class _Histogram:
    """A histogram's observations not yet written: a count per bucket, and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # its bucket: value <= bound
        self.total += value


class _Tally:
    """What was observed since the last write to the files."""

    def __init__(self) -> None:
        self.tasks: dict[tuple[str, str], int] = {}  # by file and status
        self.unfinished = 0  # the change
        self.recovered = 0
        self.retries = 0
        self.wait = _Histogram(LATENCY_BUCKETS)
        self.run = _Histogram(LATENCY_BUCKETS)
        self.response_to_write = _Histogram(LATENCY_BUCKETS)
        self.commit = _Histogram(COMMIT_BUCKETS)
        self.batch = _Histogram(BATCH_BUCKETS)

    def count(self, task: TaskRecord) -> None:
        key = (task.file, task.status)
        self.tasks[key] = self.tasks.get(key, 0) + 1


class _Instruments:
    """Every metric of one directory, kept in that directory's files. One per directory in
    a process, shared by the apps that use it: two sets of values in one process's file
    would overwrite each other's counts."""

    _open: ClassVar[dict[Path, _Instruments]] = {}

    @classmethod
    def open(cls, directory: Path) -> _Instruments:
        """This process's instruments for `directory`: made (after `_clean`) by the first
        app that opens it, shared by the others until the last one closes. Call it with
        `_binding` held."""
        shared = cls._open.get(directory)
        if shared is None:
            directory.mkdir(parents=True, exist_ok=True)
            _clean(directory)
            shared = cls._open[directory] = cls(directory)
        shared.users += 1
        return shared

    def close(self) -> None:
        """One app is done with them; the last one closes the files. Call it with `_binding`
        held."""
        self.users -= 1
        if self.users == 0:
            del self._open[self.directory]
            self._values.close_all_files()

    def __init__(self, directory: Path) -> None:
        from prometheus_client import values

        self.directory = directory
        self.users = 0
        self._values: Any = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        with self._bound():
            self._make()
        self.unfinished.set(0)

    @contextlib.contextmanager
    def _bound(self) -> Iterator[None]:
        """Children made in the block keep their values in this directory's files."""
        from prometheus_client import values

        saved = values.ValueClass, os.environ.get(_DIR_VARIABLE)
        values.ValueClass = self._values
        os.environ[_DIR_VARIABLE] = str(self.directory)
        try:
            yield
        finally:
            values.ValueClass = saved[0]
            if saved[1] is None:
                del os.environ[_DIR_VARIABLE]
            else:
                os.environ[_DIR_VARIABLE] = saved[1]

    def add(self, tally: _Tally) -> _Tally:
        """Write what `tally` holds into the files; returns a fresh tally."""
        for (file, status), count in tally.tasks.items():
            child = self.totals.get((file, status))
            if child is None:  # a file or status unknown at start: rare, so bound each time
                with _binding, self._bound():
                    child = self.totals[file, status] = self.tasks.labels(file, status)
            child.inc(count)
        if tally.unfinished:
            self.unfinished.inc(tally.unfinished)
        if tally.recovered:
            self.recovered.inc(tally.recovered)
        if tally.retries:
            self.retries.inc(tally.retries)
        for histogram, observed in (
            (self.wait, tally.wait),
            (self.run, tally.run),
            (self.response_to_write, tally.response_to_write),
            (self.commit, tally.commit),
            (self.batch, tally.batch),
        ):
            # What Histogram.observe does, one bucket at a time with its whole count.
            for bucket, count in zip(histogram._buckets, observed.counts, strict=True):
                if count:
                    bucket.inc(count)
            if any(observed.counts):
                histogram._sum.inc(observed.total)
        return _Tally()

    def _make(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.tasks = Counter(
            "bgtasks_tasks",
            "Tasks this server ended, by file and final status (done, failed, recovered).",
            ["file", "status"],
            registry=None,
        )
        self.totals: dict[tuple[str, str], Any] = {
            (file, status): self.tasks.labels(file, status)
            for file in (LOG_FILE, README_FILE)
            for status in sorted(ENDED)
        }
        self.wait = Histogram(
            "bgtasks_task_wait_seconds",
            "Seconds from a task's queueing to its start.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.run = Histogram(
            "bgtasks_task_run_seconds",
            "Seconds from a task's start to its end (its delay and its write).",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.response_to_write = Histogram(
            "bgtasks_response_to_write_seconds",
            "Seconds from the last byte of a response to its task's line on disk.",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.unfinished = Gauge(
            "bgtasks_tasks_unfinished",
            "Tasks accepted and not ended, summed over the live processes.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.commit = Histogram(
            "bgtasks_registry_commit_seconds",
            "Seconds one group commit's transaction took.",
            buckets=COMMIT_BUCKETS,
            registry=None,
        )
        self.batch = Histogram(
            "bgtasks_registry_batch_size",
            "Changes one group commit carried: requests' intents, lines claimed, state notes.",
            buckets=BATCH_BUCKETS,
            registry=None,
        )
        self.recovered = Counter(
            "bgtasks_recovered",
            "Tasks a stopped server left unfinished that this one took over at start.",
            registry=None,
        )
        self.retries = Counter(
            "bgtasks_retries",
            "Failed attempts of tasks that are tried again after a backoff.",
            registry=None,
        )


def _pids(directory: Path) -> set[int]:
    """The processes with files in the directory."""
    found = (_FILE_NAME.fullmatch(path.name) for path in directory.glob("*.db"))
    return {int(match.group(1)) for match in found if match}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _dead(pids: set[int]) -> set[int]:
    return {pid for pid in pids if not _alive(pid)}


def _clean(directory: Path) -> None:
    """Before this process makes its files: a new run drops every dead process's files; a
    run going on drops their gauges only. Files of this process's pid are a dead one's."""
    from prometheus_client.multiprocess import mark_process_dead

    pids = _pids(directory)
    dead = _dead(pids) | ({os.getpid()} & pids)
    if dead != pids:
        for pid in dead:
            mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
        return
    for path in directory.glob("*.db"):
        match = _FILE_NAME.fullmatch(path.name)
        if match and int(match.group(1)) in dead:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
