"""The service's logs: uvicorn's readable lines by default, or one JSON object per line
(`serve --log-format json`) for log shippers.

A JSON line has `ts` (RFC 3339, UTC), `level`, `event` (the message), `logger` and `pid`,
then what the line is about: `request_id` and `task_id` where they are known, and for an
access line `method`, `path`, `status` and `client`; `exception` holds a traceback.
"""

from __future__ import annotations

import contextvars
import copy
import logging
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LogFormat = Literal["text", "json"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bgtasks_request_id", default=None
)
"""The id of the request whose response is starting, for uvicorn's access line."""

_FIRST = ("ts", "level", "event", "logger", "pid", "request_id", "task_id")
# uvicorn's access lines: client address, method, path with query, HTTP version, status.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


def log_config(log_format: LogFormat) -> dict[str, Any]:
    """uvicorn's logging configuration in that format, with the service's own `bgtasks`
    logger on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["bgtasks"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    if log_format == "json":
        for name in config["formatters"]:
            config["formatters"][name] = {"()": f"{__name__}.JsonFormatter"}
    return config


class JsonFormatter(_JsonFormatter):
    """One JSON object per record, its fields named as the module says."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "message", "name", "process"],
            rename_fields={
                "levelname": "level",
                "message": "event",
                "name": "logger",
                "process": "pid",
                "exc_info": "exception",
            },
            timestamp="ts",
            json_ensure_ascii=False,
            # uvicorn's colour copy of its message is for terminals only.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["level"] = record.levelname.lower()
        if "request_id" not in log_data:
            request_id = REQUEST_ID.get()
            if request_id is not None:
                log_data["request_id"] = request_id
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            log_data.update(zip(_ACCESS_FIELDS, args, strict=True))

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        first = {key: log_data.pop(key) for key in _FIRST if key in log_data}
        return {**first, **log_data}


class RequestIdMiddleware:
    """Make the response's X-Request-ID the request id of the lines logged while its start is
    sent: uvicorn's access line. Installed only for JSON logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] != "http.response.start":
                await send(message)
                return
            request_id = next(
                (value for name, value in message.get("headers", ()) if name == b"x-request-id"),
                None,
            )
            # Only for as long as the start is sent: a timer or task made after it (the group
            # commit's) would carry the id into lines about other requests.
            token = REQUEST_ID.set(None if request_id is None else request_id.decode("latin-1"))
            try:
                await send(message)
            finally:
                REQUEST_ID.reset(token)

        await self.app(scope, receive, send_with_id)
