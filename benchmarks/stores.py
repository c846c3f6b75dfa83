"""The PostgreSQL store against the SQLite one, in one run (issue 15): `bench.py --store postgres`.

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth for user postgres):

    python benchmarks/bench.py --store postgres           # 2 rounds, about 2.5 minutes on 2 cores
    python benchmarks/bench.py --store postgres --quick   # 1 small round, under 60 s

Three configurations, each served as bench.py serves bgtasks (`same_shape_app.py`: the factory
`bgtasks serve` runs, under uvicorn with uvloop and httptools when installed, delay 0):
SQLite with one process; PostgreSQL with one process; PostgreSQL with two processes, each with
a data directory of its own and one database, the load's connections split evenly across the
two ports. For each one, two phases, each on fresh servers (and a fresh registry):

  1. throughput: a warm-up, then 50 closed-loop connections (`--conns`; bench.py's asyncio
     generator) for `load_seconds`. req/s is 200s ÷ the load's duration; p50/p99 are over
     every response of every port together. The end-to-end rate is the acknowledged requests
     whose two lines are both in log.txt (bench.py's line counting, over every data
     directory) ÷ the time from the first request to the last line written (the latest mtime
     of the log.txt files, read once every task has finished). Where the time went: the
     registry's own commit timings (its /metrics commit and batch-size histograms, before and
     after the load) and CPU µs per request of the servers, of their PostgreSQL backends, of
     the load generator and of everything else on the machine (other users of the cores).
  2. kill -9: the same load with a task delay of KILL_DELAY_S, so that many tasks are queued,
     asleep or claimed when process 1 gets SIGKILL at KILL_AT of the load. The load goes on
     against the survivor, if any; then process 1 is started again on its data directory (its
     claimed lines resolve there; the survivor, or with one process the restarted one, adopts
     the rest), and once every task has finished the acknowledged requests are counted
     against the lines of every log.txt: lost, duplicated and malformed lines.

Configurations take turns in each round (reversed in the next), so a slow spell of a shared
machine does not land on one only; ratios are taken within a round, figures are medians over
rounds. The database is `bgtasks_bench_<12 hex digits>`, made for this run and dropped at its
end (its sessions ended first), also on a failure, Ctrl-C or SIGTERM; its schema is dropped
between phases. Only loopback servers are accepted; every load is bounded in requests and
seconds. Goals are judged only in a full run and never make the script fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import bench
import bench_db
import usage

CONNS = 50
KILL_DELAY_S = 0.5
KILL_AT = 0.5
SETTLE_BOUND_S = 60.0
# What the commit sessions were seen doing (bench_db.commit_session_states); all zero on SQLite.
SESSION_STATES = (
    "idle",
    "waits for the client",
    "works",
    "IO:WALSync",
    "IO:WALWrite",
    "LWLock:WALWrite",
)
GOALS = {"pg1_vs_sqlite": 0.6, "pg2_vs_pg1": 1.3}


@dataclass(frozen=True)
class Profile:
    """How much load each phase gets, per configuration."""

    warm_up_s: float
    load_seconds: float
    kill_seconds: float
    conns: int = CONNS  # the load's connections, split evenly across the processes


FULL = Profile(warm_up_s=1, load_seconds=10, kill_seconds=6)
QUICK = Profile(warm_up_s=0.5, load_seconds=1.5, kill_seconds=1.5)


@dataclass(frozen=True)
class Setup:
    """One configuration: its store and how many processes share the load."""

    key: str
    label: str
    postgres: bool
    processes: int


SETUPS = (
    Setup("sqlite_1", "SQLite, 1 process", postgres=False, processes=1),
    Setup("pg_1", "PostgreSQL, 1 process", postgres=True, processes=1),
    Setup("pg_2", "PostgreSQL, 2 processes", postgres=True, processes=2),
)


# -- servers and loads -----------------------------------------------------------------------


@contextlib.contextmanager
def servers(setup: Setup, workdir: Path, url: str, delay: float) -> Iterator[list[bench.Server]]:
    """The setup's processes, on fresh data directories; on PostgreSQL, a fresh registry
    after they stop."""
    env = {"BGTASKS_DATABASE_URL": url} if setup.postgres else {}
    try:
        with contextlib.ExitStack() as stack:
            yield [
                stack.enter_context(bench.serve("bgtasks", workdir, delay, env=env))
                for _ in range(setup.processes)
            ]
    finally:
        if setup.postgres:
            bench_db.fresh_registry(url)


async def split_load(
    srvs: list[bench.Server],
    tag: str,
    seconds: float,
    conns: int = CONNS,
    kill_after: float | None = None,
) -> bench.Load:
    """`conns` connections split evenly across the servers, as one load; with `kill_after`,
    the first server gets SIGKILL that many seconds in (the rest of its connections fail)."""
    sinks: list[list[float]] = [[] for _ in srvs]
    per = conns // len(srvs)
    jobs = [
        bench.asyncio_load(srv.port, bench.NOTIFY, f"{tag}{chr(97 + i)}", per, seconds, 0, sink)
        for i, (srv, sink) in enumerate(zip(srvs, sinks, strict=True))
    ]

    async def kill() -> None:
        assert kill_after is not None
        await asyncio.sleep(kill_after)
        srvs[0].proc.kill()

    loads = await asyncio.gather(*jobs, *([kill()] if kill_after is not None else []))
    parts = [load for load in loads if isinstance(load, bench.Load)]
    latencies = sorted(x for sink in sinks for x in sink)
    return bench.Load(
        ok=sum(p.ok for p in parts),
        failed=sum(p.failed for p in parts),
        seconds=max(p.seconds for p in parts),
        p50_ms=bench.percentile(latencies, 50) * 1e3,
        p99_ms=bench.percentile(latencies, 99) * 1e3,
        acked=[rid for p in parts for rid in p.acked],
    )


@contextlib.contextmanager
def nothing() -> Iterator[Counter[str]]:
    yield Counter()


def settle(srvs: list[bench.Server]) -> None:
    """Wait (bounded) until no server has a queued or running task."""
    deadline = time.monotonic() + SETTLE_BOUND_S
    while any(bench.unfinished_tasks(srv.port) for srv in srvs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"tasks still unfinished after {SETTLE_BOUND_S:.0f} s")
        time.sleep(0.05)


def logs(srvs: list[bench.Server]) -> list[Path]:
    return [srv.data_dir / "log.txt" for srv in srvs]


def complete_requests(log_paths: list[Path], acked: list[str]) -> int:
    """Acknowledged requests whose two lines are both written, in any of the files."""
    counts, _ = bench.count_lines(*log_paths)
    return sum(all(counts[line] for line in bench.expected_lines(rid)) for rid in acked)


# -- the two phases --------------------------------------------------------------------------


def throughput(setup: Setup, p: Profile, workdir: Path, url: str) -> dict[str, float]:
    """Phase 1: req/s, latency, end-to-end rate and the registry's commits under load."""
    with servers(setup, workdir, url, delay=0.0) as srvs:
        bench.run_async(split_load(srvs, "W", p.warm_up_s, p.conns))
        settle(srvs)
        ports, pids = [srv.port for srv in srvs], [srv.proc.pid for srv in srvs]
        before = usage.commit_tallies(ports)
        pg = bench_db.backends(url) if setup.postgres else []
        sampled = bench_db.commit_session_states(url) if setup.postgres else nothing()
        with usage.cpu_shares(pids, pg) as cpu, sampled as states:
            first_request = time.time()
            load = bench.run_async(split_load(srvs, "T", p.load_seconds, p.conns))
        settle(srvs)
        last_write = max(path.stat().st_mtime for path in logs(srvs))
        after = usage.commit_tallies(ports)
        complete = complete_requests(logs(srvs), load.acked)
        lines = bench.count_lines(*logs(srvs))[1]
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    commits = delta.get("bgtasks_registry_commit_seconds_count", 0.0)
    per = max(commits, 1.0)
    return {
        "rps": load.rps,
        "e2e_rps": complete / (last_write - first_request),
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "acked": len(load.acked),
        "complete": complete,
        "failed": load.failed,
        "malformed": lines,
        "first_request_to_last_write_s": last_write - first_request,
        "commits_per_s": commits / load.seconds,
        "commit_mean_ms": delta.get("bgtasks_registry_commit_seconds_sum", 0.0) / per * 1e3,
        "commit_busy_share": delta.get("bgtasks_registry_commit_seconds_sum", 0.0)
        / (load.seconds * setup.processes),
        "batch_mean": delta.get("bgtasks_registry_batch_size_sum", 0.0) / per,
        **{f"cpu_us_per_request_{key}": value / load.ok * 1e6 for key, value in cpu.items()},
        **{f"commit_session_{key}": states[key] / max(1, states.total()) for key in SESSION_STATES},
    }


def kill_nine(setup: Setup, p: Profile, workdir: Path, url: str) -> dict[str, float]:
    """Phase 2: kill -9 of process 1 mid-load, its restart, then lines against the acks."""
    env = {"BGTASKS_DATABASE_URL": url} if setup.postgres else {}
    with servers(setup, workdir, url, delay=KILL_DELAY_S) as srvs:
        victim = srvs[0]
        load = bench.run_async(
            split_load(srvs, "K", p.kill_seconds, p.conns, p.kill_seconds * KILL_AT)
        )
        victim.proc.wait(bench.STOP_BOUND_S)
        restart = bench.serve("bgtasks", workdir, KILL_DELAY_S, data_dir=victim.data_dir, env=env)
        with restart as again:
            alive = [again, *srvs[1:]]
            settle(alive)
            counts, malformed = bench.count_lines(*logs(alive))
    expected = [line for rid in load.acked for line in bench.expected_lines(rid)]
    return {
        "acked": len(load.acked),
        "lost": sum(counts[line] == 0 for line in expected),
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "malformed": malformed,
        "failed": load.failed,
        "killed_after_s": p.kill_seconds * KILL_AT,
    }


# -- report ----------------------------------------------------------------------------------


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    e2e = {key: results[key]["throughput"]["e2e_rps"] for key in results}
    return {"pg1_vs_sqlite": e2e["pg_1"] / e2e["sqlite_1"], "pg2_vs_pg1": e2e["pg_2"] / e2e["pg_1"]}


def medians(rounds: list[Any]) -> Any:
    """Per-round numbers (floats, or dicts of them, nested) as their medians."""
    if not isinstance(rounds[0], dict):
        return statistics.median(rounds)
    return {key: medians([r[key] for r in rounds]) for key in rounds[0]}


def print_report(report: dict[str, Any], judged: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    res, m = report["results"], report["machine"]
    table = Table(title=f"bgtasks stores ({report['mode']}, medians of {report['rounds']})")
    for column in (
        "configuration",
        "req/s",
        "end-to-end req/s",
        "p50 / p99 ms",
        "commits/s, mean ms, batch",
        "kill -9: lost / dup / malformed of acked",
    ):
        table.add_column(column)  # fmt: skip
    for setup in SETUPS:
        t, k = res[setup.key]["throughput"], res[setup.key]["kill"]
        table.add_row(
            setup.label,
            bench.fmt(t["rps"]),
            bench.fmt(t["e2e_rps"]),
            bench.fmt(t["p50_ms"], t["p99_ms"]),
            bench.fmt(t["commits_per_s"], t["commit_mean_ms"], t["batch_mean"]),
            f"{bench.fmt(k['lost'], k['duplicated'], k['malformed'])} of {k['acked']:,.0f}",
        )
    console = Console(width=140)
    console.print(table)
    for setup in SETUPS:
        t = res[setup.key]["throughput"]
        cpu = ", ".join(
            f"{part} {t[f'cpu_us_per_request_{part}']:,.0f}"
            for part in ("server", "postgres", "generator", "other", "idle")
        )
        line = f"{setup.label}: CPU µs per request: {cpu}"
        if setup.postgres:
            seen = ", ".join(f"{s} {t[f'commit_session_{s}']:.0%}" for s in SESSION_STATES)
            line += f"; commit sessions seen: {seen}"
        console.print(line)
    for key, value in report["ratios"].items():
        met = value >= GOALS[key]
        verdict = ("pass" if met else "FAIL") if judged else "not judged"
        console.print(f"{key}: {value:.3f} (goal ≥ {GOALS[key]}) {verdict}")
    console.print(
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, uvloop {m['uvloop']}, "
        f"httptools {m['httptools']}; load average at start / end "
        f"{m['load_average_1min_at_start']:.2f} / {report['load_average_1min_at_end']:.2f}"
    )
    console.print(f"command: {report['command']} (commit {m['commit']})")


def main(args: argparse.Namespace, command: str) -> int:
    """Run the comparison, print the table, write the JSON."""
    if not bench_db.is_loopback(args.pg_url):
        raise SystemExit("--pg-url must name a loopback server: the load stays on this machine")
    profile = replace(QUICK if args.quick else FULL, conns=args.conns)
    rounds = args.repeats or (1 if args.quick else 2)
    out = args.out or bench.HERE / "results" / "stores.json"
    host = bench.machine("asyncio")
    per_round: list[dict[str, Any]] = []
    with (
        bench_db.bench_database(args.pg_url) as url,
        tempfile.TemporaryDirectory(prefix="bgtasks-stores-") as tmp,
    ):
        for i in range(rounds):
            order = SETUPS if i % 2 == 0 else SETUPS[::-1]
            found: dict[str, Any] = {}
            for setup in order:
                print(f"round {i + 1}/{rounds}: {setup.label} ...", file=sys.stderr, flush=True)
                workdir = Path(tempfile.mkdtemp(prefix=f"{setup.key}-", dir=tmp))
                found[setup.key] = {
                    "throughput": throughput(setup, profile, workdir, url),
                    "kill": kill_nine(setup, profile, workdir, url),
                }
            per_round.append({"results": found, "ratios": ratios(found)})
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mode": "quick" if args.quick else "full",
        "database": url.rsplit("/", 1)[1],  # dropped by now
        "rounds": rounds,
        "machine": host,
        "load_average_1min_at_end": os.getloadavg()[0],
        "profile": asdict(profile),
        "results": medians([r["results"] for r in per_round]),
        "ratios": medians([r["ratios"] for r in per_round]),
        "per_round": per_round,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_report(report, judged=not args.quick)
    print(f"wrote {out}", file=sys.stderr)
    return 0
