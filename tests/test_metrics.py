"""GET /metrics (issue #17) against real servers: exact task counts summed over two workers,
histograms that observed every task, a run's counts starting at zero, a killed server's
tasks counted as recovered, the gauges of dead processes dropped, and metrics that can be
turned off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bgtasks_cli.errors import EXIT_SERVE
from server.config import Settings
from server.metrics import metrics_dir
from tests.cli_helpers import assert_one_error_line, cli
from tests.helpers import LiveServer, ServerProcess, free_port, serve_in_thread, wait_until
from tests.loadgen import post_concurrently

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DONE = ("bgtasks_tasks_total", frozenset({("file", "log.txt"), ("status", "done")}))


def scrape(url: str, **headers: str) -> Samples:
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def notify(url: str, count: int, tag: str = "u") -> None:
    paths = [f"/send-notification/{tag}{n}@example.com?q={tag}{n}" for n in range(count)]
    assert post_concurrently(url, paths, concurrency=50) == [200] * count


def test_counts_sum_to_exactly_two_per_notification_over_two_workers(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(args=("--workers", "2", "--no-access-log"))
    count = 300
    notify(server.url, count)
    done = 2 * count

    def settled() -> Samples | None:
        samples = scrape(server.url)
        return samples if samples.get(DONE) == done else None

    samples = wait_until(settled, timeout=30)
    # Each worker keeps its own files; each scrape, whichever worker answers it, reads them
    # all.
    pids = {path.name.rsplit("_", 1)[1] for path in metrics_dir(server.data_dir).glob("*.db")}
    assert len(pids) == 2, pids
    for _ in range(6):
        assert scrape(server.url).get(DONE) == done
    assert server.data_dir.joinpath("log.txt").read_bytes().count(b"\n") == done
    for histogram in (
        "bgtasks_task_wait_seconds",
        "bgtasks_task_run_seconds",
        "bgtasks_response_to_write_seconds",
    ):
        assert value(samples, f"{histogram}_count") == done, histogram
        assert value(samples, f"{histogram}_bucket", le="+Inf") == done, histogram
        assert value(samples, f"{histogram}_sum") > 0, histogram
    commits = value(samples, "bgtasks_registry_commit_seconds_count")
    assert 0 < commits == value(samples, "bgtasks_registry_batch_size_count")
    # A batch carries each request's intent, each line and the notes of their ends.
    assert value(samples, "bgtasks_registry_batch_size_sum") >= count + done
    assert value(samples, "bgtasks_tasks_unfinished") == 0
    assert value(samples, "bgtasks_tasks_total", file="log.txt", status="failed") == 0
    assert value(samples, "bgtasks_recovered_total") == 0


def test_unfinished_tasks_are_summed_over_the_live_workers(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(delay=30.0, args=("--workers", "2", "--no-access-log"))
    notify(server.url, 20)
    wait_until(lambda: value(scrape(server.url), "bgtasks_tasks_unfinished") == 40)
    for _ in range(4):
        assert value(scrape(server.url), "bgtasks_tasks_unfinished") == 40


def test_unfinished_tasks_are_a_gauge_and_a_new_run_starts_at_zero(
    server_process: Callable[..., ServerProcess],
) -> None:
    slow = server_process(delay=30.0, args=("--no-access-log",))
    notify(slow.url, 3)
    wait_until(lambda: value(scrape(slow.url), "bgtasks_tasks_unfinished") == 6)
    slow.stop(signal.SIGKILL)
    # The next run adopts the killed server's six tasks and writes them; its counts are its
    # own, and the killed process's gauge is gone from the sum.
    again = server_process(delay=0.0, args=("--no-access-log",))

    def recovered() -> Samples | None:
        samples = scrape(again.url)
        ended = value(samples, "bgtasks_tasks_total", file="log.txt", status="recovered")
        return samples if ended == 6 else None

    samples = wait_until(recovered, timeout=20)
    assert value(samples, "bgtasks_recovered_total") == 6
    assert value(samples, "bgtasks_tasks_unfinished") == 0
    assert samples.get(DONE) == 0
    assert value(samples, "bgtasks_response_to_write_seconds_count") == 0  # no response here
    again.stop()
    third = server_process(delay=0.0, args=("--no-access-log",))
    samples = scrape(third.url)
    assert value(samples, "bgtasks_tasks_total", file="log.txt", status="recovered") == 0
    assert value(samples, "bgtasks_recovered_total") == 0


def test_a_failed_task_is_counted_failed(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    (live.data_dir / "README.md").mkdir()
    assert httpx.post(f"{live.url}/background_tasks", params={"framework": "x"}).status_code == 200
    failed = ("bgtasks_tasks_total", frozenset({("file", "README.md"), ("status", "failed")}))
    wait_until(lambda: scrape(live.url).get(failed) == 1)
    samples = scrape(live.url)
    assert value(samples, "bgtasks_tasks_total", file="README.md", status="done") == 0
    assert value(samples, "bgtasks_response_to_write_seconds_count") == 0  # nothing written
    assert value(samples, "bgtasks_tasks_unfinished") == 0


def test_openmetrics_when_the_scraper_asks_for_it(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    response = httpx.get(
        f"{live.url}/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "bgtasks_tasks_total" in response.text


def test_metrics_can_be_turned_off(start_server: Callable[..., LiveServer]) -> None:
    live = start_server(metrics=False)
    response = httpx.get(f"{live.url}/metrics")
    assert response.status_code == 404
    assert response.json() == {"detail": "metrics are off (BGTASKS_METRICS=0)"}
    assert httpx.post(f"{live.url}/send-notification/a@example.com").status_code == 200
    wait_until(lambda: live.read("log.txt") == b"message to a@example.com\n")
    assert not metrics_dir(live.data_dir).exists()


def test_metrics_are_off_from_the_environment(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(env={"BGTASKS_METRICS": "0"})
    assert httpx.get(f"{server.url}/metrics").status_code == 404
    assert not metrics_dir(server.data_dir).exists()


def _files(directory: Path) -> set[str]:
    return {path.name for path in directory.glob("*.db")}


# A process that keeps a counter, a histogram and a livesum gauge in prometheus-client's
# multiprocess files, as a bgtasks worker does; then lives on (argv[1] == "live") or exits.
OTHER_PROCESS = """
import sys, time
from prometheus_client import Counter, Gauge, Histogram
Counter("bgtasks_tasks", "t", ["file", "status"]).labels("log.txt", "done").inc(7)
Histogram("bgtasks_task_run_seconds", "r").observe(0.5)
Gauge("bgtasks_tasks_unfinished", "u", multiprocess_mode="livesum").set(3)
print("ready", flush=True)
if sys.argv[1] == "live":
    time.sleep(60)
"""


def other_process(directory: Path, *, live: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    proc = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, "live" if live else "exit"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    with proc.stdout:  # it says nothing after this
        assert proc.stdout.readline() == "ready\n"
    if not live:
        proc.wait(timeout=10)
    return proc


def kinds(pid: int) -> set[str]:
    return {f"{kind}_{pid}.db" for kind in ("counter", "histogram", "gauge_livesum")}


def test_a_start_beside_live_processes_keeps_dead_ones_counts_but_not_their_gauges(
    start_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    directory = metrics_dir(tmp_path / "data")
    directory.mkdir(parents=True)
    gone = other_process(directory, live=False)
    sibling = other_process(directory, live=True)
    try:
        live = start_server()
        # The dead process's counts stay (the run goes on: a live sibling has files); its
        # gauge goes, and the sum of live gauges is the sibling's 3 plus this server's 0.
        assert _files(directory) == kinds(gone.pid) - {f"gauge_livesum_{gone.pid}.db"} | kinds(
            sibling.pid
        ) | kinds(os.getpid())
        samples = scrape(live.url)
        assert samples.get(DONE) == 14
        assert value(samples, "bgtasks_task_run_seconds_count") == 2
        assert value(samples, "bgtasks_tasks_unfinished") == 3
        sibling.kill()
        sibling.wait()
        # A scrape drops the gauge of a process that died since, and keeps its counts.
        samples = scrape(live.url)
        assert value(samples, "bgtasks_tasks_unfinished") == 0
        assert samples.get(DONE) == 14
        assert f"gauge_livesum_{sibling.pid}.db" not in _files(directory)
    finally:
        sibling.kill()
        sibling.wait()


def test_a_start_with_no_live_process_starts_a_new_run(
    start_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    directory = metrics_dir(tmp_path / "data")
    directory.mkdir(parents=True)
    gone = other_process(directory, live=False)
    assert _files(directory) == kinds(gone.pid)
    (directory / "notes.txt").write_text("not ours")  # left alone
    live = start_server()
    assert _files(directory) == kinds(os.getpid())
    assert (directory / "notes.txt").exists()
    samples = scrape(live.url)
    assert samples.get(DONE) == 0
    assert value(samples, "bgtasks_tasks_unfinished") == 0


def test_a_symlinked_metrics_directory_is_refused_before_start(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    directory = metrics_dir(tmp_path / "data")
    directory.parent.mkdir(parents=True)
    directory.symlink_to(elsewhere)
    result = cli("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == EXIT_SERVE, result.stderr
    line = assert_one_error_line(result.stderr)
    assert line == f"Error: {directory} is a symbolic link; bgtasks writes only inside its data dir"
    assert result.stdout == ""  # refused before the banner
    assert list(elsewhere.iterdir()) == []


def test_the_app_refuses_a_symlinked_metrics_directory_too(tmp_path: Path) -> None:
    """Served without the CLI (`uvicorn --factory`), the app refuses it at start."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    directory = metrics_dir(tmp_path / "data")
    directory.parent.mkdir(parents=True)
    directory.symlink_to(elsewhere)
    settings = Settings(data_dir=tmp_path / "data", delay=0)
    with pytest.raises(RuntimeError, match="test server did not start"), serve_in_thread(settings):
        pass
    assert list(elsewhere.iterdir()) == []


def test_two_apps_in_one_process_keep_their_own_counts(
    start_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    first = start_server(data_dir=tmp_path / "one")
    second = start_server(data_dir=tmp_path / "two")
    notify(first.url, 2, "a")
    notify(second.url, 5, "b")
    wait_until(lambda: scrape(first.url).get(DONE) == 4 and scrape(second.url).get(DONE) == 10)
    time.sleep(0.5)  # longer than a flush: nothing more arrives
    assert scrape(first.url).get(DONE) == 4
    assert scrape(second.url).get(DONE) == 10
