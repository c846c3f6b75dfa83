"""OpenTelemetry traces, an optional extra: `pip install 'bgtasks[otel]'`.

On when OpenTelemetry's standard variables ask for traces (`OTEL_TRACES_EXPORTER` names an
exporter and `OTEL_SDK_DISABLED` is not true; the SDK reads the rest: `OTEL_SERVICE_NAME`,
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER`, ...), or when something in the process
already set a global tracer provider (`opentelemetry-instrument`, an app that embeds
bgtasks). Otherwise this module imports nothing of OpenTelemetry and adds nothing to a
request. The provider bgtasks makes is its own, not set globally: FastAPI's own telemetry
would otherwise add spans for each dependency, endpoint and serialization.

Spans: one SERVER span per HTTP request, after the HTTP conventions (`POST /background_tasks`,
continuing a `traceparent` the client sent), made by `TracingMiddleware` (one span and a few
attributes, where an instrumentation package wraps every send and receive in spans of their
own); if an instrumentation already opened the request's span, that one is used. One
CONSUMER span per task attempt (`process log.txt`), after the messaging conventions, from
when the task started to when it ended: a child of its request's span and linked to it (the
link is what the conventions ask for; the parent keeps a request and its tasks in one trace).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.middleware import SCOPE_KEY
from server.records import RequestRecord, TaskRecord
from server.status import TaskStatus

logger = logging.getLogger("bgtasks")

MESSAGING_SYSTEM = "bgtasks"
EXPORTERS_GROUP = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


def find_provider() -> tuple[Any, bool] | None:
    """The tracer provider to use and whether bgtasks made it (and so shuts it down); None
    when traces are off. A variable that cannot be used is a warning, and no traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if "opentelemetry.trace" in sys.modules:  # loaded already (FastAPI loads the API)
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return provider, False
    names = [name.strip() for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [name for name in names if name and name != "none"]
    if not names:
        return None
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning(
            "OTEL_TRACES_EXPORTER asks for traces, but OpenTelemetry's SDK is not installed"
            " (pip install 'bgtasks[otel]'): no traces"
        )
        return None
    provider = TracerProvider(resource=_resource())
    for name in names:
        try:
            exporter = _load_exporter(name)
        except Exception as exc:  # an exporter that cannot be made must not stop the server
            logger.warning("OTEL_TRACES_EXPORTER: cannot use exporter %r (%s)", name, exc)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, True


def _resource() -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "bgtasks"}))
    return resource


def _load_exporter(name: str) -> Any:
    """An exporter named as OTEL_TRACES_EXPORTER names them: `otlp` follows
    OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, http/protobuf unless it says grpc."""
    from importlib.metadata import entry_points

    if name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol.strip() not in _OTLP_BY_PROTOCOL:
            raise ValueError(f"unknown OTLP protocol {protocol!r}")
        name = _OTLP_BY_PROTOCOL[protocol.strip()]
    found = entry_points(group=EXPORTERS_GROUP, name=name)
    if not found:
        known = sorted(point.name for point in entry_points(group=EXPORTERS_GROUP))
        raise LookupError(f"not installed; installed: {', '.join(known) or 'none'}")
    return next(iter(found)).load()()


class Tracing:
    """Makes the spans, and is an `Observer` (server/observe.py) for the tasks' ones."""

    def __init__(self, provider: Any, *, owned: bool) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer("bgtasks", __version__)
        self._parents: dict[str, trace.SpanContext] = {}  # by task id, until the task ends

    @classmethod
    def from_env(cls) -> Tracing | None:
        """Tracing as the environment asks for it (see `find_provider`), or None."""
        found = find_provider()
        return None if found is None else cls(found[0], owned=found[1])

    def close(self) -> None:
        """Export what is left and stop, if the provider is bgtasks' own."""
        if self.owned:
            self.provider.shutdown()

    def responding(self, scope: Scope, span: Any, message: Message, *, ours: bool) -> None:
        """The response starts: name `ours` by its route and record its status; tag the span
        with the request id, and remember it as the parent of the request's accepted tasks."""
        from opentelemetry.trace import StatusCode

        if ours:
            status = message["status"]
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
                span.set_attribute("error.type", str(status))
            route = getattr(scope.get("route"), "path", None)
            if route is not None:
                span.set_attribute("http.route", route)
                span.update_name(f"{scope['method']} {route}")
        for name, value in message.get("headers", ()):
            if name == b"x-request-id":
                span.set_attribute("bgtasks.request.id", value.decode("latin-1"))
        record: RequestRecord | None = scope.get(SCOPE_KEY)
        if record is not None and record.accepted:
            context = span.get_span_context()
            for task in record.tasks:
                self._parents[task.id] = context

    # -- Observer ----------------------------------------------------------------------------

    def attempt_failed(self, task: TaskRecord) -> None:
        """One span for the attempt that failed and will be tried again."""
        self._attempt(task, self._parents.get(task.id), task.last_error, time.time())

    def ended(self, task: TaskRecord) -> None:
        """One span for the attempt that ended, from its start (or its queueing, if it never
        started) to its end."""
        error = (task.last_error or "failed") if task.status == TaskStatus.FAILED else None
        finished = task.finished_at if task.finished_at is not None else time.time()
        self._attempt(task, self._parents.pop(task.id, None), error, finished)

    def _attempt(self, task: TaskRecord, parent: Any, error: str | None, finished: float) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import Link, SpanKind, StatusCode

        # An explicit context: the loop's current one may belong to whichever request
        # scheduled the group commit that ended this task.
        within = context.Context()
        links: list[Link] = []
        if parent is not None:
            within = trace.set_span_in_context(trace.NonRecordingSpan(parent), within)
            links.append(Link(parent))
        started = task.started_at if task.started_at is not None else task.queued_at
        span = self.tracer.start_span(
            f"process {task.file}",
            context=within,
            kind=SpanKind.CONSUMER,
            links=links,
            start_time=_ns(started),
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": task.file,
                "messaging.message.id": task.id,
                "bgtasks.request.id": task.request_id,
                "bgtasks.task.status": str(task.status),
                "bgtasks.task.attempt": task.attempts,
            },
        )
        if error is not None:
            span.set_status(StatusCode.ERROR, error)
            span.set_attribute("error.type", error.split(":", 1)[0])
        span.end(end_time=_ns(finished))

    def accepted(self, request: RequestRecord) -> None:
        pass  # its span is remembered as the response starts (`responding`)

    def adopted(self, tasks: Sequence[TaskRecord]) -> None:
        pass

    def committed(self, seconds: float, size: int) -> None:
        pass

    def recovered(self, finished: Sequence[TaskRecord], adopted: Sequence[TaskRecord]) -> None:
        pass


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class TracingMiddleware:
    """A SERVER span for every HTTP request, ended when its response's last byte is sent."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, StatusCode

        tracing = self.tracing
        current = trace.get_current_span()
        ours = not current.is_recording()  # else an instrumentation made the request's span
        if ours:
            carrier = {
                name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
            }
            span = tracing.tracer.start_span(
                scope["method"],
                context=propagate.extract(carrier),
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": scope["method"],
                    "url.path": scope["path"],
                    "url.scheme": scope.get("scheme", "http"),
                    "network.protocol.version": scope.get("http_version", "1.1"),
                },
            )
        else:
            span = current
        ended = False

        async def traced_send(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                tracing.responding(scope, span, message, ours=ours)
            await send(message)
            if (
                ours
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                ended = True
                span.end()

        try:
            await self.app(scope, receive, traced_send)
        except BaseException as exc:
            if ours:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            if ours and not ended:
                span.end()
