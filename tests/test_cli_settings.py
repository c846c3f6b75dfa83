"""Bad settings and numbers that are not finite (issue #13 a), through the real console
script: one red line naming the setting or option and a hint, exit 2, before anything
starts (no banner, no data directory, no temporary directory)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

import httpx
import pytest
from typer.testing import CliRunner

from bgtasks_cli import launcher
from bgtasks_cli.cli import app
from bgtasks_cli.errors import EXIT_USAGE
from tests.cli_helpers import RED_ERROR, assert_one_error_line, cli, cli_env
from tests.helpers import ServerProcess, free_port, wait_until

BAD_SETTINGS = [
    ("BGTASKS_RETENTION", "abc", "valid integer"),
    ("BGTASKS_RETENTION", "5", "greater than or equal to 10"),
    ("BGTASKS_LOCK_TIMEOUT", "0", "greater than 0"),
    ("BGTASKS_LOCK_TIMEOUT", "nan", "finite number"),
    ("BGTASKS_MAX_RUNNING", "0", "greater than or equal to 1"),
    ("BGTASKS_MAX_RUNNING", "1.5", "valid integer"),
    ("BGTASKS_DRAIN_TIMEOUT", "-1", "greater than or equal to 0"),
    ("BGTASKS_DRAIN_TIMEOUT", "inf", "finite number"),
    ("BGTASKS_DELAY", "nan", "finite number"),
    ("BGTASKS_DELAY", "-inf", "finite number"),
    ("BGTASKS_DELAY", "abc", "valid number"),
    ("BGTASKS_MAX_ATTEMPTS", "0", "greater than or equal to 1"),
    ("BGTASKS_MAX_ATTEMPTS", "2.5", "valid integer"),
    ("BGTASKS_RETRY_BASE", "nan", "finite number"),
    ("BGTASKS_RETRY_BASE", "0", "greater than 0"),
    ("BGTASKS_RETRY_MAX", "-1", "greater than 0"),
]
# Every float option of every command, with the values no range rule can hold.
FLOAT_OPTIONS = [
    ("notify", "x@example.com", "--timeout"),
    ("readme", "FastAPI", "--timeout"),
    ("tasks", "--interval"),
    ("serve", "--delay"),
    ("serve", "--drain-timeout"),
    ("serve", "--retry-base"),
    ("serve", "--retry-max"),
    ("demo", "--delay"),
]


def assert_refused_before_start(result: subprocess.CompletedProcess[str], first: str) -> None:
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    line = assert_one_error_line(result.stderr)
    assert line.startswith(first), line
    assert "hint: " in result.stderr
    assert result.stdout == ""  # no banner: nothing started


@pytest.mark.parametrize(("name", "value", "rule"), BAD_SETTINGS)
def test_serve_refuses_a_bad_setting(name: str, value: str, rule: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in cli_env(FORCE_COLOR="1", **{name: value}).items() if k != "NO_COLOR"}
    result = cli("serve", "--port", str(free_port()), "--data-dir", str(data), env=env)
    assert_refused_before_start(result, f"{RED_ERROR} {name}: ")
    line = assert_one_error_line(result.stderr)
    assert rule in line and f"(got {value!r})" in line
    assert f"fix or unset {name}" in result.stderr
    assert not data.exists()


@pytest.mark.parametrize(
    ("name", "value", "rule"), [s for s in BAD_SETTINGS if s[0] != "BGTASKS_DELAY"]
)
def test_demo_refuses_a_bad_setting(name: str, value: str, rule: str, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = cli("demo", env=cli_env(TMPDIR=str(scratch), **{name: value}))
    assert_refused_before_start(result, f"Error: {name}: ")
    assert rule in result.stderr
    assert list(scratch.iterdir()) == []  # no demo directory was made


def test_demo_takes_its_delay_from_its_option(tmp_path: Path) -> None:
    # BGTASKS_DELAY does not reach the demo's server (it passes --delay): no reason to refuse.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = cli_env(TMPDIR=str(scratch), BGTASKS_DELAY="nan", COLUMNS="200")
    result = cli("demo", "--delay", "0", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity"])
@pytest.mark.parametrize("args", FLOAT_OPTIONS, ids=" ".join)
def test_float_options_refuse_what_is_not_finite(
    args: tuple[str, ...], value: str, tmp_path: Path
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = cli_env(TMPDIR=str(scratch), BGTASKS_URL=f"http://127.0.0.1:{free_port()}")
    if args[0] == "serve":
        args = (*args[:1], "--port", str(free_port()), "--data-dir", str(tmp_path / "d"), *args[1:])
    result = cli(*args, value, env=env)
    assert_refused_before_start(result, f"Error: Invalid value for '{args[-1]}': ")
    assert f"see `bgtasks {args[0]} --help`" in result.stderr
    assert not (tmp_path / "d").exists() and list(scratch.iterdir()) == []


def test_drain_timeout_takes_fractions(server_process: Callable[..., ServerProcess]) -> None:
    server = server_process(args=("--drain-timeout", "1.5"))
    assert "drain on stop: 1.5 s" in server.log()
    assert server.stop(signal.SIGINT, timeout=30) == 0


def test_drain_timeout_from_the_environment_reaches_the_banner(tmp_path: Path) -> None:
    calls: list[dict[str, object]] = []
    with (
        patch.object(launcher, "serve", lambda **kw: calls.append(kw)),
        patch.object(launcher, "preflight", lambda **kw: None),
    ):
        result = CliRunner().invoke(
            app,
            ["serve", "--data-dir", str(tmp_path)],
            env={"BGTASKS_DRAIN_TIMEOUT": "2.25", "BGTASKS_DELAY": "0.5", "COLUMNS": "120"},
        )
    assert result.exit_code == 0, result.output
    assert "drain on stop: 2.25 s" in result.stdout and "delay  0.5 s" in result.stdout
    assert calls[0]["drain_timeout"] == 2.25 and calls[0]["delay"] == 0.5


@pytest.mark.parametrize(
    ("args", "env", "first", "hint"),
    [
        (
            ("--retry-base", "0.5", "--retry-max", "0.1"),
            {},
            "Error: --retry-max (0.1 s) is shorter than --retry-base (0.5 s)",
            "hint: see `bgtasks serve --help`",
        ),
        (
            ("--retry-max", "1"),
            {"BGTASKS_RETRY_BASE": "2"},
            "Error: --retry-max (1 s) is shorter than BGTASKS_RETRY_BASE (2 s)",
            "hint: fix or unset BGTASKS_RETRY_BASE;",
        ),
        (
            (),
            {"BGTASKS_RETRY_BASE": "2", "BGTASKS_RETRY_MAX": "1"},
            "Error: BGTASKS_RETRY_MAX (1 s) is shorter than BGTASKS_RETRY_BASE (2 s)",
            "hint: fix or unset BGTASKS_RETRY_MAX or BGTASKS_RETRY_BASE;",
        ),
        (
            ("--max-attempts", "0"),
            {},
            "Error: Invalid value for '--max-attempts': 0 is not in the range 1<=x<=100.",
            "hint: see `bgtasks serve --help`",
        ),
        (
            ("--retry-base", "0"),
            {},
            "Error: --retry-base: Input should be greater than 0 (got 0.0)",
            "hint: see `bgtasks serve --help`",
        ),
    ],
)
def test_serve_refuses_retry_settings_that_cannot_hold(
    args: tuple[str, ...], env: dict[str, str], first: str, hint: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    result = cli(
        "serve", "--port", str(free_port()), "--data-dir", str(data), *args, env=cli_env(**env)
    )
    assert_refused_before_start(result, first)
    assert assert_one_error_line(result.stderr) == first
    assert result.stderr.splitlines()[1].startswith(hint), result.stderr
    assert not data.exists()


def test_serve_s_retry_options_reach_the_workers_and_the_banner(
    server_process: Callable[..., ServerProcess],
) -> None:
    args = ("--max-attempts", "2", "--retry-base", "0.05", "--retry-max", "0.1", "--workers", "2")
    # The environment says otherwise: the options win.
    server = server_process(args=args, env={"BGTASKS_MAX_ATTEMPTS": "7"})
    banner = " ".join(server.log().split("INFO:")[0].split())
    assert "retries up to 2 attempts · backoff 0.05 s, doubling to 0.1 s, jittered" in banner
    (server.data_dir / "README.md").mkdir()
    request_ids = [
        httpx.post(f"{server.url}/background_tasks", params={"framework": f"F{n}"}).headers[
            "x-request-id"
        ]
        for n in range(4)  # to both workers, most likely
    ]

    def dead() -> list[dict[str, Any]] | None:
        tasks = [httpx.get(f"{server.url}/requests/{r}").json()["tasks"][0] for r in request_ids]
        return tasks if all(t["status"] == "failed" for t in tasks) else None

    assert {t["attempts"] for t in wait_until(dead, timeout=20)} == {2}
    assert server.stop(signal.SIGINT, timeout=30) == 0
