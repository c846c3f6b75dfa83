"""Starting `serve` in this process with uvicorn: the checks before it, and the run."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bgtasks_cli.errors import InvalidInput, ServeError
from bgtasks_cli.state import ServerState, clear_state, write_state
from server.paths import owners_dir

if TYPE_CHECKING:
    from server.config import Settings

APP_FACTORY = "bgtasks_cli.served:create_served_app"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    return f"http://{shown}:{port}"


def check_port(host: str, port: int) -> None:
    """Fail with a clear error if `host:port` cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                "is another server running there? pick another port with --port",
            ) from None


def check_data_dir(data_dir: Path) -> None:
    """Create the data directory if needed and prove it is writable."""
    try:
        # The registry and the owner locks live under .bgtasks/: prove that works too.
        owners_dir(data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=owners_dir(data_dir), prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ServeError(
            f"data directory {data_dir} is not writable: {exc.strerror or exc}",
            "choose another with --data-dir or BGTASKS_DATA_DIR",
        ) from None


def check_registry(data_dir: Path) -> None:
    """Fail with one line naming the file if the registry could not be used: a symbolic link
    out of the data directory, a file that is not a SQLite database or is damaged, or one
    this process cannot write."""
    from server.registry import RegistryError
    from server.registry import check_registry as check

    try:
        check(data_dir)
    except RegistryError as exc:
        raise ServeError(
            f"the task registry cannot be used: {exc}",
            "repair or move it aside (the next start creates a new registry), "
            "or choose another data directory with --data-dir",
        ) from None


def check_database(url: str) -> None:
    """Fail with one line if the PostgreSQL registry at `url` cannot be used: InvalidInput
    for a URL that names no database, ServeError for one that does not answer. The URL's
    password is never shown."""
    import importlib.util
    from urllib.parse import urlsplit

    shown = redact(url)
    if importlib.util.find_spec("psycopg") is None:
        raise ServeError(
            "the PostgreSQL registry needs its driver, psycopg, which is not installed",
            "pip install 'bgtasks[postgres]'",
        )
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        urlsplit(url).port  # noqa: B018  (psycopg leaves a port that is no number to libpq)
        conninfo_to_dict(url)
    except (ValueError, psycopg.Error) as exc:
        raise InvalidInput(
            f"--database {shown!r} is not a PostgreSQL URL: {_first_line(exc)}", DATABASE_HINT
        ) from None
    try:
        psycopg.connect(url, connect_timeout=5, autocommit=True).close()
    except psycopg.Error as exc:
        raise ServeError(
            f"the database at {shown} cannot be used: {_first_line(exc)}",
            "is PostgreSQL running there, and may that user connect? " + DATABASE_HINT,
        ) from None


DATABASE_HINT = "give --database (or BGTASKS_DATABASE_URL) as postgresql://USER@HOST:PORT/DB"


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by ***."""
    return re.sub(r"^([a-z]+://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__


def preflight(*, host: str, port: int, data_dir: Path, database_url: str | None = None) -> None:
    """Everything `serve` needs that can be checked before it starts, each failure one
    ServeError line: the registry (the data directory's SQLite file, or the PostgreSQL
    database at `database_url`), the data directory, the metrics directory, the port."""
    # The registry first: with `.bgtasks` a symbolic link, the data directory's check would
    # already have written through it.
    if database_url is None:
        check_registry(data_dir)
    else:
        check_database(database_url)
    check_data_dir(data_dir)
    check_metrics_dir(data_dir)
    check_port(host, port)


def check_metrics_dir(data_dir: Path) -> None:
    """Fail with one line if the metrics directory is a symbolic link (the server would
    refuse to write through it)."""
    from server.metrics import metrics_dir

    if metrics_dir(data_dir).is_symlink():
        raise ServeError(
            f"{metrics_dir(data_dir)} is a symbolic link; bgtasks writes only inside its data dir",
            "remove the link (the server makes the directory), or set BGTASKS_METRICS=0",
        )


def load_settings(**options: Any) -> Settings:
    """The server's settings: the environment's `BGTASKS_*`, with the options given on the
    command line taking precedence. Raises InvalidInput in one line naming the bad one (or,
    for a rule between two, both): by its option if it was given as one, else by its
    variable."""
    from server.config import SettingsError
    from server.config import load_settings as load

    try:
        return load(**options)
    except SettingsError as exc:
        message = str(exc)
        flags = {f"BGTASKS_{option.upper()}": "--" + option.replace("_", "-") for option in options}
        named = re.findall(r"BGTASKS_[A-Z_]+", message.split(" (got ", 1)[0])
        for name in named:
            message = message.replace(name, flags.get(name, name))
        # A setting neither given nor in the environment is at its default: nothing to unset.
        environment = {variable.upper() for variable in os.environ}  # read case-blind
        unset = [name for name in named if name not in flags and name in environment]
        if not unset:
            raise InvalidInput(message, "see `bgtasks serve --help`") from None
        raise InvalidInput(
            message,
            f"fix or unset {' or '.join(unset)}; the README's Configuration lists each setting",
        ) from None


def log_config(log_format: str = "text") -> dict[str, Any]:
    """uvicorn's logging, readable or one JSON object per line (`log_format` "json"), plus
    the service's own `bgtasks` logger on the same handler."""
    from server.logs import log_config as config

    return config("json" if log_format == "json" else "text")


def announce_json(*, host: str, url: str, data_dir: Path, workers: int, settings: Settings) -> None:
    """What the banner says, as JSON log lines (`serve --log-format json`), so that every
    line of the server's output is one JSON object."""
    import logging.config

    from server import __version__

    logging.config.dictConfig(log_config("json"))
    log = logging.getLogger("bgtasks")
    if not is_loopback(host):
        log.warning("binding %s exposes the service beyond this machine", host)
    log.info(
        "bgtasks %s serving at %s",
        __version__,
        url,
        extra={
            "url": url,
            "docs": f"{url}/docs",
            "data_dir": str(data_dir),
            "delay": settings.delay,
            "workers": workers,
            "drain_timeout": settings.drain_timeout,
            "max_attempts": settings.max_attempts,
            "retry_base": settings.retry_base,
            "retry_max": settings.retry_max,
            "metrics": f"{url}/metrics" if settings.metrics else None,
        },
    )


def serve(
    *,
    host: str,
    port: int,
    workers: int,
    data_dir: Path,
    delay: float,
    drain_timeout: float | None,
    access_log: bool,
    record_state: bool,
    retries: tuple[int, float, float],
    log_format: str = "text",
    database_url: str | None = None,
) -> None:
    """Run the service under uvicorn until it is stopped (call `preflight` first). Blocks.
    `retries` is (max_attempts, retry_base, retry_max).

    After a SIGTERM the process dies of it once the server has stopped (exit status 143 in a
    shell), whatever the number of workers; after Ctrl-C it returns."""
    import uvicorn

    # Workers are separate processes that build the app from the environment.
    os.environ["BGTASKS_DATA_DIR"] = str(data_dir)
    os.environ["BGTASKS_DELAY"] = repr(delay)
    if drain_timeout is not None:
        os.environ["BGTASKS_DRAIN_TIMEOUT"] = repr(drain_timeout)
    os.environ["BGTASKS_LOG_FORMAT"] = log_format
    if database_url is not None:
        os.environ["BGTASKS_DATABASE_URL"] = database_url
    for name, value in zip(("MAX_ATTEMPTS", "RETRY_BASE", "RETRY_MAX"), retries, strict=True):
        os.environ[f"BGTASKS_{name}"] = repr(value)
    pid = os.getpid()
    if record_state:
        write_state(ServerState(url=url_for(host, port), pid=pid, data_dir=str(data_dir)))
    # After a graceful stop on SIGTERM, one uvicorn server re-raises the signal under the
    # handler that was in place before it ran; with the default one the process would die
    # before `finally` and leave the state file behind. Turn it into an exception, clean up,
    # then die of it. With several workers uvicorn's supervisor takes SIGTERM like Ctrl-C and
    # re-raises neither, so the signals that arrived are also read from the wakeup fd.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    terminated = False
    try:
        with _signals_seen() as seen:
            uvicorn.run(
                APP_FACTORY,
                factory=True,
                host=host,
                port=port,
                workers=workers,
                # uvicorn takes whole seconds for the requests in flight; the tasks' own
                # drain (in the app's lifespan) keeps the exact timeout.
                timeout_graceful_shutdown=(
                    None if drain_timeout is None else math.ceil(drain_timeout)
                ),
                log_config=log_config(log_format),
                access_log=access_log,
            )
    except _Terminated:
        terminated = True
    except SystemExit as exc:
        # uvicorn exits 3 when the app could not start; its log above says why.
        if exc.code not in (0, None):
            raise ServeError(
                "the server could not start (see the log above)",
                "check the data directory and its .bgtasks/registry.db",
            ) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if record_state:
            clear_state(pid)
    if terminated or signal.SIGTERM in seen:
        signal.raise_signal(signal.SIGTERM)


class _Terminated(BaseException):
    """SIGTERM outside uvicorn's own handling (see `serve`)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


@contextmanager
def _signals_seen() -> Iterator[set[int]]:
    """The signals that arrive during the block, whoever handles them (read after it)."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    seen: set[int] = set()
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        yield seen
    finally:
        signal.set_wakeup_fd(previous)
        with contextlib.suppress(BlockingIOError):
            while data := reader.recv(4096):
                seen.update(data)
        reader.close()
        writer.close()
