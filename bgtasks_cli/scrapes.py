"""What `bgtasks stats` shows, from two scrapes of a server's `/metrics` taken a known
interval apart: the counts since the server started (from the second), and over the interval
the rates (the counters' increase ÷ its seconds) and latency percentiles (estimated from the
histograms' bucket increases, as Prometheus' `histogram_quantile` does: linearly within the
bucket the percentile falls in). A counter that went down means the server started again
in between: its increase is then its new value, as Prometheus counts it.

Pure: parsing and arithmetic here, drawing in `stats_table`, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.status import ENDED

if TYPE_CHECKING:
    from rich.console import RenderableType

Labels = tuple[tuple[str, str], ...]
QUANTILES = (0.5, 0.9, 0.99)
TASKS = "bgtasks_tasks_total"
UNFINISHED = "bgtasks_tasks_unfinished"
# What each latency histogram is shown as, in this order.
LATENCIES = {
    "wait": ("bgtasks_task_wait_seconds", "queued → started"),
    "run": ("bgtasks_task_run_seconds", "started → ended"),
    "response_to_write": ("bgtasks_response_to_write_seconds", "response → line on disk"),
    "commit": ("bgtasks_registry_commit_seconds", "registry commit"),
}
STATUSES = [str(status) for status in sorted(ENDED)]


class NotMetrics(ValueError):
    """The text is not a bgtasks server's metrics."""


@dataclass(frozen=True)
class Scrape:
    """One reading of /metrics: every sample's value by name and labels, and when (the
    client's monotonic clock, seconds)."""

    at: float
    samples: dict[tuple[str, Labels], float]

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(
            value
            for (key, got), value in self.samples.items()
            if key == name and wanted <= set(got)
        )

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """A histogram's (upper bound, cumulative count), lowest first; +Inf last."""
        found = [
            (float(dict(labels)["le"]), value)
            for (key, labels), value in self.samples.items()
            if key == f"{name}_bucket"
        ]
        return sorted(found)


def parse(text: str, at: float) -> Scrape:
    """A scrape from Prometheus' text format. Raises NotMetrics if it is not that, or has no
    bgtasks task counts."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, Labels], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    except (ValueError, TypeError, IndexError) as exc:
        raise NotMetrics(f"not Prometheus' text format ({exc})") from None
    if not any(name == TASKS for name, _ in samples):
        raise NotMetrics(f"no {TASKS} in it")
    return Scrape(at, samples)


@dataclass(frozen=True)
class Percentiles:
    """Estimated percentiles (milliseconds) of the observations in the window."""

    count: int
    values: dict[float, float]  # by quantile


@dataclass(frozen=True)
class Stats:
    url: str
    window_s: float
    restarted: bool
    totals: dict[str, int]  # by status, since the server started
    unfinished: int
    in_window: dict[str, int]  # by status: tasks that ended in the window
    latency: dict[str, Percentiles | None] = field(default_factory=dict)  # None: no tasks
    commits_per_second: float = 0.0
    mean_batch_size: float | None = None

    def per_second(self, status: str) -> float:
        return self.in_window[status] / self.window_s


def _increase(before: float, after: float) -> float:
    return after - before if after >= before else after


def compare(first: Scrape, second: Scrape, url: str) -> Stats:
    """What the two scrapes say, over the time between them."""
    window = max(second.at - first.at, 1e-9)
    restarted = any(value < first.samples.get(key, 0.0) for key, value in second.samples.items())
    totals = {status: int(second.total(TASKS, status=status)) for status in STATUSES}
    in_window = {
        status: int(
            _increase(first.total(TASKS, status=status), second.total(TASKS, status=status))
        )
        for status in STATUSES
    }
    latency = {key: _percentiles(first, second, name) for key, (name, _) in LATENCIES.items()}
    commits = _increase(
        first.get("bgtasks_registry_commit_seconds_count"),
        second.get("bgtasks_registry_commit_seconds_count"),
    )
    changes = _increase(
        first.get("bgtasks_registry_batch_size_sum"), second.get("bgtasks_registry_batch_size_sum")
    )
    return Stats(
        url=url,
        window_s=window,
        restarted=restarted,
        totals=totals,
        unfinished=int(second.get(UNFINISHED)),
        in_window=in_window,
        latency=latency,
        commits_per_second=commits / window,
        mean_batch_size=changes / commits if commits else None,
    )


def _percentiles(first: Scrape, second: Scrape, name: str) -> Percentiles | None:
    before = dict(first.buckets(name))
    after = second.buckets(name)
    if any(value < before.get(bound, 0.0) for bound, value in after):
        before = {}  # the server started again: everything in it is new
    increase = [(bound, value - before.get(bound, 0.0)) for bound, value in after]
    if not increase or increase[-1][1] <= 0:
        return None
    return Percentiles(
        count=int(increase[-1][1]),
        values={q: quantile(q, increase) * 1000 for q in QUANTILES},
    )


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' `histogram_quantile`: the q-quantile of observations counted in
    cumulative `buckets` (upper bound, count; +Inf last), interpolated linearly within its
    bucket; one above every finite bound is given as the highest finite bound."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


# -- presentation ---------------------------------------------------------------------------


def stats_json(stats: Stats) -> dict[str, Any]:
    """The stats as one JSON document (stable field names)."""
    return {
        "url": stats.url,
        "window_s": round(stats.window_s, 3),
        "restarted": stats.restarted,
        "tasks": {**stats.totals, "unfinished": stats.unfinished},
        "in_window": stats.in_window,
        "per_second": {status: round(stats.per_second(status), 3) for status in STATUSES},
        "latency_ms": {
            key: None
            if found is None
            else {
                "count": found.count,
                **{f"p{round(q * 100)}": round(value, 3) for q, value in found.values.items()},
            }
            for key, found in stats.latency.items()
        },
        "registry": {
            "commits_per_second": round(stats.commits_per_second, 3),
            "mean_batch_size": None
            if stats.mean_batch_size is None
            else round(stats.mean_batch_size, 2),
        },
    }


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f} ms"
    return f"{value:.3g} ms"


def stats_table(stats: Stats) -> RenderableType:
    """The stats drawn for a terminal: tasks by status, then latency percentiles."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    window = f"{stats.window_s:,.1f} s"
    tasks = Table(title=f"tasks at {stats.url}", title_justify="left", box=None, padding=(0, 2))
    tasks.add_column("")
    for status in STATUSES:
        tasks.add_column(status, justify="right")
    tasks.add_column("unfinished", justify="right")
    tasks.add_row(
        "since start",
        *(f"{stats.totals[status]:,}" for status in STATUSES),
        f"{stats.unfinished:,}",
    )
    tasks.add_row(f"last {window}", *(f"{stats.in_window[status]:,}" for status in STATUSES), "")
    tasks.add_row("per second", *(f"{stats.per_second(status):,.1f}" for status in STATUSES), "")
    latency = Table(
        title=f"latency, last {window} (estimated from histogram buckets)",
        title_justify="left",
        box=None,
        padding=(0, 2),
    )
    latency.add_column("")
    for q in QUANTILES:
        latency.add_column(f"p{round(q * 100)}", justify="right")
    latency.add_column("count", justify="right")
    for key, (_, label) in LATENCIES.items():
        found = stats.latency.get(key)
        if found is None:
            latency.add_row(label, *("—" for _ in QUANTILES), "0")
        else:
            latency.add_row(label, *(_ms(found.values[q]) for q in QUANTILES), f"{found.count:,}")
    batch = "—" if stats.mean_batch_size is None else f"{stats.mean_batch_size:.1f}"
    lines: list[RenderableType] = [tasks, Text(""), latency, Text("")]
    lines.append(
        Text(f"registry: {stats.commits_per_second:,.1f} commits/s, {batch} changes per commit")
    )
    if stats.restarted:
        lines.append(Text("the server started again during the window", style="yellow"))
    return Group(*lines)
