"""Pure ASGI middleware: request ids, the request record, and the group commit of intents
before the response's first byte leaves."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Set
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.records import RequestRecord, new_request_id
from server.registry import Registry, RegistryError
from server.runner import TaskRunner

REQUEST_ID_HEADER = b"x-request-id"
_WELL_FORMED_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SCOPE_KEY = "bgtasks.request"
RUNNER_KEY = "bgtasks.runner"
# What is kept of a refused request's path (an address that is too long, say): enough to see
# what it was, never more, so that junk cannot grow the registry.
MAX_RECORDED_PATH = 512


def recordable(path: str) -> str:
    """A request's path as every store can keep it, cut to MAX_RECORDED_PATH: a refused
    request's path may hold NUL, which PostgreSQL's text refuses, or bytes that are not UTF-8
    (lone surrogates), which neither store can encode. Those are kept as escapes."""
    cut = path[:MAX_RECORDED_PATH]
    return cut.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def request_id_from(scope: Scope) -> tuple[str, bool]:
    """The client's X-Request-ID when it is well formed, else a fresh one; and whether it is
    the client's."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _WELL_FORMED_ID.fullmatch(value):
                return bytes(value).decode(), True
            break
    return new_request_id(), False


class RegistryMiddleware:
    """Tag every response with X-Request-ID and record every request to a recorded endpoint
    (the seed's: `recorded` holds their route paths) that used the endpoint's method.

    When a request queued tasks and its response is a success, the response start waits for
    the registry to commit the tasks' intents: accepted work is durable before the client
    hears of it. If that commit fails, the client gets a 503 and no task runs.

    Request ids name one request each: an id a client chose that an accepted request already
    has is replaced by a fresh one, which the response carries.
    """

    def __init__(
        self, app: ASGIApp, registry: Registry, runner: TaskRunner, recorded: Set[str]
    ) -> None:
        self.app = app
        self.registry = registry
        self.runner = runner
        self.recorded = recorded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, from_client = request_id_from(scope)
        if scope["method"] in READ_METHODS:
            header = (REQUEST_ID_HEADER, request_id.encode())

            async def tag(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)

            await self.app(scope, receive, tag)
            return

        record = RequestRecord(
            request_id,
            scope["method"],
            recordable(scope["path"]),
            time.time(),
            id_from_client=from_client,
        )
        scope[SCOPE_KEY] = record
        scope[RUNNER_KEY] = self.runner
        refused = False
        recorded = False

        async def send_recorded(message: Message) -> None:
            nonlocal refused, recorded
            if message["type"] == "http.response.start":
                record.status_code = message["status"]
                recorded = self._recorded(scope)
                if record.tasks and record.status_code < 400:
                    try:
                        await self.registry.commit_intents(record)
                    except RegistryError as exc:
                        refused = True
                        record.tasks.clear()
                        record.status_code = 503
                        await _send_refusal(send, record.id, str(exc))
                        return
                    self.runner.accept(record)
                elif recorded and record.id_from_client:
                    await self._keep_ids_unique(record)
                message["headers"] = [
                    *message.get("headers", ()),
                    (REQUEST_ID_HEADER, record.id.encode()),
                ]
            elif refused:
                if not message.get("more_body", False):
                    record.response_sent_at = time.time()
                    self.registry.note_request(record)
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record.response_sent_at = time.time()
                if recorded or record.accepted:
                    self.registry.note_request(record)

        await self.app(scope, receive, send_recorded)

    def _recorded(self, scope: Scope) -> bool:
        """Whether the request reached a recorded endpoint with that endpoint's method: a
        404, a 405 or another route is not worth keeping."""
        route = scope.get("route")
        methods = getattr(route, "methods", None) or ()
        return getattr(route, "path", None) in self.recorded and scope["method"] in methods

    async def _keep_ids_unique(self, record: RequestRecord) -> None:
        """A request that queued nothing must not take an accepted request's id either."""
        try:
            taken = await self.registry.get_request(record.id)
        except RegistryError:
            return  # the note will not be recorded either
        if taken is not None and taken["tasks"]:
            record.rename(new_request_id())


async def _send_refusal(send: Send, request_id: str, reason: str) -> None:
    body: dict[str, Any] = {"detail": f"{reason}; nothing was queued, retry later"}
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (REQUEST_ID_HEADER, request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
