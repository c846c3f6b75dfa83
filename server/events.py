"""The event stream: what the registry committed, as server-sent events (`GET /events`).

Every group commit records, in the same transaction, the events its changes make as one row of
the store's event log, in commit order (server/registry/events.py), while a stream listens: an
open stream asks every process to record for a lease (Registry.listen), as Celery's monitors
turn on its workers' events. A stream reads that log from where its client left off
(`Last-Event-ID`), so it works across workers and machines and loses nothing across a
reconnect within the lease; this process's own commits wake it at once, other processes'
within POLL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.registry import Registry, RegistryError
from server.registry.registry import LISTEN_RENEW_S

logger = logging.getLogger("bgtasks.events")

POLL_S = 0.01  # how soon another process's commit reaches a stream here
PING_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
SEND_TIMEOUT_S = 30.0  # a client that takes longer to take an event is dropped
EVENT_ID_PATTERN = r"^[0-9.]{1,40}/[0-9]{1,9}$"  # <commit>/<index>, as each event's id
BATCH = 500  # commits read at a time: a stream holds no more than this in memory


def stream_events(
    registry: Registry, *, cursor: str, skip: int, request_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    """The events committed after event `skip` of commit `cursor` (skip -1: after the whole
    commit), of one request or all; each with its id (`<commit>/<index>`) for the client's
    Last-Event-ID. Renews the lease on recording while the client listens."""

    async def events() -> AsyncIterator[ServerSentEvent]:
        nonlocal cursor, skip
        renew_at = time.monotonic() + LISTEN_RENEW_S
        while True:
            wake = registry.committed  # before reading: a commit meanwhile sets it
            try:
                rows = await registry.store.events_after(cursor, BATCH, inclusive=skip >= 0)
            except RegistryError as exc:  # the client reconnects with its Last-Event-ID
                logger.warning("an event stream ends: %s", exc)
                return
            for commit, body in rows:
                for index, (kind, rid, task_id, at, details) in enumerate(json.loads(body)):
                    if commit == cursor and index <= skip:
                        continue  # delivered before the client reconnected
                    if request_id is not None and rid != request_id:
                        continue
                    data = {"request_id": rid, "task_id": task_id, "at": at, **(details or {})}
                    yield ServerSentEvent(data=json.dumps(data), event=kind, id=f"{commit}/{index}")
                cursor, skip = commit, -1
            if time.monotonic() >= renew_at:
                with contextlib.suppress(RegistryError):  # the next renewal tries again
                    await registry.listen()
                renew_at = time.monotonic() + LISTEN_RENEW_S
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_S)

    return events()


def _bad_event_id(value: str) -> RequestValidationError:
    error = {
        "type": "value_error",
        "loc": ("header", "last-event-id"),
        "msg": "Value error, not an event id of this server (send back an event's `id`)",
        "input": value,
    }
    return RequestValidationError([error])


async def get_events(
    request: Request,
    request_id: Annotated[
        str | None, Query(max_length=128, description="Only this request's events.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=200,
            pattern=EVENT_ID_PATTERN,
            description="Resume after this event (set by EventSource).",
        ),
    ] = None,
) -> EventSourceResponse:
    """Server-sent events of every request and task, in commit order, as they are committed.
    Each has an `id`; send it back as `Last-Event-ID` to resume without losing any (within
    five minutes: events are recorded while a stream listens, and that long after)."""
    registry: Registry = request.app.state.registry
    if last_event_id is None:
        commit, skip = None, -1
    else:  # <commit>/<index>; the header's pattern has checked the slash and the index
        commit, _, index = last_event_id.rpartition("/")
        if not re.fullmatch(registry.store.event_cursor, commit):
            raise _bad_event_id(last_event_id)
        skip = int(index)
    await registry.listen()
    # Fixed before the response's headers: a client that has them misses no later commit.
    cursor = commit if commit is not None else await registry.store.last_event_commit()
    content = stream_events(registry, cursor=cursor, skip=skip, request_id=request_id)
    return EventSourceResponse(content, ping=PING_S, send_timeout=SEND_TIMEOUT_S)


def add_event_routes(app: FastAPI) -> None:
    app.add_api_route(
        "/events",
        get_events,
        methods=["GET"],
        response_class=EventSourceResponse,
        tags=["registry"],
        responses={200: {"content": {"text/event-stream": {}}}},
    )
