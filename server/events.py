"""The event stream: what the registry committed, as server-sent events (`GET /events`).

Every group commit records, in the same transaction, the events its changes make as one row of
the store's event log, in commit order (server/registry/events.py). A stream reads that log from
where its client left off (`Last-Event-ID`), so it works across workers and machines and loses
nothing across a reconnect while the log still holds it; this process's own commits wake it at
once, other processes' within POLL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.registry import Registry

POLL_S = 0.01  # how soon another process's commit reaches a stream here
PING_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
SEND_TIMEOUT_S = 30.0  # a client that takes longer to take an event is dropped
EVENT_ID_PATTERN = r"^.+/[0-9]+$"  # <commit>/<index>, as each event's id
BATCH = 500  # commits read at a time: a stream holds no more than this in memory


def stream_events(
    registry: Registry, *, after: str | None, request_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    """The events committed after `after` (an event id; None: from now), of one request or all;
    each with its id (`<commit>/<index>`) for the client's Last-Event-ID."""

    async def events() -> AsyncIterator[ServerSentEvent]:
        if after is None:
            cursor, skip = await registry.store.last_event_commit(), -1
        else:
            cursor, skip = _parse(after)  # within that commit, what comes after that event
        while True:
            wake = registry.committed  # before reading: a commit meanwhile sets it
            rows = await registry.store.events_after(cursor, BATCH, inclusive=skip >= 0)
            for commit, body in rows:
                for index, (kind, rid, task_id, at, details) in enumerate(json.loads(body)):
                    if commit == cursor and index <= skip:
                        continue  # delivered before the client reconnected
                    if request_id is not None and rid != request_id:
                        continue
                    data = {"request_id": rid, "task_id": task_id, "at": at, **(details or {})}
                    yield ServerSentEvent(data=json.dumps(data), event=kind, id=f"{commit}/{index}")
                cursor, skip = commit, -1
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_S)

    return events()


def _parse(event_id: str) -> tuple[str, int]:
    """An event id's commit and index; the header's pattern has checked its shape."""
    commit, _, index = event_id.rpartition("/")
    return commit, int(index)


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
    Each has an `id`; send it back as `Last-Event-ID` to resume without losing any."""
    registry: Registry = request.app.state.registry
    content = stream_events(registry, after=last_event_id, request_id=request_id)
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
