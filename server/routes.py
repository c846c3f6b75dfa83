"""HTTP routes: the seed's three endpoints and the registry's read API. Thin on purpose."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from server import __version__, lines
from server.middleware import RUNNER_KEY, SCOPE_KEY
from server.records import RequestRecord
from server.registry import Registry, RegistryError
from server.runner import TaskRunner
from server.status import TaskStatus
from server.validation import Email, Text

NOTIFICATION_SENT = "Message sent"
README_QUEUED = "任务已在后台运行"
README_UPDATED = "README.md更新成功"
NO_QUERY = "q was not given: nothing was queued and README.md is unchanged"


class Message(BaseModel):
    message: str = Field(examples=[NOTIFICATION_SENT])


class Detail(BaseModel):
    detail: str


class TaskOut(BaseModel):
    id: str = Field(examples=["3f2a9c1b-7"])
    request_id: str
    seq: int = Field(description="Position among the request's tasks; they run in this order.")
    file: str = Field(examples=["log.txt"])
    line: str = Field(examples=["message to user@example.com\n"])
    status: TaskStatus
    queued_at: float = Field(description="Unix time, seconds.")
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None


class RequestOut(BaseModel):
    id: str
    method: str | None = None
    path: str | None = None
    received_at: float | None = None
    response_sent_at: float | None = Field(
        None, description="When the response's last byte was handed to the server."
    )
    status_code: int | None = None
    tasks: list[TaskOut]


class Health(BaseModel):
    status: Literal["ok", "unavailable"] = "ok"
    version: str = Field(examples=[__version__])
    store: str = Field(examples=["sqlite"], description="Where the registry is kept.")
    data_dir: str
    delay: float
    unfinished_tasks: int | None = Field(None, description="None while the registry is unusable.")
    pid: int
    error: str | None = Field(None, description="Why the registry is unusable, if it is.")


class TaskQueue:
    """What an endpoint uses to queue a line: FastAPI's BackgroundTasks plus the registry."""

    def __init__(self, request: Request, background: BackgroundTasks) -> None:
        self._background = background
        scope = request.scope
        self._record: RequestRecord = scope[SCOPE_KEY]
        self._runner: TaskRunner = scope[RUNNER_KEY]

    def append_line(self, target: tuple[str, str]) -> None:
        file, line = target
        if not self._record.tasks:
            self._background.add_task(self._runner.start, self._record)
        self._runner.new_task(self._record, file, line)


async def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]
QText = Annotated[
    Text | None,
    Query(description="1–500 characters, no control characters.", examples=["hello"]),
]

REFUSED: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Detail,
        "description": "The task registry could not record the work: nothing was queued.",
    }
}


# The endpoints and dependencies take `BackgroundTasks` (and the `Request`) as the seed does,
# rather than a `Depends(TaskQueue)`: every sub-dependency costs FastAPI ~10 µs per request.


async def get_query(
    request: Request, background_tasks: BackgroundTasks, q: QText = None
) -> str | None:
    """The seed's dependency: queue `found query: {q}` before the endpoint's own task."""
    if q:
        TaskQueue(request, background_tasks).append_line(lines.found_query(q))
    return q


async def continue_write_readme(
    request: Request, background_tasks: BackgroundTasks, q: QText = None
) -> str | None:
    """The seed's dependency: queue the intro paragraph when q is given."""
    if q:
        TaskQueue(request, background_tasks).append_line(lines.intro_paragraph())
    return q


async def send_notification(
    email: Annotated[Email, Path(examples=["user@example.com"])],
    request: Request,
    background_tasks: BackgroundTasks,
    q: Annotated[str | None, Depends(get_query)],
) -> Any:
    """Queue `message to {email}` (after `found query: {q}` when q is given) for log.txt."""
    TaskQueue(request, background_tasks).append_line(lines.message_to(email))
    return {"message": NOTIFICATION_SENT}


async def run_bg_task(
    framework: Annotated[
        Text, Query(description="1–500 characters, no control characters.", examples=["FastAPI"])
    ],
    request: Request,
    background_tasks: BackgroundTasks,
) -> Any:
    """Queue `\\n## {framework} 框架精讲` for README.md."""
    TaskQueue(request, background_tasks).append_line(lines.framework_heading(framework))
    return {"message": README_QUEUED}


async def dependency_run_bg_task(
    q: Annotated[str | None, Depends(continue_write_readme)],
) -> Any:
    """Queue the intro paragraph for README.md when q is given; without q nothing is queued."""
    return {"message": README_UPDATED if q else NO_QUERY}


async def get_request(
    request_id: Annotated[str, Path(max_length=128)], registry: RegistryDep
) -> Any:
    """A request with its tasks and their times."""
    found = await registry.get_request(request_id)
    if found is None:
        raise HTTPException(404, f"no request {request_id!r} in the registry")
    return found


async def list_tasks(
    registry: RegistryDep,
    status: TaskStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Any:
    """Recent tasks, newest first."""
    return await registry.list_tasks(status, limit)


async def health(request: Request, registry: RegistryDep) -> Any:
    """Liveness, version, store, data directory and the number of unfinished tasks; a 503
    naming the fault while the registry cannot record work."""
    settings = request.app.state.settings
    health = Health(
        version=__version__,
        store=registry.store.name,
        data_dir=str(settings.data_dir),
        delay=settings.delay,
        pid=os.getpid(),
    )
    try:
        health.unfinished_tasks = await registry.count_unfinished()
    except RegistryError as exc:
        health.status, health.error = "unavailable", str(exc)
        return JSONResponse(health.model_dump(), status_code=503)
    return health


def metrics(request: Request) -> Response:
    """The service's metrics in Prometheus' text format (OpenMetrics when the scraper asks
    for it), summed over every worker; a 404 when metrics are off (BGTASKS_METRICS=0)."""
    kept = request.app.state.metrics
    if kept is None:
        raise HTTPException(404, "metrics are off (BGTASKS_METRICS=0)")
    body, media_type = kept.render(request.headers.get("accept"))
    return Response(body, media_type=media_type)


async def registry_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A read the registry could not answer: a 503 that says why, not a 500."""
    return JSONResponse({"detail": str(exc)}, status_code=503)


def add_routes(app: FastAPI) -> set[str]:
    """Register the endpoints on the app itself (an included `APIRouter` stays a node of its
    own that routes every request again). Returns the seed endpoints' paths."""
    seed = (
        ("/send-notification/{email}", send_notification),
        ("/background_tasks", run_bg_task),
        ("/dependency/background_tasks", dependency_run_bg_task),
    )
    for path, endpoint in seed:
        app.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=Message,
            responses=REFUSED,
            tags=["seed"],
        )
    app.add_api_route(
        "/requests/{request_id}",
        get_request,
        methods=["GET"],
        response_model=RequestOut,
        responses={404: {"model": Detail, "description": "No such request in the registry."}},
        tags=["registry"],
    )
    app.add_api_route(
        "/tasks", list_tasks, methods=["GET"], response_model=list[TaskOut], tags=["registry"]
    )
    app.add_api_route(
        "/health",
        health,
        methods=["GET"],
        response_model=Health,
        responses={503: {"model": Health, "description": "The registry cannot record work."}},
        tags=["registry"],
    )
    # A plain `def`: FastAPI runs it in a thread, since it reads every worker's files.
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus' text format, or OpenMetrics.",
                "content": {"text/plain": {}, "application/openmetrics-text": {}},
            },
            404: {"model": Detail, "description": "Metrics are off."},
        },
        tags=["observability"],
    )
    app.add_exception_handler(RegistryError, registry_unavailable)
    return {path for path, _ in seed}
