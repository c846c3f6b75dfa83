"""What the client commands do with a bad URL, a server that is not bgtasks, and a bgtasks
server that fails while a request is followed (issue #13 c, d, e): one red line, a hint and
a distinct exit code, through the real console script."""

from __future__ import annotations

import functools
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from bgtasks_cli.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from tests.cli_helpers import (
    REQUEST_ID,
    Canned,
    Lines,
    assert_one_error_line,
    cli,
    cli_env,
    cli_popen,
    http_server,
)
from tests.cli_helpers import popen_cleanup as popen_cleanup  # a fixture
from tests.helpers import ServerProcess

CLIENT_COMMANDS = [
    ("notify", "x@example.com"),
    ("readme", "FastAPI"),
    ("tasks",),
    ("tasks", "--json"),
]


class HtmlOk(Canned):
    pass


class JsonNotBgtasks(Canned):
    content_type = "application/json"
    body = b'{"hello": "world"}'


class JsonTaggedWrongShape(Canned):
    content_type = "application/json"
    body = b'[{"id": 1}]'
    request_id = REQUEST_ID


def bgtasks_like(get: Callable[[Canned, int], tuple[int, str, bytes, bool]]) -> type[Canned]:
    """A handler that accepts POSTs like bgtasks and answers the n-th GET with `get`."""

    class Handler(Canned):
        gets = 0
        lock = threading.Lock()

        def do_POST(self) -> None:
            self.answer(200, "application/json", b'{"message":"Message sent"}', True)

        def do_GET(self) -> None:
            with Handler.lock:
                Handler.gets += 1
                n = Handler.gets
            self.answer(*get(self, n))

    return Handler


def record(done: bool) -> bytes:
    status = "done" if done else "running"
    task = {
        "id": "a1b2c3d4-1",
        "request_id": REQUEST_ID,
        "seq": 0,
        "file": "log.txt",
        "line": "message to x@example.com\n",
        "status": status,
        "queued_at": time.time() - 0.01,
        "started_at": time.time() - 0.005,
        "finished_at": time.time() if done else None,
        "error": None,
    }
    document = {
        "id": REQUEST_ID,
        "method": "POST",
        "path": "/send-notification/x@example.com",
        "received_at": time.time() - 0.02,
        "response_sent_at": time.time() - 0.015,
        "status_code": 200,
        "tasks": [task],
    }
    return json.dumps(document).encode()


def assert_wrong_server(result: subprocess.CompletedProcess[str], url: str) -> str:
    assert result.returncode == EXIT_UNREACHABLE, result.stdout + result.stderr
    line = assert_one_error_line(result.stderr)
    assert line.startswith(f"Error: {url} does not answer like a bgtasks server ("), line
    assert "<" not in result.stderr and "html>" not in result.stderr  # no page in the message
    assert len(result.stderr.splitlines()) == 2  # the error and its hint
    assert "hint: " in result.stderr and "bgtasks serve" in result.stderr
    return line


# --- bad URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1", "Invalid IPv6 URL"),
        ("nonsense", "it must start with http:// or https://"),
        ("ftp://example.com", "it must start with http:// or https://"),
        ("localhost:8000", "it must start with http:// or https://"),
        ("http://", "it names no host"),
        ("http://:8000", "it names no host"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://127.0.0.1:0", "port 0 is not between 1 and 65535"),
        ("http://127.0.0.1:port", "Port could not be cast"),
        ("http://exa mple.com", "is not a host name or address"),
        ("http://127.0.0.1:8000/?x=1", "a server URL has no query or fragment"),
    ],
)
def test_a_bad_url_is_a_usage_error(url: str, why: str) -> None:
    for args in (("notify", "x@example.com", "--url", url), ("tasks", "--url", url)):
        result = cli(*args)
        assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
        line = assert_one_error_line(result.stderr)
        assert line.startswith("Error: bad server URL "), line
        assert why in line
        assert "hint: give --url or BGTASKS_URL as http://HOST:PORT" in result.stderr
        assert result.stdout == ""


def test_a_bad_bgtasks_url_in_the_environment_is_a_usage_error() -> None:
    result = cli("readme", "FastAPI", env=cli_env(BGTASKS_URL="http://[::1"))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "bad server URL 'http://[::1'" in assert_one_error_line(result.stderr)


def test_an_ipv6_url_is_accepted() -> None:
    # A well-formed IPv6 URL is refused by nobody: nothing listens there (exit 3).
    result = cli("tasks", "--url", "http://[::1]:1")
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    assert "no bgtasks server answers at http://[::1]:1" in assert_one_error_line(result.stderr)


# --- servers that are not bgtasks ------------------------------------------------------------


@pytest.mark.parametrize("args", CLIENT_COMMANDS, ids=" ".join)
def test_python_http_server_is_not_bgtasks(args: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html><body>files</body></html>\n")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http_server(handler) as url:
        result = cli(*args, "--url", url)
    line = assert_wrong_server(result, url)
    assert ("501" if args[0] != "tasks" else "404") in line
    assert result.stdout == ""


@pytest.mark.parametrize("handler", [HtmlOk, JsonNotBgtasks, JsonTaggedWrongShape])
@pytest.mark.parametrize("args", CLIENT_COMMANDS, ids=" ".join)
def test_a_server_answering_200_unlike_bgtasks(
    args: tuple[str, ...], handler: type[Canned]
) -> None:
    with http_server(handler) as url:
        result = cli(*args, "--url", url)
    line = assert_wrong_server(result, url)
    assert " got 200" in line
    assert "JSONDecodeError" not in result.stderr and "KeyError" not in result.stderr


def html_page(handler: Canned, n: int) -> tuple[int, str, bytes, bool]:
    return 200, "text/html", Canned.body, False


def html_not_found(handler: Canned, n: int) -> tuple[int, str, bytes, bool]:
    return 404, "text/html", b"<html><body>Not Found</body></html>", False


@pytest.mark.parametrize("get", [html_page, html_not_found])
@pytest.mark.parametrize("command", [("notify", "x@example.com"), ("readme", "FastAPI")])
def test_a_follow_answered_unlike_bgtasks(
    command: tuple[str, ...], get: Callable[[Canned, int], tuple[int, str, bytes, bool]]
) -> None:
    # The request is answered like bgtasks, its record is not: said at once, not waited out.
    with http_server(bgtasks_like(get)) as url:
        result = cli(*command, "--timeout", "600", "--url", url, timeout=60)
        assert_wrong_server(result, url)
    assert f"GET /requests/{REQUEST_ID} got " in result.stderr
    assert " → 200 in " in result.stdout  # the response was shown before the follow failed


# --- a bgtasks server failing during the follow ----------------------------------------------


def test_only_a_404_means_not_recorded_yet() -> None:
    def get(handler: Canned, n: int) -> tuple[int, str, bytes, bool]:
        if n <= 3:
            return 404, "application/json", b'{"detail":"no such request"}', True
        return 200, "application/json", record(done=True), True

    with http_server(bgtasks_like(get)) as url:
        result = cli("notify", "x@example.com", "--json", "--url", url)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["server"]["tasks"][0]["status"] == "done"


@pytest.mark.parametrize(
    ("status", "content_type", "body", "shown"),
    [
        (500, "text/plain; charset=utf-8", b"Internal Server Error", "500 Internal Server Error"),
        (503, "application/json", b'{"detail":"task registry unavailable: locked"}', "503 task"),
        (502, "text/html", b"<html>\n<body>Bad Gateway</body>\n</html>", "502 Bad Gateway"),
    ],
)
def test_a_server_error_during_the_follow_is_reported_at_once(
    status: int, content_type: str, body: bytes, shown: str
) -> None:
    def get(handler: Canned, n: int) -> tuple[int, str, bytes, bool]:
        if n == 1:
            return 200, "application/json", record(done=False), True
        return status, content_type, body, False

    with http_server(bgtasks_like(get)) as url:
        result = cli("notify", "x@example.com", "--timeout", "600", "--url", url, timeout=60)
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    line = assert_one_error_line(result.stderr)
    assert line.startswith(f"Error: GET /requests/{REQUEST_ID}: the server failed: {shown}"), line
    assert "<" not in result.stderr


def test_a_damaged_registry_during_the_follow_is_reported_at_once(
    server_process: Callable[..., ServerProcess],
    popen_cleanup: list[subprocess.Popen[str]],
) -> None:
    server = server_process(delay=3.0)
    proc = cli_popen("notify", "x@example.com", "--timeout", "600", "--url", server.url)
    popen_cleanup.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    Lines(proc.stdout).until(lambda line: " → 200 in " in line)
    # Damaged under the running server: its reads of the request fail from now on.
    db = sqlite3.connect(server.data_dir / ".bgtasks" / "registry.db", timeout=10)
    db.execute("DROP TABLE tasks")
    db.close()
    # Exits long before its tasks would end (3 s) or its timeout (600 s) would pass.
    assert proc.wait(timeout=30) == EXIT_FAILED
    stderr = proc.stderr.read()
    line = assert_one_error_line(stderr)
    assert "GET /requests/" in line and "the server failed: 503" in line, stderr
    assert "no such table: tasks" in line  # the registry's own words
