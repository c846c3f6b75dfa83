"""The app factory: nothing is built at import; `create_app` builds, the lifespan opens."""

from __future__ import annotations

import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

from server import __version__, tracing
from server.config import Settings
from server.metrics import Metrics
from server.middleware import RegistryMiddleware
from server.observe import combine
from server.registry import Registry, SqliteStore
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
    store = SqliteStore(
        settings.data_dir, retention=settings.retention, lock_timeout=settings.lock_timeout
    )
    registry = Registry(
        settings.data_dir,
        owner=uuid.uuid4().hex[:8],
        store=store,
        lock_timeout=settings.lock_timeout,
        observer=observer,
    )
    runner = TaskRunner(
        registry, delay=settings.delay, max_running=settings.max_running, observer=observer
    )

    @asynccontextmanager
    async def serving(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        adopted = await registry.open()
        if adopted:
            logger.warning("running %d tasks left unfinished by a stopped server", len(adopted))
            runner.adopt(adopted)
        restore = _log_pending_on_signal(runner)
        logger.info(
            "bgtasks %s serving data dir %s (delay %ss)",
            __version__,
            settings.data_dir,
            settings.delay,
        )
        try:
            yield
        finally:
            restore()
            await runner.drain(settings.drain_timeout)
            if runner.unfinished:
                runner.log_unfinished(
                    "stopped before these finished; they stay in the registry"
                    " and are finished at the next start"
                )
            await registry.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Metrics from before the registry opens: its recovery of dead servers is observed.
        with _observing(metrics, traces):
            async with serving(app):
                yield

    app = FastAPI(title="bgtasks", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.runner = runner
    app.state.metrics = metrics
    # The requests worth recording: the seed's endpoints (others may add theirs).
    app.state.recorded_paths = add_routes(app)
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


def _log_pending_on_signal(runner: TaskRunner) -> Callable[[], None]:
    """Chain onto the server's SIGINT/SIGTERM handlers to log which tasks shutdown waits for."""
    import asyncio
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(runner.log_unfinished, f"{signal.Signals(sig).name} received")
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
