"""Smoke test of benchmarks/bench.py: the quick mode runs and reports a number for every measure.

Goals are never asserted here: timings on a shared CI machine would make a flaky test.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("response_latency", "throughput", "completion", "server")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.parametrize(
    "generator",
    [
        "asyncio",
        pytest.param(
            "wrk", marks=pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed")
        ),
    ],
)
def test_quick_bench_reports_every_measure(tmp_path: Path, generator: str) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "benchmarks/bench.py", "--quick", "--out", str(out)]
    done = subprocess.run(
        [*argv, "--generator", generator],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())

    results = report["results"]
    for section in SECTIONS:
        numbers = results[section]
        assert numbers, section
        for key, value in numbers.items():
            assert _is_number(value), f"{section}.{key} = {value!r}"
    assert results["completion"]["acked"] > 0
    assert results["throughput"]["bgtasks_notify_rps"] > 0
    # Measures 4 and 5 depend on tools outside the service; each entry is a number or says why not.
    for follower in results["tail"].values():
        assert _is_number(follower.get("p95_ms")) or "unavailable" in follower
    for key, value in results["cli"].items():
        assert _is_number(value) or isinstance(value, str), f"cli.{key} = {value!r}"
    if "p95_ms" in results["tail"]["gnu_tail"]:
        assert results["tail"]["gnu_tail"]["missed"] == 0
    assert report["machine"]["cores"] >= 1
    assert len(report["checks"]) >= 6


def test_the_instruction_counter_s_in_process_driver_serves_every_request() -> None:
    """benchmarks/instructions.py without valgrind (CI has none): it drives the app to the end."""
    argv = [sys.executable, "benchmarks/instructions.py", "--in-process"]
    done = subprocess.run(
        [*argv, "--warm-up", "10", "--requests", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "notify: 50 of 50 requests got a 200",
        "plain: 50 of 50 requests got a 200",
    ]


def test_quick_store_comparison_reports_every_configuration(tmp_path: Path) -> None:
    """`bench.py --store postgres --quick`: SQLite with one process and PostgreSQL with one and
    two, each with its rates, latencies and commit figures; after a kill -9 mid-load no
    acknowledged line is lost or written twice; the run's database is gone at the end."""
    from tests.postgres import SERVER, _admin

    admin = _admin()  # skips without a server (fails under CI)
    out = tmp_path / "stores.json"
    argv = [sys.executable, "benchmarks/bench.py", "--store", "postgres", "--quick"]
    done = subprocess.run(
        [*argv, "--out", str(out), "--pg-url", SERVER],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())

    assert set(report["results"]) == {"sqlite_1", "pg_1", "pg_2"}
    for key, phases in report["results"].items():
        for phase, numbers in phases.items():
            for name, value in numbers.items():
                assert _is_number(value), f"{key}.{phase}.{name} = {value!r}"
        assert phases["throughput"]["e2e_rps"] > 0, key
        kill = phases["kill"]
        assert kill["acked"] > 0, key
        assert (kill["lost"], kill["duplicated"], kill["malformed"]) == (0, 0, 0), key
    assert all(_is_number(value) for value in report["ratios"].values())
    with admin:  # type: ignore[attr-defined]
        found = admin.execute(  # type: ignore[attr-defined]
            "SELECT count(*) FROM pg_database WHERE datname = %s", (report["database"],)
        ).fetchone()
    assert found == (0,)
