"""Input the CLI refuses before it sends or serves anything: text that is not UTF-8 (bytes from
the shell), a `serve --database` URL that names no usable database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from bgtasks_cli.cli import app
from bgtasks_cli.errors import EXIT_SERVE, EXIT_USAGE
from server.paths import registry_path
from tests.helpers import free_port, spawn_server
from tests.postgres import fresh_database

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


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        (
            "mysql://u@db/x",
            EXIT_USAGE,
            "Error: --database 'mysql://u@db/x' is not a PostgreSQL URL",
        ),
        (
            "postgresql://u:secret@db:port/x",
            EXIT_USAGE,
            "Error: --database 'postgresql://u:***@db:port/x' is not a PostgreSQL URL",
        ),
        (
            "postgresql://u:secret@127.0.0.1:{port}/x",
            EXIT_SERVE,
            "Error: the database at postgresql://u:***@127.0.0.1:{port}/x cannot be used:",
        ),
    ],
)
def test_serve_database_with_a_bad_url_is_one_line(
    url: str, code: int, words: str, tmp_path: Path
) -> None:
    port = free_port()
    args = ["serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(app, [*args, "--database", url.format(port=port)], env=ENV)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 1 and errors[0].startswith(words.format(port=port)), result.output
    assert "secret" not in result.output
    assert "postgresql://USER@HOST:PORT/DB" in result.output


def test_serve_database_without_the_driver_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a)
    )
    args = ["serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(app, [*args, "--database", "postgresql://u@db/x"], env=ENV)
    assert result.exit_code == EXIT_SERVE, result.output
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert errors == [
        "Error: the PostgreSQL registry needs its driver, psycopg, which is not installed"
    ]
    assert "pip install 'bgtasks[postgres]'" in result.output


def test_serve_database_keeps_the_registry_there(tmp_path: Path) -> None:
    with fresh_database() as url:
        server = spawn_server(tmp_path / "data", args=("--database", url))
        try:
            assert "registry  PostgreSQL at" in server.log()
            httpx.post(f"{server.url}/send-notification/a@example.com").raise_for_status()
            assert not registry_path(tmp_path / "data").exists()
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT count(*) FROM bgtasks.requests").fetchone() == (1,)
        finally:
            server.stop()
