"""`bgtasks demo --fail` (issue #18) end to end through the console script: the fault made in
the demo server's data directory, each failed attempt shown as it fails, the fault removed
(with the time), the task healed, the picture and the verdict; `--json` as one document with
the progress on stderr; and nothing left behind, Ctrl-C included."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bgtasks_cli import fail_demo
from tests.cli_helpers import HAS_PROC, Lines, cli_env, processes_mentioning, run_to_the_end
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not HAS_PROC, reason="needs /proc to look for leftover processes")
RUN_TIMEOUT = 120.0
INTERRUPTED = 130
CLOCK = r"\d\d:\d\d:\d\d\.\d{3}"


def demo(scratch: Path, *args: str, columns: int = 80) -> subprocess.Popen[str]:
    """`bgtasks demo --fail ARGS` through the console script, its temporary files in
    `scratch`."""
    return subprocess.Popen(
        [sys.executable, "-m", "bgtasks_cli", "demo", "--fail", "--delay", "0.2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(TMPDIR=str(scratch), COLUMNS=str(columns)),
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory


def assert_nothing_left(scratch: Path) -> None:
    assert list(scratch.iterdir()) == []
    # The demo waits for its server before it exits; allow the kernel a moment to reap it.
    wait_until(lambda: processes_mentioning(str(scratch)) == [], timeout=10)


def positions(out: str, *patterns: str) -> list[int]:
    """Where each pattern first matches in `out`, each searched after the one before."""
    found, start = [], 0
    for pattern in patterns:
        match = re.compile(pattern, re.MULTILINE).search(out, start)
        assert match, f"{pattern!r} not found after {start} in:\n{out}"
        found.append(match.start())
        start = match.end()
    return found


def test_the_fault_is_shown_failing_then_removed_and_the_task_heals(scratch: Path) -> None:
    out, err = run_to_the_end(proc := demo(scratch), RUN_TIMEOUT)
    assert proc.returncode == 0, out + err
    assert err == ""
    assert all(len(line) <= 80 for line in out.splitlines()), out
    most = fail_demo.RETRIES["max_attempts"]
    # At 80 columns the error wraps, indented under the attempt.
    wrapped = r"NotARegularFile: log.txt is a directory, not a\n +regular file; the next in "
    positions(
        out,
        rf"^{CLOCK}  the fault: log.txt is a directory, so no line can be written to it$",
        r"^POST /send-notification/demo@example.com → 200 in ",
        rf"^ retrying {CLOCK} .*'found query: hello\\n' → log.txt$",
        rf"^ +attempt 1 of {most} failed: {wrapped}",
        rf"^ +attempt 2 of {most} failed: {wrapped}",
        rf"^{CLOCK}  fault removed after 2 failed attempts: log.txt is writable again$",
        rf"^ +done {CLOCK} .*'found query: hello\\n' → log.txt\n +after \d attempts$",
        rf"^ +done {CLOCK} .*'message to demo@example.com\\n' → log.txt$",
        r"^timeline of request ",
        r"^  try 2 ",
        r"^✓ response returned [\d,]+ ms before the last write finished; task 1 after \d",
        r"^A fault that stays ends its task failed",
    )
    healed = re.search(r"→ log.txt\n +after (\d) attempts", out)
    assert healed and 3 <= int(healed.group(1)) <= most
    assert out.count("├─┤ client: sent → got response") == 1  # the picture, not the table
    assert_nothing_left(scratch)


def test_json_is_one_document_of_what_the_demo_did(scratch: Path) -> None:
    out, err = run_to_the_end(proc := demo(scratch, "--json"), RUN_TIMEOUT)
    assert proc.returncode == 0, err
    assert out.count("\n") == 1, out
    report = json.loads(out)
    assert list(report) == ["ok", "settings", "fault", "request"]
    assert report["ok"] is True
    assert report["settings"] == {"delay": 0.2, **fail_demo.RETRIES}
    fault = report["fault"]
    assert fault["file"] == "log.txt" and fault["removed_after_failures"] == 2
    assert fault["made_at"] < report["request"]["client_sent_at"] < fault["removed_at"]
    request = report["request"]
    assert request["ok"] is True and request["status"] == 200
    healed, other = request["server"]["tasks"]
    assert (healed["status"], other["status"]) == ("done", "done")
    assert healed["attempts"] >= 3 and other["attempts"] == 1
    failures = healed["failures"]
    assert [f["attempt"] for f in failures] == list(range(1, healed["attempts"]))
    assert all("log.txt is a directory" in f["error"] for f in failures)
    assert failures[1]["failed_at"] <= fault["removed_at"] < healed["finished_at"]
    # The progress, the live view included, went to stderr.
    assert "attempt 1 of 8 failed" in err and "fault removed after 2" in err
    assert "Traceback" not in err
    assert_nothing_left(scratch)


def test_table_shows_the_attempts_as_events(scratch: Path) -> None:
    out, err = run_to_the_end(proc := demo(scratch, "--table", columns=120), RUN_TIMEOUT)
    assert proc.returncode == 0, out + err
    events = re.findall(r"│ (task 1 [^│]*?) +│", out)
    tried = int(events[-2].split()[3])  # the attempt that wrote: "task 1 try N started"
    assert tried >= 3 and events[-1] == "task 1 wrote"  # it healed: its last attempt wrote
    for n in range(1, tried):
        assert f"task 1 try {n} FAILED" in events, events
    assert "├─┤" not in out  # no picture
    assert_nothing_left(scratch)


MOMENTS: dict[str, Callable[[str], bool]] = {
    "its server is starting": lambda line: False,  # once its directory is there
    "the fault is made": lambda line: "the fault: log.txt is a directory" in line,
    "an attempt has failed": lambda line: "attempt 1 of 8 failed" in line,
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_mid_demo_leaves_nothing_behind(scratch: Path, moment: str) -> None:
    proc = demo(scratch, columns=120)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        if moment == "its server is starting":
            wait_until(lambda: any(scratch.iterdir()), timeout=30)
            time.sleep(0.05)
        else:
            out.until(MOMENTS[moment], timeout=60)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == INTERRUPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    said = "".join(err.rest())
    assert "Traceback" not in said
    assert said.rstrip().endswith("interrupted: the demo server is stopped and its files removed")
    out.rest()
    assert_nothing_left(scratch)
