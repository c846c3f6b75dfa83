"""Pure ASGI middleware: request ids, the request record, and the group commit of intents
before the response's first byte leaves."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.records import RequestRecord
from server.registry import Registry, RegistryError
from server.runner import TaskRunner

REQUEST_ID_HEADER = b"x-request-id"
_WELL_FORMED_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SCOPE_KEY = "bgtasks.request"
RUNNER_KEY = "bgtasks.runner"


def new_request_id() -> str:
    """32 hex digits that sort by creation time (nanoseconds, then 64 random bits), so the
    registry's indexes grow at one end instead of being rewritten all over: random uuid4 keys
    cost ~35% more SQLite time per request."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID when it is well formed, else a fresh one."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _WELL_FORMED_ID.fullmatch(value):
                return bytes(value).decode()
            break
    return new_request_id()


class RegistryMiddleware:
    """Tag every response with X-Request-ID and record every non-read request.

    When a request queued tasks and its response is a success, the response start waits for
    the registry to commit the tasks' intents: accepted work is durable before the client
    hears of it. If that commit fails, the client gets a 503 and no task runs.
    """

    def __init__(self, app: ASGIApp, registry: Registry, runner: TaskRunner) -> None:
        self.app = app
        self.registry = registry
        self.runner = runner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        header = (REQUEST_ID_HEADER, request_id.encode())
        if scope["method"] in READ_METHODS:

            async def tag(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)

            await self.app(scope, receive, tag)
            return

        record = RequestRecord(request_id, scope["method"], scope["path"], time.time())
        scope[SCOPE_KEY] = record
        scope[RUNNER_KEY] = self.runner
        refused = False

        async def send_recorded(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start":
                record.status_code = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
                if record.tasks and record.status_code < 400:
                    try:
                        await self.registry.commit_intents(record)
                    except RegistryError as exc:
                        refused = True
                        record.tasks.clear()
                        record.status_code = 503
                        await _send_refusal(send, header, str(exc))
                        return
                    self.runner.accept(record)
            elif refused:
                if not message.get("more_body", False):
                    record.response_sent_at = time.time()
                    self.registry.note_request(record)
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record.response_sent_at = time.time()
                self.registry.note_request(record)

        await self.app(scope, receive, send_recorded)


async def _send_refusal(send: Send, header: tuple[bytes, bytes], reason: str) -> None:
    body: dict[str, Any] = {"detail": f"{reason}; nothing was queued, retry later"}
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                header,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
