"""`bgtasks demo`'s options (issue #18): `--table` brings the timelines' tables back, `--json`
and `--table` are refused where they mean nothing, the crash demo's own limits are a usage
error before anything starts, and `demo --crash` exits 1 when bgtasks lost or doubled a line.
The crash demo itself runs end to end in `test_crash_demo.py`."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from bgtasks_cli import crash_demo
from bgtasks_cli.errors import EXIT_FAILED, EXIT_USAGE
from tests.cli_helpers import (
    HAS_PROC,
    assert_one_error_line,
    cli,
    cli_env,
    fixed_report,
    invoke,
    processes_mentioning,
)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to look for leftover processes")
def test_demo_table_shows_the_tables_of_events(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = cli_env(TMPDIR=str(scratch), COLUMNS="200")
    result = cli("demo", "--delay", "0.2", "--table", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for event in ("client sent request", "server sent response", "client got response"):
        assert len(re.findall(rf"│ {event} +│", out)) == 2, event  # a row in each table
    assert "├─┤" not in out and "█" not in out  # no picture
    assert out.count("response returned") == 2
    assert processes_mentioning(str(scratch)) == []
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--json",), "--json goes with --crash or --fail"),
        (("--crash", "--fail"), "--crash and --fail are two demos: give one"),
        (("--fail", "--delay", "11"), "'--delay'"),
        (("--crash", "--table"), "--table is for the timelines; --crash shows no timeline"),
        (("--crash", "--delay", "0.1"), "the crash demo needs a delay from 0.2 to 10 s, not 0.1"),
        (("--crash", "--json", "--delay", "11"), "'--delay'"),
    ],
)
def test_demo_options_that_mean_nothing_are_refused_before_anything_starts(
    tmp_path: Path, args: tuple[str, ...], words: str
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = cli("demo", *args, env=cli_env(TMPDIR=str(scratch)))
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert words in assert_one_error_line(result.stderr)
    assert result.stdout == ""
    assert list(scratch.iterdir()) == []


def test_demo_help_tells_of_the_crash_and_fail_demos_and_the_table() -> None:
    result = invoke("demo", "--help")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.stdout.replace("│", " ").split())
    assert "--crash" in flat and "kill -9" in flat
    assert "--table" in flat and "instead of the picture" in flat
    assert "Exit 0 if bgtasks lost and doubled none, else 1." in flat
    assert "--fail" in flat and "the fault removed and the task healed" in flat
    assert "Exit 0 if it healed, else 1." in flat


@pytest.mark.parametrize("as_json", [True, False])
def test_demo_crash_exits_1_when_bgtasks_lost_or_doubled_a_line(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    # The real demo never loses a line (test_crash_demo.py): hand the command a report that
    # did, to see what it makes of one.
    report = fixed_report()
    lost = replace(report, bgtasks=replace(report.bgtasks, written=1, lost=1, missing=("x\n",)))
    monkeypatch.setattr(crash_demo, "run", lambda **kwargs: lost)
    result = invoke("demo", "--crash", *(["--json"] if as_json else []))
    assert result.exit_code == EXIT_FAILED, result.output
    if as_json:
        assert json.loads(result.stdout) == crash_demo.report_json(lost)
    else:
        assert "✗ bgtasks lost 1 and duplicated 0 of 2 acknowledged lines" in result.stdout
