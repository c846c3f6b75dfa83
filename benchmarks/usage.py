"""Where a load's time went: CPU seconds by process, from /proc, and the registry's own commit
timings, from a server's /metrics."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pids: list[int]) -> float:
    """User and system CPU seconds the processes have used, from /proc."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / TICK


@contextlib.contextmanager
def cpu_shares(servers_pids: list[int], pg: list[int]) -> Iterator[dict[str, float]]:
    """CPU seconds the block took of the servers, of their PostgreSQL backends `pg`, of this
    process (the load generator), of everything else on the machine, and idle (all cores)."""
    own = time.process_time
    start = {"server": cpu_s(servers_pids), "postgres": cpu_s(pg), "generator": own()}
    machine, wall = busy_s(), time.perf_counter()
    used: dict[str, float] = {}
    yield used
    used |= {
        "server": cpu_s(servers_pids) - start["server"],
        "postgres": cpu_s(pg) - start["postgres"],
        "generator": own() - start["generator"],
    }
    used["other"] = busy_s() - machine - sum(used.values())
    used["idle"] = (os.cpu_count() or 1) * (time.perf_counter() - wall) - busy_s() + machine


_SAMPLE = re.compile(r"^(bgtasks_registry_(?:commit_seconds|batch_size)_(?:sum|count)) (\S+)$")


def commit_tallies(ports: list[int]) -> dict[str, float]:
    """The registry's commit and batch-size histograms' sums and counts, summed over the
    servers on 127.0.0.1 at `ports`."""
    totals: dict[str, float] = {}
    for port in ports:
        conn = HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        for line in text.splitlines():
            if match := _SAMPLE.match(line):
                totals[match[1]] = totals.get(match[1], 0.0) + float(match[2])
    return totals
