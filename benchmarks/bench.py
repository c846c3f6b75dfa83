"""Benchmark bgtasks against the seed's code as FastAPI's tutorial writes it (issue 4).

Run from the repository root:

    python benchmarks/bench.py            # full run: 3 repeats, about 7 minutes on 2 cores
    python benchmarks/bench.py --quick    # small counts, under 60 s; CI keeps it working

Each repeat starts its own servers (uvicorn subprocesses, one worker, a free 127.0.0.1 port, a
temporary data directory), gives each a short warm-up load, and measures:
  1. response latency of `/send-notification/{email}?q=` with 1 s of work per task vs none,
     4 connections, paced at PACED_RATE requests/s (and, for information, a closed loop);
  2. req/s of that endpoint (delay 0, two tasks) vs the same shape doing no background work,
     for bgtasks and for the reference app (`reference_app.py`);
  3. completion under that load: response to last write, from bgtasks' registry, and lost,
     duplicated or malformed lines in log.txt against the requests that got a 200;
  6. start to first 200 and RSS after the load, bgtasks vs reference, and the largest size of
     bgtasks' registry (database and WAL) on disk during measure 2's load.
Then once per run: 4. `bgtasks tail` vs GNU `tail -F`; 5. CLI start-up vs HTTPie.

Choices worth knowing:
- bgtasks is served as `bgtasks serve` serves it: `same_shape_app.py` builds its app with
  serve's factory (`bgtasks_cli.served.create_served_app`: the GC frozen and its threshold
  raised once start-up is done), under uvicorn with uvloop and httptools when installed (what
  serve's "auto" picks). The reference and bare apps run under plain uvicorn, as the tutorial's
  users run them.
- Measure 2's baseline is the same endpoint shape doing no background work on the same server:
  `same_shape_app.py` serves bgtasks' app plus `/plain/{email}` (same validators, dependency,
  middleware and body, no task); the reference's baseline is its own `/plain/{email}` route.
  Each app's absolute req/s is also shown against `bare_app.py`, a plain FastAPI route of the
  same shape with no dependency and no middleware.
- Every request carries a unique tag, used as its email, its q and its X-Request-ID, so each
  line in log.txt can be matched to the request that wrote it.
- Load comes from wrk (one thread, `wrk_unique.lua`) when it is on PATH, else from the asyncio
  generator below, which also makes measure 1's paced load (wrk cannot pace). Every load is
  bounded in requests and seconds and dials 127.0.0.1 only.
- Measure 2 runs notify and its baseline in turns, two halves each. The registry keeps its
  default retention (10,000 requests), so completion times are read after each notify half,
  over the acknowledged requests still in it (`sampled`).
- Ratios are taken within one repeat; results are medians over repeats. Goals are judged only
  in a full run, and never make the script fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOTIFY, PLAIN = "/send-notification/", "/plain/"
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
HAS_HTTPTOOLS = importlib.util.find_spec("httptools") is not None
FAST_IO = ["--loop", "uvloop"] * HAS_UVLOOP + ["--http", "httptools"] * HAS_HTTPTOOLS
APPS = {
    # bgtasks' app from the factory `bgtasks serve` runs, plus the baseline route.
    "bgtasks": ["--factory", "--app-dir", str(HERE), "same_shape_app:create_bench_app"],
    "bare": ["--app-dir", str(HERE), "bare_app:app"],
    "reference": ["--app-dir", str(HERE), "reference_app:app"],
}
# A load stops after its seconds or after seconds * MAX_RATE requests, whichever comes first.
# The cap sits above what one worker serves here (~9,000 req/s for /health) so that time is
# what binds: wrk divides by its full -d even when the script stops it early.
MAX_RATE = 15_000
# Measure 1 paces its load (requests due at a fixed rate, latency counted from when each was
# due, by the asyncio generator): a closed loop at full speed measures throughput again, and
# with 1 s of work per task the server has more to do per second, so its responses queue
# behind each other. At 600/s, 1,200 tasks sleep at once (each request's first or second),
# with 600 more queued behind them. Closed-loop figures (wrk) are reported as information.
T = TypeVar("T")
PACED_RATE = 600.0
WARM_UP_S = 1
STOP_BOUND_S = 30.0


@dataclass(frozen=True)
class Profile:
    """How much load each measure gets."""

    latency_seconds: int  # measure 1, per server
    load_seconds: int  # measure 2, per route
    tail_lines: int  # measure 4, per follower
    cli_runs: int  # measure 5, per command


FULL = Profile(latency_seconds=5, load_seconds=10, tail_lines=100, cli_runs=7)
QUICK = Profile(latency_seconds=1, load_seconds=2, tail_lines=20, cli_runs=2)


@dataclass
class Config:
    profile: Profile
    generator: str  # "wrk" or "asyncio"
    workdir: Path


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    startup_s: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def registry_mb(self) -> float:
        """The registry's database and WAL on disk: the WAL is what grows under load."""
        from server.paths import registry_path

        db = registry_path(self.data_dir)
        files = (db, db.with_name(f"{db.name}-wal"))
        return sum(f.stat().st_size for f in files if f.exists()) / 1e6

    @contextlib.contextmanager
    def largest_registry_mb(self, every_s: float = 0.05) -> Iterator[list[float]]:
        """Sample `registry_mb` while the block runs; the list holds the largest size seen."""
        largest = [self.registry_mb()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(every_s):
                largest[0] = max(largest[0], self.registry_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield largest
        finally:
            stop.set()
            sampler.join()

    def rss_mb(self) -> float:
        """Resident memory of the server process, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "(no output)"


def get_health(port: int, timeout: float) -> tuple[int, bytes]:
    """GET /health: the status code and the body. Raises OSError."""
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def health_ok(port: int) -> bool:
    try:
        return get_health(port, timeout=2)[0] == 200
    except OSError:
        return False


def unfinished_tasks(port: int) -> float:
    """bgtasks' count of queued or running tasks."""
    return float(json.loads(get_health(port, timeout=10)[1])["unfinished_tasks"])


@contextlib.contextmanager
def serve(
    app: str,
    workdir: Path,
    delay: float = 0.0,
    *,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start one uvicorn server on a fresh data dir (or on `data_dir` again, with `env` added
    to its environment); stop it (SIGTERM, then SIGKILL) on exit."""
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix=f"{app}-", dir=workdir))
    errors = data_dir.with_suffix(".stderr")
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", *APPS[app], "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--no-access-log", "--log-level", "warning", *FAST_IO]
    env = {**os.environ, **(env or {})}
    env |= {"BGTASKS_DATA_DIR": str(data_dir), "BGTASKS_DELAY": str(delay)}
    with errors.open("ab") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=err)
    try:
        while not health_ok(port):
            if proc.poll() is not None or time.perf_counter() - started > 30:
                raise RuntimeError(f"{app} server did not start: {last_line(errors)}")
            time.sleep(0.005)
        yield Server(proc, port, data_dir, time.perf_counter() - started)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- load generators -------------------------------------------------------------------------


@dataclass
class Load:
    """One bounded load: what came back, how fast, and which request ids got a 200."""

    ok: int
    failed: int  # socket errors, timeouts and non-200 answers
    seconds: float
    p50_ms: float
    p99_ms: float
    acked: list[str]  # empty under wrk for apps that do not echo X-Request-ID

    @property
    def rps(self) -> float:
        return self.ok / self.seconds


def run_load(
    cfg: Config, srv: Server, route: str, tag: str, conns: int, seconds: int, rate: float = 0
) -> Load:
    """POST `route` + a unique email and q per request, keep-alive, one in flight per conn.
    With `rate`, a paced load of that many requests per second (the asyncio generator)."""
    if cfg.generator == "wrk" and not rate:
        load = wrk_load(cfg, srv.port, route, tag, conns, seconds)
    else:
        load = run_async(asyncio_load(srv.port, route, tag, conns, seconds, rate))
    if not load.ok:
        raise RuntimeError(f"no request to {route} got a 200 ({load.failed} failed)")
    return load


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to its end on a new event loop, uvloop's when installed."""
    loop_factory = None
    if HAS_UVLOOP:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def wrk_load(cfg: Config, port: int, route: str, tag: str, conns: int, seconds: int) -> Load:
    acks = cfg.workdir / f"acks-{tag}"
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s"]
    argv += [str(HERE / "wrk_unique.lua"), f"http://127.0.0.1:{port}"]
    argv += ["--", route, tag, str(acks), str(seconds * MAX_RATE)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True)
    found = [line[6:] for line in out.stdout.splitlines() if line.startswith("BENCH ")]
    if not found:
        raise RuntimeError(f"wrk printed no summary: {out.stdout[-300:]} {out.stderr[-300:]}")
    s = json.loads(found[0])
    acked = [i for f in cfg.workdir.glob(f"acks-{tag}*.txt") for i in f.read_text().split()]
    ok = s["requests"] - s["non_2xx"]
    p50, p99 = s["p50_us"] / 1e3, s["p99_us"] / 1e3
    return Load(ok, s["errors"] + s["non_2xx"], s["duration_us"] / 1e6, p50, p99, acked)


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_REQUEST = (
    b"POST %su%s@example.com?q=%s HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    b"x-request-id: %s\r\ncontent-length: 0\r\n\r\n"
)


async def asyncio_load(
    port: int,
    route: str,
    tag: str,
    conns: int,
    seconds: float,
    rate: float = 0,
    latencies: list[float] | None = None,
) -> Load:
    """A small HTTP/1.1 keep-alive load generator: `conns` closed loops, until the deadline
    or until seconds * MAX_RATE requests were taken.

    With `rate`, request n is due at start + n / rate instead, on the next free connection,
    and its latency counts from when it was due: a server that falls behind is charged for
    the requests it kept waiting (no coordinated omission). Each latency (s) is also appended
    to `latencies` when given, so that loads run side by side can be summed up as one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    numbers = itertools.count(1)
    latencies = [] if latencies is None else latencies
    acked: list[str] = []
    failed = 0
    route_b = route.encode()

    async def connection() -> None:
        nonlocal failed
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            failed += 1
            return
        try:
            while loop.time() < deadline and (n := next(numbers)) <= seconds * MAX_RATE:
                rid = f"{tag}{n}".encode()
                start = time.perf_counter()
                if rate:
                    due = paced_from + (n - 1) / rate
                    if due > start:
                        await asyncio.sleep(due - start)
                    start = due
                writer.write(_REQUEST % (route_b, rid, rid, rid))
                head = await reader.readuntil(b"\r\n\r\n")
                length = _CONTENT_LENGTH.search(head)
                await reader.readexactly(int(length[1]) if length else 0)
                latencies.append(time.perf_counter() - start)
                if head[9:12] == b"200":
                    acked.append(rid.decode())
                else:
                    failed += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            failed += 1
        finally:
            writer.close()

    started, paced_from = loop.time(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(connection() for _ in range(conns))), seconds + 15)
    elapsed = loop.time() - started
    latencies.sort()
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    return Load(len(acked), failed, elapsed, p50, p99, acked)


def combined(loads: list[Load]) -> Load:
    """Loads taken in turns, as one: summed counts and time, the worst of their percentiles."""
    return Load(
        ok=sum(load.ok for load in loads),
        failed=sum(load.failed for load in loads),
        seconds=sum(load.seconds for load in loads),
        p50_ms=max(load.p50_ms for load in loads),
        p99_ms=max(load.p99_ms for load in loads),
        acked=[rid for load in loads for rid in load.acked],
    )


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


# -- what the server left behind -------------------------------------------------------------

_WELL_FORMED = re.compile(rb"found query: [\w.-]+|message to u[\w.-]+@example\.com")


def expected_lines(rid: str) -> tuple[bytes, bytes]:
    """The two lines (without their newline) a request tagged `rid` makes its tasks write."""
    return f"found query: {rid}".encode(), f"message to u{rid}@example.com".encode()


def count_lines(*log_paths: Path) -> tuple[Counter[bytes], int]:
    """How often each line occurs across the files, and how many lines are malformed (an
    unterminated last line counts as one)."""
    counts: Counter[bytes] = Counter()
    unterminated = 0
    for path in log_paths:
        *lines, rest = (path.read_bytes() if path.exists() else b"").split(b"\n")
        counts.update(lines)
        unterminated += bool(rest)
    malformed = unterminated + sum(
        n for line, n in counts.items() if not _WELL_FORMED.fullmatch(line)
    )
    return counts, malformed


def check_lines(log_path: Path, acked: list[str]) -> dict[str, float]:
    """Count lost lines (of 200-acknowledged requests), duplicated and malformed lines."""
    counts, malformed = count_lines(log_path)
    expected = [line for rid in acked for line in expected_lines(rid)]
    return {
        "acked": len(acked),
        "lost": sum(counts[line] == 0 for line in expected),
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "malformed": malformed,
    }


def completion(data_dir: Path, acked: list[str], bound_s: float = 60.0) -> tuple[list[float], int]:
    """Once every task has finished: ms from each acknowledged response to its last write, for
    the requests still in the registry (how many of them were found, second)."""
    from server.paths import registry_path

    conn = sqlite3.connect(f"file:{registry_path(data_dir)}?mode=ro", uri=True, timeout=5)
    try:
        deadline = time.monotonic() + bound_s
        unfinished = "SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')"
        while conn.execute(unfinished).fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = conn.execute(
            "SELECT r.id, r.response_sent_at, max(t.finished_at), sum(t.status = 'done')"
            " FROM requests r JOIN tasks t ON t.request_id = r.id GROUP BY r.id"
        ).fetchall()
    finally:
        conn.close()
    wanted = set(acked)
    sampled = [row for row in rows if row[0] in wanted]
    delays = [(last - sent) * 1e3 for _, sent, last, done in sampled if done == 2 and sent]
    return delays, len(sampled)


def completion_summary(delays: list[float], sampled: int) -> dict[str, float]:
    delays = sorted(delays)
    return {
        "p50_ms": percentile(delays, 50),
        "p99_ms": percentile(delays, 99),
        "sampled": sampled,
        "not_done": sampled - len(delays),
    }


# -- one repeat: measures 1, 2, 3 and 6 ------------------------------------------------------


def one_repeat(cfg: Config) -> dict[str, dict[str, float]]:
    """Start each server in turn, load it, and return this repeat's numbers by section."""
    p = cfg.profile

    @contextlib.contextmanager
    def warm(app: str, delay: float = 0.0) -> Iterator[Server]:
        with serve(app, cfg.workdir, delay) as srv:
            # The first requests compile validators and fill caches: keep them out of the figures.
            run_load(cfg, srv, NOTIFY, "W", 4, WARM_UP_S)
            yield srv

    with warm("bgtasks", delay=1.0) as slow:
        slow_lat = run_load(cfg, slow, NOTIFY, "S", 4, p.latency_seconds, rate=PACED_RATE)
        unfinished = unfinished_tasks(slow.port)
        slow_closed = run_load(cfg, slow, NOTIFY, "s", 4, p.latency_seconds)
    with warm("bgtasks") as fast:
        fast_lat = run_load(cfg, fast, NOTIFY, "F", 4, p.latency_seconds, rate=PACED_RATE)
        fast_closed = run_load(cfg, fast, NOTIFY, "f", 4, p.latency_seconds)
        # Notify and its baseline take turns, in halves, so a slow spell of a shared machine
        # does not land on one of them only; each notify half's tasks finish before the next.
        # Completion is read before the baseline's requests push notify's out of retention.
        halves: dict[str, list[Load]] = {NOTIFY: [], PLAIN: []}
        delays: list[float] = []
        sampled = 0
        with fast.largest_registry_mb() as registry_mb:
            for tags in ("TQ", "tq"):
                for route, tag in zip((NOTIFY, PLAIN), tags, strict=True):
                    load = run_load(cfg, fast, route, tag, 50, p.load_seconds // 2)
                    halves[route].append(load)
                    if route == NOTIFY:
                        found, count = completion(fast.data_dir, load.acked)
                        delays, sampled = delays + found, sampled + count
        notify, same_shape = combined(halves[NOTIFY]), combined(halves[PLAIN])
        done = completion_summary(delays, sampled)
        lines = check_lines(fast.data_dir / "log.txt", notify.acked)
        bg_start, bg_rss = fast.startup_s, fast.rss_mb()
    with warm("bare") as bare:
        bare_load = run_load(cfg, bare, NOTIFY, "B", 50, p.load_seconds)
    with warm("reference") as ref:
        ref_notify = run_load(cfg, ref, NOTIFY, "R", 50, p.load_seconds)
        ref_plain = run_load(cfg, ref, PLAIN, "P", 50, p.load_seconds)
        ref_start, ref_rss = ref.startup_s, ref.rss_mb()
    loads = (notify, same_shape, bare_load, ref_notify, ref_plain)
    return {
        "response_latency": {
            "delay1_p50_ms": slow_lat.p50_ms,
            "delay1_p99_ms": slow_lat.p99_ms,
            "delay0_p50_ms": fast_lat.p50_ms,
            "delay0_p99_ms": fast_lat.p99_ms,
            "p50_ratio": slow_lat.p50_ms / fast_lat.p50_ms,
            "p99_ratio": slow_lat.p99_ms / fast_lat.p99_ms,
            "tasks_unfinished": unfinished,
            "closed_delay1_p50_ms": slow_closed.p50_ms,
            "closed_delay0_p50_ms": fast_closed.p50_ms,
            "closed_p50_ratio": slow_closed.p50_ms / fast_closed.p50_ms,
            "closed_p99_ratio": slow_closed.p99_ms / fast_closed.p99_ms,
            "failed": slow_lat.failed + fast_lat.failed + slow_closed.failed + fast_closed.failed,
        },
        "throughput": {
            "bgtasks_notify_rps": notify.rps,
            "bgtasks_same_shape_rps": same_shape.rps,
            "bgtasks_ratio": notify.rps / same_shape.rps,
            "bare_rps": bare_load.rps,
            "reference_notify_rps": ref_notify.rps,
            "reference_plain_rps": ref_plain.rps,
            "reference_ratio": ref_notify.rps / ref_plain.rps,
            "failed": sum(load.failed for load in loads),
        },
        "completion": {**done, **lines},
        "server": {
            "bgtasks_start_s": bg_start,
            "reference_start_s": ref_start,
            "bgtasks_rss_mb": bg_rss,
            "reference_rss_mb": ref_rss,
            "bgtasks_registry_largest_mb": registry_mb[0],
        },
    }


# -- measure 4: following a file --------------------------------------------------------------

_PROBE = re.compile(r"bench-(ready|probe) (\d+)")


def follow_latency(argv: list[str], log_path: Path, lines: int, as_json: bool) -> dict[str, Any]:
    """Append `lines` lines 10 ms apart and time each one's appearance on the follower's stdout.

    With `as_json` the delay is taken to the follower's own `at` timestamp (arrival on our side
    is kept as `arrival_p95_ms`); otherwise to when a reader thread got the line.
    """
    log_path.touch()
    errors = log_path.with_name("follower.stderr")
    with errors.open("w") as err:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True
            )
        except OSError as exc:
            return {"unavailable": str(exc)}
    stdout = proc.stdout
    assert stdout is not None
    arrivals: queue.Queue[tuple[float, str]] = queue.Queue()

    def read_lines() -> None:
        for line in stdout:
            arrivals.put((time.time(), line))

    threading.Thread(target=read_lines, daemon=True).start()
    seen: dict[int, tuple[float, float]] = {}  # probe number -> (arrival, follower's time)

    def collect(wait: float) -> bool:
        """Take what arrives within `wait` s; True if a ready line was among it."""
        ready, end = False, time.monotonic() + wait
        while (left := end - time.monotonic()) > 0:
            try:
                arrived, text = arrivals.get(timeout=left)
            except queue.Empty:
                break
            at = arrived
            if as_json:
                record = json.loads(text)
                text, at = record["text"], float(record["at"])
            if match := _PROBE.search(text):
                ready = ready or match[1] == "ready"
                if match[1] == "probe":
                    seen[int(match[2])] = (arrived, at)
        return ready

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    try:
        # Ready once a line written after the follower started shows up.
        for attempt in range(100):
            if proc.poll() is not None:
                return {"unavailable": f"exited {proc.returncode}: {last_line(errors)}"}
            os.write(fd, f"bench-ready {attempt}\n".encode())
            if collect(0.1):
                break
        else:
            return {"unavailable": f"showed no line within 10 s: {last_line(errors)}"}
        written = []
        for i in range(lines):
            written.append(time.time())
            os.write(fd, f"bench-probe {i}\n".encode())
            time.sleep(0.01)
        give_up = time.monotonic() + 3
        while len(seen) < lines and time.monotonic() < give_up:
            collect(0.1)
    except (ValueError, KeyError, TypeError) as exc:
        return {"unavailable": f"unexpected output: {exc!r}"}
    finally:
        os.close(fd)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    own = sorted((at - written[i]) * 1e3 for i, (_, at) in seen.items())
    arrival = sorted((arrived - written[i]) * 1e3 for i, (arrived, _) in seen.items())
    return {
        "p50_ms": percentile(own, 50),
        "p95_ms": percentile(own, 95),
        "arrival_p95_ms": percentile(arrival, 95),
        "missed": lines - len(seen),
    }


def measure_tail(cfg: Config, bgtasks: str | None) -> dict[str, Any]:
    """Measure 4: `bgtasks tail --json` and GNU `tail -F` on the same kind of appends."""
    results: dict[str, Any] = {}
    for name in ("bgtasks", "gnu_tail"):
        data_dir = Path(tempfile.mkdtemp(prefix=f"tail-{name}-", dir=cfg.workdir))
        log = data_dir / "log.txt"
        if name == "gnu_tail":
            argv = ["tail", "-F", "-n", "0", str(log)] if shutil.which("tail") else []
        else:
            argv = [bgtasks, "tail", "--file", "log", "-n", "0", "--json"] if bgtasks else []
            argv += ["--data-dir", str(data_dir)] if bgtasks else []
        if not argv:
            results[name] = {"unavailable": "not installed"}
            continue
        results[name] = follow_latency(argv, log, cfg.profile.tail_lines, name == "bgtasks")
    return results


# -- measure 5: CLI start-up -------------------------------------------------------------------


def time_commands(commands: dict[str, list[str]], runs: int) -> dict[str, float | str]:
    """Median wall time of each command after one warm-up run, or why it could not be
    measured. The commands take turns, so a slow spell of a shared machine hits them all."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    failed: dict[str, str] = {}
    for i in range(runs + 1):
        for name, argv in commands.items():
            if name in failed:
                continue
            started = time.perf_counter()
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True, timeout=60,
            )  # fmt: skip
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
                failed[name] = f"unavailable: {lines[-1]}"
            elif i:
                times[name].append(time.perf_counter() - started)
    return {name: failed.get(name) or statistics.median(times[name]) for name in commands}


def find_tool(name: str) -> str | None:
    """A console script of this interpreter's environment first, else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def measure_cli(cfg: Config, bgtasks: str | None) -> dict[str, Any]:
    """Measure 5: `bgtasks notify --no-wait` and `bgtasks --help` against HTTPie's POST."""
    runs, httpie = cfg.profile.cli_runs, find_tool("http")
    notify: float | str = "unavailable: bgtasks is not installed"
    help_: float | str = notify
    http: float | str = "skipped: HTTPie (`http`) is not installed"
    with serve("bgtasks", cfg.workdir) as srv:
        commands: dict[str, list[str]] = {}
        if bgtasks:
            args = ["notify", "u@example.com", "--q", "x", "--no-wait", "--url", srv.url]
            commands["notify"] = [bgtasks, *args]
            commands["help"] = [bgtasks, "--help"]
        if httpie:
            url = f"{srv.url}/send-notification/u@example.com"
            commands["http"] = [httpie, "--ignore-stdin", "POST", url, "q==x"]
        timed = time_commands(commands, runs)
    notify = timed.get("notify", notify)
    help_ = timed.get("help", help_)
    http = timed.get("http", http)
    result: dict[str, Any] = {"bgtasks_notify_s": notify, "bgtasks_help_s": help_, "httpie_s": http}
    for key, value in (("notify_vs_httpie", notify), ("help_vs_httpie", help_)):
        if isinstance(value, float) and isinstance(http, float):
            result[key] = value / http
        else:
            result[key] = "unavailable"
    return result


# -- report ------------------------------------------------------------------------------------


def machine(generator: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    from importlib.metadata import version

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        models = re.findall(r"model name\s*: (.+)", Path("/proc/cpuinfo").read_text())
        cpu = models[0] if models else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvloop": HAS_UVLOOP,
        "httptools": HAS_HTTPTOOLS,
        "wrk": shutil.which("wrk") is not None,
        "load_generator": generator,
        "load_average_1min_at_start": os.getloadavg()[0],
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--", "server", "bgtasks_cli")),
        "fastapi": version("fastapi"),
        "uvicorn": version("uvicorn"),
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def medians(repeats: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        section: {key: statistics.median(r[section][key] for r in repeats) for key in values}
        for section, values in repeats[0].items()
    }


def fmt(*values: Any) -> str:
    """Numbers to 3 significant digits (whole numbers from 100 up), joined with " / "."""

    def one(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

    return " / ".join(one(v) for v in values)


def checks(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(measure, value, goal, met) rows; met is None where issue 4 sets no goal."""
    lat, tput, comp = results["response_latency"], results["throughput"], results["completion"]
    tail, cli, srv = results["tail"], results["cli"], results["server"]
    rows: list[tuple[str, str, str, bool | None]] = []

    def row(measure: str, value: str, goal: str = "", met: bool | None = None) -> None:
        rows.append((measure, value, goal, met))

    def at_most(value: Any, limit: float) -> bool | None:
        return value <= limit if isinstance(value, float) else None

    rate = f"paced {PACED_RATE:.0f}/s"
    for pct in ("p50", "p99"):
        ratio = lat[f"{pct}_ratio"]
        row(f"1 response {pct}, delay 1 s ÷ 0 ({rate})", fmt(ratio), "≤ 1.2", ratio <= 1.2)
    row("1 response p50 / p99 ms, delay 1 s", fmt(lat["delay1_p50_ms"], lat["delay1_p99_ms"]))
    row("1 response p50 / p99 ms, delay 0", fmt(lat["delay0_p50_ms"], lat["delay0_p99_ms"]))
    row("1 tasks unfinished at the end, delay 1 s", fmt(lat["tasks_unfinished"]))
    row("1 closed loop p50 / p99, 1 s ÷ 0 (4 conns)",
        fmt(lat["closed_p50_ratio"], lat["closed_p99_ratio"]), "(info)")  # fmt: skip
    ratio = tput["bgtasks_ratio"]
    row("2 bgtasks notify ÷ same shape, same server", fmt(ratio), "≥ 0.8", ratio >= 0.8)
    row("2 reference notify ÷ plain route", fmt(tput["reference_ratio"]), "≈ 0.20 (info)")
    row("2 req/s bgtasks notify / same shape",
        fmt(tput["bgtasks_notify_rps"], tput["bgtasks_same_shape_rps"]))  # fmt: skip
    row("2 req/s plain FastAPI route (bare_app)", fmt(tput["bare_rps"]), "(info)")
    row("2 req/s reference notify / plain",
        fmt(tput["reference_notify_rps"], tput["reference_plain_rps"]))  # fmt: skip
    row("3 response → last write p50 / p99 ms",
        f"{fmt(comp['p50_ms'], comp['p99_ms'])} ({comp['sampled']:.0f} sampled)")  # fmt: skip
    bad = (comp["lost"], comp["duplicated"], comp["malformed"])
    row("3 lines lost / duplicated / malformed",
        f"{fmt(*bad)} of {comp['acked']:.0f} acked", "0", sum(bad) == 0)  # fmt: skip
    bg_tail = tail["bgtasks"].get("p95_ms", tail["bgtasks"].get("unavailable"))
    row("4 bgtasks tail p95 ms", fmt(bg_tail), "≤ 10", at_most(bg_tail, 10.0))
    row("4 GNU tail -F p95 ms", fmt(tail["gnu_tail"].get("p95_ms", "unavailable")), "(info)")
    for key, label in (("notify_vs_httpie", "notify --no-wait"), ("help_vs_httpie", "--help")):
        row(f"5 bgtasks {label} ÷ HTTPie", fmt(cli[key]), "≤ 0.7", at_most(cli[key], 0.7))
    row("5 wall s: notify / --help / HTTPie",
        fmt(cli["bgtasks_notify_s"], cli["bgtasks_help_s"], cli["httpie_s"]))  # fmt: skip
    row("6 start to first 200 s, bgtasks / ref",
        fmt(srv["bgtasks_start_s"], srv["reference_start_s"]), "(info)")  # fmt: skip
    row("6 RSS after load MB, bgtasks / ref",
        fmt(srv["bgtasks_rss_mb"], srv["reference_rss_mb"]), "(info)")  # fmt: skip
    row("6 registry on disk, largest in load MB", fmt(srv["bgtasks_registry_largest_mb"]), "(info)")
    return rows


def print_report(report: dict[str, Any], judged: bool) -> None:
    """The rich table, the machine and the command."""
    from rich.console import Console
    from rich.table import Table

    m = report["machine"]
    table = Table(title=f"bgtasks benchmark ({report['mode']}, medians of {report['repeats']})")
    for column in ("measure", "value", "goal", "result"):
        table.add_column(column)
    for measure, value, goal, met in report["checks"]:
        verdict = "" if met is None else ("pass" if met else "FAIL")
        table.add_row(measure, value, goal, verdict if judged else verdict and "not judged")
    console = Console(width=120)
    console.print(table)
    console.print(
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, uvloop {m['uvloop']}, "
        f"httptools {m['httptools']}, wrk {m['wrk']} (load: {m['load_generator']}); "
        f"load average at start {m['load_average_1min_at_start']:.2f}"
    )
    console.print(f"command: {report['command']} (commit {m['commit']})")


def main(argv: list[str] | None = None) -> int:
    """Run every measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small counts, under 60 s")
    parser.add_argument("--repeats", type=int, help="default 3 (2 with --store), or 1 with --quick")
    parser.add_argument(
        "--out", type=Path, help="default results/latest.json (results/stores.json with --store)"
    )
    parser.add_argument("--generator", choices=("auto", "wrk", "asyncio"), default="auto")
    parser.add_argument(
        "--store",
        choices=("postgres",),
        help="instead, the PostgreSQL store against the SQLite one (benchmarks/stores.py)",
    )
    parser.add_argument(
        "--conns", type=int, default=50, help="with --store: the load's connections (default 50)"
    )
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="with --store postgres: a loopback server, where a database of its own is made",
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench.py", *(argv or sys.argv[1:])])
    if args.store:
        import stores

        return stores.main(args, command)
    args.out = args.out or HERE / "results" / "latest.json"
    repeats = args.repeats or (1 if args.quick else 3)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "asyncio"
    bgtasks = find_tool("bgtasks")
    host = machine(generator)
    with tempfile.TemporaryDirectory(prefix="bgtasks-bench-") as tmp:
        cfg = Config(QUICK if args.quick else FULL, generator, Path(tmp))
        runs = []
        for i in range(repeats):
            print(f"repeat {i + 1}/{repeats} ...", file=sys.stderr, flush=True)
            runs.append(one_repeat(cfg))
        print("tail and CLI ...", file=sys.stderr, flush=True)
        results: dict[str, Any] = medians(runs)
        results["tail"] = measure_tail(cfg, bgtasks)
        results["cli"] = measure_cli(cfg, bgtasks)
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mode": "quick" if args.quick else "full",
        "repeats": repeats,
        "machine": host,
        "profile": asdict(cfg.profile),
        "results": results,
        "per_repeat": runs,
    }
    report["checks"] = checks(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_report(report, judged=not args.quick)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
