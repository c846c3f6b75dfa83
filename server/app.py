"""The app factory: nothing is built at import; `create_app` builds, the lifespan opens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

from server import __version__, tracing
from server.config import Settings
from server.events import add_event_routes
from server.metrics import Metrics
from server.middleware import RegistryMiddleware
from server.observe import combine
from server.operators import add_operator_routes
from server.registry import Registry, SqliteStore, Store, StoreFault
from server.retries import RetryPolicy
from server.routes import add_routes
from server.runner import TaskRunner

logger = logging.getLogger("bgtasks")

DESCRIPTION = """
The seed's FastAPI background-task endpoints, with every task recorded in a durable registry.
Each response carries `X-Request-ID`; `GET /requests/{id}` shows when the response left and when
each task was queued, started and finished.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. With no settings, read them from `BGTASKS_*` environment variables."""
    settings = settings or Settings()
    metrics = Metrics(settings.data_dir) if settings.metrics else None
    traces = tracing.Tracing.from_env()
    observer = combine(metrics, traces)
    store = make_store(settings)
    registry = Registry(
        settings.data_dir,
        owner=uuid.uuid4().hex[:8],
        store=store,
        lock_timeout=settings.lock_timeout,
        observer=observer,
    )
    retries = RetryPolicy(settings.max_attempts, settings.retry_base, settings.retry_max)
    runner = TaskRunner(
        registry,
        delay=settings.delay,
        max_running=settings.max_running,
        retries=retries,
        observer=observer,
    )
    registry.on_adopted = runner.adopt

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Metrics from before the registry opens: its recovery of dead servers is observed.
        with _observing(metrics, traces):
            async with serving(app):
                yield

    @asynccontextmanager
    async def serving(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        adopted = await registry.open()
        if adopted:
            logger.warning("running %d tasks left unfinished by a stopped server", len(adopted))
            runner.adopt(adopted)
        forced = asyncio.Event()
        restore = _watch_stop_signals(runner, forced)
        logger.info(
            "bgtasks %s serving data dir %s (delay %ss)",
            __version__,
            settings.data_dir,
            settings.delay,
        )
        try:
            yield
        except asyncio.CancelledError:
            # The server left without a lifespan shutdown: uvicorn skips it on a second Ctrl-C
            # that comes before it, and the loop's teardown cancels this task instead. Stop
            # without waiting and end normally: re-raised, it is logged as a failed shutdown.
            forced.set()
        finally:
            await runner.drain(settings.drain_timeout, forced)
            restore()
            if runner.unfinished:
                runner.log_unfinished(
                    "stopped before these finished; they stay in the registry"
                    " and are finished at the next start"
                )
            await registry.close()

    app = FastAPI(title="bgtasks", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.runner = runner
    app.state.metrics = metrics
    # The requests worth recording: the seed's endpoints (others may add theirs).
    app.state.recorded_paths = add_routes(app)
    add_operator_routes(app)
    add_event_routes(app)
    app.add_middleware(
        RegistryMiddleware, registry=registry, runner=runner, recorded=app.state.recorded_paths
    )
    # Each only when it is on, outside the registry's (the last added is the outermost).
    if settings.log_format == "json":
        from server.logs import RequestIdMiddleware

        app.add_middleware(RequestIdMiddleware)
    if traces is not None:
        app.add_middleware(tracing.TracingMiddleware, tracing=traces)
    return app


@contextmanager
def _observing(metrics: Metrics | None, traces: tracing.Tracing | None) -> Iterator[None]:
    """Keep metrics, and export traces, for as long as the block runs."""
    if metrics is not None:
        metrics.open()
    try:
        yield
    finally:
        if metrics is not None:
            metrics.close()
        if traces is not None:
            traces.close()


def make_store(settings: Settings) -> Store:
    """The store the settings ask for: PostgreSQL for a database URL, else SQLite in the data
    directory."""
    if settings.database_url is None:
        return SqliteStore(
            settings.data_dir, retention=settings.retention, lock_timeout=settings.lock_timeout
        )
    try:
        from server.registry.postgres import PostgresStore
    except ImportError:
        raise StoreFault(
            "a PostgreSQL registry needs psycopg: pip install 'bgtasks[postgres]'"
        ) from None
    return PostgresStore(
        settings.database_url,
        settings.data_dir,
        retention=settings.retention,
        lock_timeout=settings.lock_timeout,
    )


def _watch_stop_signals(runner: TaskRunner, forced: asyncio.Event) -> Callable[[], None]:
    """Chain onto the server's SIGINT/SIGTERM handlers: log which tasks shutdown waits for,
    and on a second signal (of either kind) set `forced`, which ends the drain at once.

    In a worker of `--workers N` (or `--reload`), uvicorn's supervisor passes every stop on to
    it as one SIGTERM of its own, on top of the SIGINT a terminal's Ctrl-C sends the whole
    process group: that first SIGTERM is not the user's second signal, so it does not count.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    relayed = multiprocessing.parent_process() is not None
    received: list[int] = []

    def on_signal(sig: int, counted: int) -> None:
        name = signal.Signals(sig).name
        if forced.is_set():
            logger.warning("%s received: already stopping without waiting", name)
        elif counted < 2:
            runner.log_unfinished(f"{name} received")
        else:
            forced.set()
            # Said now: a worker whose lifespan uvicorn skips dies of the SIGTERM it re-raises
            # before the lifespan's own last word.
            reason = f"{name} received again: stopping now"
            if runner.unfinished:
                reason += (
                    ", without waiting for them; they stay in the registry"
                    " and are finished at the next start"
                )
            runner.log_unfinished(reason)

    def handler(sig: int, frame: FrameType | None) -> None:
        received.append(sig)
        counted = len(received) - (1 if relayed and signal.SIGTERM in received else 0)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to stop
            loop.call_soon_threadsafe(on_signal, sig, counted)
        chained = previous.get(sig)
        if callable(chained):
            chained(sig, frame)
        elif chained == signal.SIG_DFL:
            signal.default_int_handler(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)

    return restore
