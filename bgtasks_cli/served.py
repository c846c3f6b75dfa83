"""The app `bgtasks serve` runs: `server.app.create_app()` with the process's garbage collector
tuned once start-up is done.

Process-wide tuning belongs to the process that serves, not to the app: an app built by
`create_app()` (a test's server, an app that embeds bgtasks) leaves the collector alone. uvicorn
builds this app from its import string in every worker process (`launcher.APP_FACTORY`), so each
worker tunes its own collector. The client commands never import this module.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

GC_THRESHOLD = (10_000, 50, 100)
"""Each sleeping task keeps objects alive; with the default first threshold (700), collections
took ~12% of the CPU under load, and with ~2,000 tasks asleep a full collection took ~200 ms."""


def create_served_app() -> FastAPI:
    """uvicorn's factory for `bgtasks serve`: the app from `BGTASKS_*`, its GC tuned at start."""
    from server.app import create_app

    return tune_gc_after_startup(create_app())


def tune_gc_after_startup(app: FastAPI) -> FastAPI:
    """Wrap `app`'s lifespan so that once its start-up is done the collector is frozen and its
    threshold raised (`tune_gc`); both are put back after its shutdown."""
    started_up = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        previous = None
        try:
            async with started_up(app) as state:
                previous = tune_gc()
                yield state
        finally:
            # After the shutdown (the tasks' drain included), which runs tuned too.
            if previous is not None:
                untune_gc(previous)

    app.router.lifespan_context = lifespan
    return app


def tune_gc() -> tuple[int, int, int]:
    """Freeze everything built so far (it lives as long as the app: keep it out of every
    collection) and raise the threshold; returns the threshold it replaced."""
    previous: tuple[int, int, int] = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    return previous


def untune_gc(threshold: tuple[int, int, int]) -> None:
    """Undo `tune_gc`: what was frozen can be collected again once it is garbage."""
    gc.set_threshold(*threshold)
    gc.unfreeze()
