"""`bgtasks recover --owner ID [--rewrite]` against real servers: SQLite (every line is claimed
in the server's own data directory) and PostgreSQL (a lost host's claimed lines)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from bgtasks_cli.cli import app
from bgtasks_cli.errors import EXIT_FAILED, EXIT_USAGE
from server.config import Settings
from tests.helpers import LiveServer, serve_in_thread, wait_until
from tests.postgres import fresh_database
from tests.registry_helpers import a_log, die_after_claiming, pg_registry, two_tasks

ENV = {"COLUMNS": "160", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=ENV)


def one_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 1, result.output
    return errors[0]


def test_an_unknown_owner_is_one_line_and_exit_1(start_server: Callable[..., LiveServer]) -> None:
    live = start_server()
    line = one_error(invoke("recover", "--owner", "deadbeef", "--url", live.url), EXIT_FAILED)
    assert line == "Error: GET /owners/deadbeef: 404 no owner 'deadbeef' in the registry"


def test_a_bad_owner_id_is_refused_before_any_request() -> None:
    result = invoke("recover", "--owner", "nope", "--url", "http://127.0.0.1:9")
    assert "is not an owner id" in one_error(result, EXIT_USAGE)


def test_a_known_owner_on_sqlite_has_no_lines_waiting(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    httpx.post(f"{live.url}/send-notification/a@example.com").raise_for_status()
    owner = wait_until(lambda: httpx.get(f"{live.url}/tasks").json())[0]["owner"]
    result = invoke("recover", "--owner", owner, "--url", live.url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"owner {owner} · host ")
    assert "no lines of it wait for another data directory" in result.stdout
    doc = json.loads(invoke("recover", "--owner", owner, "--json", "--url", live.url).stdout)
    assert doc["owner"] == owner and doc["waiting"] == []
    assert doc["alive"] is True  # it holds its lock in the data directory


@pytest.fixture
def lost_host(tmp_path: Path) -> Iterator[LiveServer]:
    """Owner 0000000a claimed a line in its data directory and died with its host; server b
    shares its PostgreSQL registry."""
    with fresh_database() as url:
        request = two_tasks("r1", "x")

        async def a_dies() -> None:
            a = pg_registry(url, tmp_path / "a", "0000000a")
            await a.open()
            await a.commit_intents(request)
            await die_after_claiming(a, request.tasks[0])

        asyncio.run(a_dies())
        with serve_in_thread(Settings(data_dir=tmp_path / "b", delay=0, database_url=url)) as b:
            wait_until(lambda: httpx.get(f"{b.url}/owners/0000000a").json()["waiting"])
            yield b


def test_recover_shows_a_lost_hosts_lines_and_rewrites_them(lost_host: LiveServer) -> None:
    b = lost_host
    shown = invoke("recover", "--owner", "0000000a", "--url", b.url)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert out.startswith("owner 0000000a · host ") and "not running" in out
    assert "1 line it claimed in its own data directory wait for it:" in out
    assert "r1-1  req r1  'found query: x\\n' → log.txt" in out
    assert "`bgtasks recover --owner 0000000a --rewrite` writes them here" in out

    rewritten = invoke("recover", "--owner", "0000000a", "--rewrite", "--url", b.url)
    assert rewritten.exit_code == 0, rewritten.output
    assert "rewrote 1 line of owner 0000000a in this data directory:" in rewritten.stdout
    assert "warning: these lines may also be in the lost data directory" in rewritten.stdout
    assert "two data directories" in rewritten.stdout
    wait_until(lambda: a_log(b.data_dir) == b"found query: x\nmessage to x@example.com\n")

    doc = json.loads(invoke("recover", "--owner", "0000000a", "--json", "--url", b.url).stdout)
    assert doc["waiting"] == [] and doc["alive"] is False
    again = invoke("recover", "--owner", "0000000a", "--rewrite", "--json", "--url", b.url)
    assert json.loads(again.stdout)["rewritten"] == []

    alive = b.app.state.registry.owner
    refused = invoke("recover", "--owner", alive, "--rewrite", "--url", b.url)
    line = one_error(refused, EXIT_FAILED)
    assert line == (
        f"Error: POST /owners/{alive}/rewrite: 409 owner {alive} is alive:"
        " its lines are its own to write"
    )
