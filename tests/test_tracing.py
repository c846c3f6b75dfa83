"""OpenTelemetry traces (issue #17) against real servers: one server span and one span per
task attempt, linked; configured by OpenTelemetry's standard variables; and nothing of
OpenTelemetry loaded, or added to a request, when traces are off."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from server import tracing
from tests.helpers import LiveServer, ServerProcess, wait_until

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Servers started in this test export their spans here, as soon as each one ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "find_provider", lambda: (provider, True))
    yield exporter


def finished(exporter: InMemorySpanExporter, count: int) -> tuple[ReadableSpan, ...] | None:
    found = exporter.get_finished_spans()
    return found if len(found) >= count else None


def test_a_notification_is_one_server_span_and_two_linked_task_spans(
    start_server: Callable[..., LiveServer], spans: InMemorySpanExporter
) -> None:
    live = start_server(delay=0.2)
    response = httpx.post(
        f"{live.url}/send-notification/a@example.com",
        params={"q": "hi"},
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    found = wait_until(lambda: finished(spans, 3), timeout=10)
    assert len(found) == 3
    (server,) = [span for span in found if span.kind == SpanKind.SERVER]
    tasks = sorted(
        (span for span in found if span.kind == SpanKind.CONSUMER),
        key=lambda span: span.start_time or 0,
    )
    assert server.name == "POST /send-notification/{email}"
    attributes = dict(server.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/send-notification/{email}"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.path"] == "/send-notification/a@example.com"
    assert attributes["bgtasks.request.id"] == request_id
    # The server span continues the client's trace.
    assert server.parent is not None and server.parent.span_id == int(CLIENT_SPAN, 16)
    assert server.context.trace_id == int(CLIENT_TRACE, 16)

    def ended() -> dict[str, Any] | None:
        record: dict[str, Any] = httpx.get(f"{live.url}/requests/{request_id}").json()
        return record if all(task["finished_at"] for task in record["tasks"]) else None

    # A task's end shows once it is committed, in the group commit after its line's (rule 5).
    record = wait_until(ended, timeout=10)
    assert [span.name for span in tasks] == ["process log.txt", "process log.txt"]
    for span, task in zip(tasks, record["tasks"], strict=True):
        attributes = dict(span.attributes or {})
        assert attributes["messaging.system"] == "bgtasks"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == "log.txt"
        assert attributes["messaging.message.id"] == task["id"]
        assert attributes["bgtasks.request.id"] == request_id
        # Linked to the request's span, and its child: one trace for a request and its tasks.
        assert [link.context for link in span.links] == [server.context]
        assert span.parent is not None and span.parent.span_id == server.context.span_id
        assert span.context.trace_id == server.context.trace_id
        # From the task's start to its end, after the response's last byte.
        assert span.start_time == int(task["started_at"] * 1e9)
        assert span.end_time == int(task["finished_at"] * 1e9)
        assert (server.end_time or 0) <= span.start_time
        assert span.status.status_code == StatusCode.UNSET


def test_each_attempt_of_a_failing_task_is_a_span_that_says_why(
    start_server: Callable[..., LiveServer], spans: InMemorySpanExporter
) -> None:
    live = start_server(max_attempts=2, retry_base=0.01, retry_max=0.01)
    (live.data_dir / "README.md").mkdir()
    response = httpx.post(f"{live.url}/background_tasks", params={"framework": "x"})
    assert response.status_code == 200
    found = wait_until(lambda: finished(spans, 3), timeout=10)
    attempts = sorted(
        (span for span in found if span.kind == SpanKind.CONSUMER),
        key=lambda span: span.start_time or 0,
    )
    assert [dict(span.attributes or {})["bgtasks.task.attempt"] for span in attempts] == [1, 2]
    assert [dict(span.attributes or {})["bgtasks.task.status"] for span in attempts] == [
        "retrying",
        "failed",
    ]
    for span in attempts:
        assert span.name == "process README.md"
        assert span.status.status_code == StatusCode.ERROR
        assert "is a directory" in (span.status.description or "")


def test_a_refused_request_has_a_server_span_and_no_task_span(
    start_server: Callable[..., LiveServer], spans: InMemorySpanExporter
) -> None:
    live = start_server()
    response = httpx.post(f"{live.url}/send-notification/not-an-address")
    assert response.status_code == 422
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 200
    found = wait_until(lambda: finished(spans, 2), timeout=10)
    assert sorted(span.name for span in found) == [
        "GET /health",
        "POST /send-notification/{email}",
    ]
    assert all(span.kind == SpanKind.SERVER for span in found)


# -- the environment decides --------------------------------------------------------------

# In a fresh interpreter: serve one notification in-process with the given environment and
# print which OpenTelemetry modules the server loaded beyond those FastAPI itself imports.
PROBE = textwrap.dedent(
    """
    import json, sys, time
    import fastapi, httpx
    before = {m for m in sys.modules if m.startswith("opentelemetry")}
    from server.config import Settings
    from tests.helpers import serve_in_thread
    with serve_in_thread(Settings(data_dir=sys.argv[1], delay=0)) as live:
        url = live.url + "/send-notification/a@example.com"
        assert httpx.post(url, params={"q": "hi"}).status_code == 200
        while live.read("log.txt").count(b"\\n") < 2:
            time.sleep(0.01)
        stack = []
        layer = live.app.middleware_stack
        while layer is not None:
            stack.append(type(layer).__name__)
            layer = getattr(layer, "app", None)
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") and m not in before)
    print(json.dumps({"loaded": loaded, "stack": stack}))
    """
)


def probe(tmp_path: Path, env: dict[str, str], prelude: str = "") -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", prelude + PROBE, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    report["stderr"] = result.stderr
    return report


def clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def test_without_otel_variables_nothing_of_opentelemetry_is_loaded(tmp_path: Path) -> None:
    report = probe(tmp_path, clean_env())
    assert report["loaded"] == []
    assert "TracingMiddleware" not in report["stack"]


def test_otel_sdk_disabled_wins(tmp_path: Path) -> None:
    env = {**clean_env(), "OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    report = probe(tmp_path, env)
    assert report["loaded"] == []
    assert "TracingMiddleware" not in report["stack"]


# The extra not installed: its SDK cannot be imported.
WITHOUT_SDK = textwrap.dedent(
    """
    import importlib.abc, sys
    class NoSdk(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None
    sys.meta_path.insert(0, NoSdk())
    """
)


def test_otel_variables_without_the_extra_warn_and_serve_untraced(tmp_path: Path) -> None:
    env = {**clean_env(), "OTEL_TRACES_EXPORTER": "console"}
    report = probe(tmp_path, env, prelude=WITHOUT_SDK)
    assert "TracingMiddleware" not in report["stack"]
    assert not any(module.startswith("opentelemetry.sdk") for module in report["loaded"])
    assert (
        "OpenTelemetry's SDK is not installed (pip install 'bgtasks[otel]')" in (report["stderr"])
    )


def test_an_unknown_exporter_is_a_warning_not_a_failed_start(tmp_path: Path) -> None:
    env = {**clean_env(), "OTEL_TRACES_EXPORTER": "nosuch"}
    report = probe(tmp_path, env)
    assert "cannot use exporter 'nosuch'" in report["stderr"]
    assert "installed: " in report["stderr"]


# A process whose global tracer provider was set before bgtasks started (as
# `opentelemetry-instrument` does): FastAPI's own telemetry makes the request's span.
GLOBAL_PROVIDER = textwrap.dedent(
    """
    import json, sys, time
    import httpx
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    from server.config import Settings
    from tests.helpers import serve_in_thread
    with serve_in_thread(Settings(data_dir=sys.argv[1], delay=0)) as live:
        url = live.url + "/send-notification/a@example.com"
        assert httpx.post(url, params={"q": "hi"}).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sum(s.kind.name == "CONSUMER" for s in exporter.get_finished_spans()) == 2:
                break
            time.sleep(0.01)
    print(json.dumps([
        {
            "kind": span.kind.name,
            "scope": span.instrumentation_scope.name,
            "id": span.context.span_id,
            "parent": span.parent.span_id if span.parent else None,
            "links": [link.context.span_id for link in span.links],
        }
        for span in exporter.get_finished_spans()
    ]))
    """
)


def test_a_global_provider_is_used_and_an_existing_request_span_is_not_doubled(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    servers = [span for span in found if span["kind"] == "SERVER"]
    tasks = [span for span in found if span["kind"] == "CONSUMER"]
    assert len(servers) == 1, found  # FastAPI's, and no second one of bgtasks'
    assert len(tasks) == 2 and {span["scope"] for span in tasks} == {"bgtasks"}
    for task in tasks:
        assert task["parent"] == servers[0]["id"]
        assert task["links"] == [servers[0]["id"]]


def console_spans(log: str) -> list[dict[str, Any]]:
    """The spans OpenTelemetry's console exporter printed (indented JSON objects)."""
    decoder = json.JSONDecoder()
    found, position = [], 0
    while (start := log.find("{\n", position)) != -1:
        try:
            document, position = decoder.raw_decode(log, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        if isinstance(document, dict) and "context" in document:
            found.append(document)
    return found


def test_otel_variables_configure_the_exporter_and_the_service_name(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(
        delay=0.0,
        env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "bgtasks-test"},
    )
    response = httpx.post(f"{server.url}/send-notification/a@example.com", params={"q": "hi"})
    assert response.status_code == 200
    log = server.data_dir / "log.txt"
    wait_until(lambda: log.exists() and log.read_bytes().count(b"\n") == 2)
    assert server.stop() in (0, -15)  # the provider's shutdown exports what is left
    found = [
        span
        for span in console_spans(server.log())
        if span["attributes"].get("bgtasks.request.id") == response.headers["x-request-id"]
    ]
    (request,) = [span for span in found if span["kind"] == "SpanKind.SERVER"]
    tasks = [span for span in found if span["kind"] == "SpanKind.CONSUMER"]
    assert len(tasks) == 2
    assert request["resource"]["attributes"]["service.name"] == "bgtasks-test"
    for task in tasks:
        assert task["parent_id"] == request["context"]["span_id"]
        assert [link["context"]["span_id"] for link in task["links"]] == [
            request["context"]["span_id"]
        ]
