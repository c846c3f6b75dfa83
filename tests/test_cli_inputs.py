"""Input the CLI refuses before any request: text that is not UTF-8 (bytes from the shell)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bgtasks_cli.cli import app
from bgtasks_cli.errors import EXIT_USAGE
from tests.helpers import free_port

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
# What Python makes of the byte 0xff in argv under a UTF-8 locale: a lone surrogate.
XFF = b"\xff".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("notify", f"{XFF}@example.com"), "EMAIL '\\xff@example.com'"),
        (("notify", "a@example.com", "--q", f"a{XFF}"), "--q 'a\\xff'"),
        (("readme", f"Fast{XFF}"), "FRAMEWORK 'Fast\\xff'"),
        (("readme", "--intro", "--q", XFF), "--q '\\xff'"),
        (("retry", XFF), "TASK_ID '\\xff'"),
        (("timeline", XFF), "REQUEST_ID '\\xff'"),
    ],
)
def test_text_that_is_not_utf8_is_one_red_line(args: tuple[str, ...], name: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # never reached: refused before any request
    result = CliRunner().invoke(app, [*args, "--url", url], env=ENV)
    assert result.exit_code == EXIT_USAGE, result.output
    assert isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert errors == [f"Error: {name} is not UTF-8 text"]
    assert "give the value as UTF-8" in result.output


def test_the_shells_bytes_end_in_one_line_and_no_traceback() -> None:
    env = {**os.environ, **ENV, "LANG": "C.UTF-8", "BGTASKS_URL": f"http://127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [sys.executable, "-m", "bgtasks_cli", "notify", b"\xff@example.com"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == EXIT_USAGE
    assert b"Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == b"Error: EMAIL '\\xff@example.com' is not UTF-8 text"
    assert result.stdout == b""
