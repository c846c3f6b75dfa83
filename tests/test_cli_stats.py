"""`bgtasks stats` (issue #17): the arithmetic on fixed scrapes, then the real console script
against real servers: exact counts over a window that Ctrl-C ends, the table, and each
failure as one line with its exit code."""

from __future__ import annotations

import http.server
import json
import signal
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bgtasks_cli.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from bgtasks_cli.scrapes import NotMetrics, compare, parse, quantile
from tests.cli_helpers import (
    assert_one_error_line,
    cli,
    cli_env,
    cli_popen,
    heavy_modules_loaded,
    http_server,
)
from tests.helpers import LiveServer, ServerProcess, wait_until
from tests.loadgen import post_concurrently

# -- the arithmetic ---------------------------------------------------------------------------


def test_quantiles_interpolate_within_their_bucket_as_prometheus_does() -> None:
    buckets = [(0.1, 10.0), (0.2, 20.0), (float("inf"), 20.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.25, buckets) == pytest.approx(0.05)  # the first bucket starts at 0
    # Above every finite bound: the highest finite bound, as histogram_quantile says.
    assert quantile(0.99, [(0.1, 0.0), (0.2, 1.0), (float("inf"), 5.0)]) == pytest.approx(0.2)
    # Empty buckets in between are skipped, not divided by.
    assert quantile(0.5, [(0.1, 2.0), (0.2, 2.0), (0.4, 4.0), (float("inf"), 4.0)]) == (
        pytest.approx(0.1)
    )


class FakeServer:
    """A bgtasks server's metrics, made with prometheus-client as the server makes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter("bgtasks_tasks", "t", ["file", "status"], registry=self.registry)
        self.wait = Histogram(
            "bgtasks_task_wait_seconds", "w", buckets=(0.01, 0.1, 1.0), registry=self.registry
        )
        self.unfinished = Gauge("bgtasks_tasks_unfinished", "u", registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_compare_counts_what_ended_between_two_scrapes() -> None:
    server = FakeServer()
    server.tasks.labels("log.txt", "done").inc(100)
    server.wait.observe(0.005)
    first = parse(server.text(), at=10.0)
    server.tasks.labels("log.txt", "done").inc(30)
    server.tasks.labels("README.md", "done").inc(10)
    server.tasks.labels("README.md", "failed").inc(2)
    for _ in range(9):
        server.wait.observe(0.05)  # 9 in (0.01, 0.1]
    server.wait.observe(0.5)  # 1 in (0.1, 1]
    server.unfinished.set(4)
    stats = compare(first, parse(server.text(), at=30.0), "http://x")
    assert stats.window_s == 20.0
    assert stats.totals == {"done": 140, "failed": 2, "recovered": 0, "cancelled": 0}
    assert stats.in_window == {"done": 40, "failed": 2, "recovered": 0, "cancelled": 0}
    assert stats.per_second("done") == 2.0
    assert stats.unfinished == 4
    assert not stats.restarted
    wait = stats.latency["wait"]
    assert wait is not None and wait.count == 10  # the one before the window is not in it
    assert wait.values[0.5] == pytest.approx(10 + 90 * (5 / 9))  # ms, within (10, 100]
    assert wait.values[0.99] == pytest.approx(100 + 900 * 0.9)
    assert stats.latency["run"] is None  # nothing observed


def test_a_restart_in_the_window_counts_the_new_values_as_prometheus_does() -> None:
    before = FakeServer()
    before.tasks.labels("log.txt", "done").inc(100)
    before.wait.observe(0.005)
    after = FakeServer()  # started again: counts from zero
    after.tasks.labels("log.txt", "done").inc(7)
    after.wait.observe(0.05)
    stats = compare(parse(before.text(), 0.0), parse(after.text(), 1.0), "http://x")
    assert stats.restarted
    assert stats.in_window["done"] == 7
    wait = stats.latency["wait"]
    assert wait is not None and wait.count == 1


def test_text_that_is_not_a_bgtasks_server_s_metrics_is_refused() -> None:
    with pytest.raises(NotMetrics):
        parse("<html>hello</html>", 0.0)
    with pytest.raises(NotMetrics, match="no bgtasks_tasks_total"):
        parse("other_total 3\n", 0.0)


# -- the console script -----------------------------------------------------------------------


def done_now(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return parse(text, 0.0).total("bgtasks_tasks_total", status="done")


def metrics_reads(server: ServerProcess) -> int:
    return server.log().count('"GET /metrics HTTP/1.1" 200')


def test_stats_counts_exactly_what_ended_in_a_window_that_ctrl_c_ends(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(args=("--workers", "2"))
    before = [f"/send-notification/a{n}@example.com?q=a{n}" for n in range(10)]
    assert post_concurrently(server.url, before) == [200] * 10
    wait_until(lambda: done_now(server.url) == 20)
    reads = metrics_reads(server)
    proc = cli_popen("stats", "--json", "--url", server.url)
    try:
        wait_until(lambda: metrics_reads(server) > reads, timeout=30)  # its first reading
        during = [f"/send-notification/b{n}@example.com?q=b{n}" for n in range(15)]
        assert post_concurrently(server.url, during) == [200] * 15
        wait_until(lambda: done_now(server.url) == 50)
        proc.send_signal(signal.SIGINT)  # the window ends now, not in a minute
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["tasks"] == {
        "done": 50,
        "failed": 0,
        "recovered": 0,
        "cancelled": 0,
        "unfinished": 0,
    }
    assert report["in_window"] == {"done": 30, "failed": 0, "recovered": 0, "cancelled": 0}
    assert 0 < report["window_s"] < 60
    assert report["per_second"]["done"] == pytest.approx(30 / report["window_s"], rel=0.01)
    for name in ("wait", "run", "response_to_write"):
        latency = report["latency_ms"][name]
        assert latency["count"] == 30, name
        assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"], name
    assert report["latency_ms"]["commit"]["count"] >= 1
    assert report["registry"]["commits_per_second"] > 0
    assert report["restarted"] is False


def test_stats_as_a_table(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    assert httpx.post(f"{live.url}/send-notification/a@example.com").status_code == 200
    result = cli("stats", "--window", "1", "--url", live.url)
    assert result.returncode == 0, result.stderr
    for text in (
        f"tasks at {live.url}",
        "since start",
        "per second",
        "queued → started",
        "response → line on disk",
        "registry:",
    ):
        assert text in result.stdout, result.stdout
    assert result.stderr == ""


def test_stats_against_a_server_with_metrics_off(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server(metrics=False)
    result = cli("stats", "--url", live.url)
    assert result.returncode == EXIT_FAILED
    line = assert_one_error_line(result.stderr)
    assert line == "Error: GET /metrics: 404 metrics are off (BGTASKS_METRICS=0)"
    assert "hint: that server keeps no metrics: start it without BGTASKS_METRICS=0" in (
        result.stderr
    )


@pytest.fixture
def not_bgtasks() -> Iterator[str]:
    """A plain HTTP server on loopback answering every GET with text."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"metrics? no\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with http_server(Handler) as url:
        yield url


def test_stats_against_something_else(not_bgtasks: str) -> None:
    result = cli("stats", "--url", not_bgtasks)
    assert result.returncode == EXIT_UNREACHABLE
    line = assert_one_error_line(result.stderr)
    assert line.startswith(f"Error: {not_bgtasks} does not answer like a bgtasks server")


def test_stats_with_nothing_there_and_a_bad_window() -> None:
    unreachable = cli("stats", "--url", "http://127.0.0.1:1")
    assert unreachable.returncode == EXIT_UNREACHABLE
    assert "no bgtasks server answers" in assert_one_error_line(unreachable.stderr)
    for window in ("0", "nan", "4000"):
        bad = cli("stats", "--window", window, "--url", "http://127.0.0.1:1")
        assert bad.returncode == EXIT_USAGE, window
        assert_one_error_line(bad.stderr)


def test_stats_loads_none_of_the_server_stack() -> None:
    exit_code, loaded = heavy_modules_loaded(["stats", "--url", "http://127.0.0.1:1"], cli_env())
    assert (exit_code, loaded) == (EXIT_UNREACHABLE, [])
