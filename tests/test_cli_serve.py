"""`serve` and `demo` hardened (issue #13 b, f, k), through the real console script: a
registry that cannot be used is one line before anything starts, SIGTERM is died of with any
number of workers, and the demo names why its server failed and leaves nothing behind on
Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bgtasks_cli.demo_server import DemoServer
from bgtasks_cli.errors import EXIT_SERVE, ServeError
from tests.cli_helpers import (
    HAS_PROC,
    Lines,
    assert_one_error_line,
    cli,
    cli_env,
    processes_mentioning,
)
from tests.helpers import ServerProcess, free_port, wait_until

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def serve_once(data: Path) -> subprocess.CompletedProcess[str]:
    return cli("serve", "--port", str(free_port()), "--data-dir", str(data), timeout=60)


def assert_refused_registry(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == EXIT_SERVE, result.stdout + result.stderr
    line = assert_one_error_line(result.stderr)
    assert line.startswith("Error: the task registry cannot be used: "), line
    for word in words:
        assert word in line, line
    assert "hint: repair or move it aside" in result.stderr
    assert "could not start" not in result.stderr and "Traceback" not in result.stdout
    assert result.stdout == ""  # refused before the banner: nothing started
    return line


# --- a registry that cannot be used ----------------------------------------------------------


def test_random_bytes_for_a_registry(tmp_path: Path) -> None:
    db = tmp_path / "data" / ".bgtasks" / "registry.db"
    db.parent.mkdir(parents=True)
    garbage = os.urandom(64 * 1024)
    db.write_bytes(garbage)
    assert_refused_registry(serve_once(tmp_path / "data"), str(db), "not a usable task registry")
    assert db.read_bytes() == garbage


def test_a_registry_that_is_a_directory(tmp_path: Path) -> None:
    db = tmp_path / "data" / ".bgtasks" / "registry.db"
    db.mkdir(parents=True)
    assert_refused_registry(serve_once(tmp_path / "data"), str(db), "not a regular file")


def test_a_read_only_registry(tmp_path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    db = tmp_path / "data" / ".bgtasks" / "registry.db"
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    made = subprocess.run(["chattr", "+i", str(db)], capture_output=True, text=True, check=False)
    try:
        if made.returncode != 0:
            pytest.skip(f"chattr +i failed here: {made.stderr.strip()}")
        assert_refused_registry(serve_once(tmp_path / "data"), str(db), "readonly")
    finally:
        subprocess.run(["chattr", "-i", str(db)], capture_output=True, check=False)


@pytest.mark.parametrize("link", [".bgtasks", ".bgtasks/registry.db"])
def test_a_registry_behind_a_symbolic_link(tmp_path: Path, link: str) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / ".bgtasks").mkdir(parents=True) if "/" in link else data.mkdir()
    elsewhere.mkdir()
    if "/" in link:
        target = elsewhere / "registry.db"
        sqlite3.connect(target).close()
        (data / link).symlink_to(target)
    else:
        (data / link).symlink_to(elsewhere, target_is_directory=True)
    before = sorted(elsewhere.iterdir())
    assert_refused_registry(serve_once(data), f"{data / link} is a symbolic link")
    assert sorted(elsewhere.iterdir()) == before  # nothing was written through it


# --- stopping --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_dies_of_sigterm_with_any_number_of_workers(
    workers: int, server_process: Callable[..., ServerProcess]
) -> None:
    server = server_process(args=("--workers", str(workers)))
    state = server.data_dir.parent / "state" / "server.json"
    assert state.exists()
    assert server.stop(signal.SIGTERM, timeout=60) == -signal.SIGTERM
    assert not state.exists()


def test_serve_with_workers_exits_0_after_ctrl_c(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(args=("--workers", "2"))
    assert server.stop(signal.SIGINT, timeout=60) == 0
    assert not (server.data_dir.parent / "state" / "server.json").exists()


# --- demo ------------------------------------------------------------------------------------


def test_demo_server_start_up_failure_names_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server = DemoServer(delay=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        with pytest.raises(ServeError) as caught:
            server.start()
    assert caught.value.message == (
        f"the demo server exited at start-up: cannot listen on 127.0.0.1:{server.port}:"
        " Address already in use"
    )
    assert list(tmp_path.iterdir()) == []


def scratch_entry(scratch: Path) -> Path | None:
    entries = list(scratch.iterdir())
    return entries[0] if entries else None


MOMENTS: dict[str, Callable[[Path], bool]] = {
    "its directory exists": lambda root: True,
    "its server is starting": lambda root: (root / "server.log").exists(),
    "its server answers": lambda root: (
        b"Application startup complete" in (root / "server.log").read_bytes()
    ),
    "a task has written": lambda root: (root / "data" / "log.txt").exists(),
}


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to look for leftover processes")
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_demo_interrupted_leaves_nothing_behind(moment: str, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bgtasks_cli", "demo", "--delay", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(TMPDIR=str(scratch)),
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        deadline = time.monotonic() + 30
        while True:
            root = scratch_entry(scratch)
            try:
                if root is not None and MOMENTS[moment](root):
                    break
            except OSError:
                pass
            assert proc.poll() is None, "the demo ended before the moment came"
            assert time.monotonic() < deadline, f"never saw the moment: {moment}"
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == INTERRUPTED
        assert "Traceback" not in "".join(err.rest())
        out.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert list(scratch.iterdir()) == []
    # The demo waits for its server before it exits; allow the kernel a moment to reap it.
    wait_until(lambda: processes_mentioning(str(scratch)) == [], timeout=10)
