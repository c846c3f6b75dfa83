"""HTTP routes: the seed's three endpoints and the registry's read API. Thin on purpose."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from server import __version__, lines
from server.middleware import RUNNER_KEY, SCOPE_KEY
from server.models import NOTIFICATION_SENT, Detail, Health, Message, RequestOut, TaskOut
from server.records import RequestRecord
from server.registry import Registry, RegistryError
from server.runner import TaskRunner
from server.status import TaskStatus
from server.validation import Email, Text, UndecodableError, decode_component, error, query_errors

README_QUEUED = "任务已在后台运行"
README_UPDATED = "README.md更新成功"
NO_QUERY = "q was not given: nothing was queued and README.md is unchanged"


class TaskQueue:
    """What an endpoint uses to queue a line: FastAPI's BackgroundTasks plus the registry."""

    def __init__(self, request: Request, background: BackgroundTasks) -> None:
        self._background = background
        scope = request.scope
        self._record: RequestRecord = scope[SCOPE_KEY]
        self._runner: TaskRunner = scope[RUNNER_KEY]

    def queue_line(self, target: tuple[str, str]) -> None:
        file, line = target
        if not self._record.tasks:
            self._background.add_task(self._runner.start, self._record)
        self._runner.new_task(self._record, file, line)


PATH_ERRORS_KEY = "bgtasks.path_errors"


class SeedRoute(APIRoute):
    """A seed endpoint's route: it reads its path and query parameters from the raw URL.

    Starlette routes on the percent-decoded path, so `%2F` in an address becomes a separator
    (a 404) and undecodable bytes become U+FFFD; of a repeated query parameter it keeps the
    last. This route splits the raw path at its own slashes, decodes each segment strictly
    (`decode_component`), and refuses what would be changed with a 422 naming the parameter
    and the rule, before the endpoint or its dependencies run: nothing is queued.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        parts = self.path_format.split("/")
        if any("{" in part and not _is_param(part) for part in parts):
            raise ValueError(f"{path}: a path parameter must be a whole segment")
        # Each segment: the name of its parameter, or None and the literal text.
        self._template = [
            (part[1:-1], b"") if _is_param(part) else (None, part.encode()) for part in parts
        ]

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        segments = _raw_segments(scope)
        if segments is None:
            return super().matches(scope)
        if len(segments) != len(self._template):
            return Match.NONE, {}
        params: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for (name, literal), raw in zip(self._template, segments, strict=True):
            if name is None:
                if raw != literal and _decoded(raw) != literal.decode():
                    return Match.NONE, {}
                continue
            if not raw:
                return Match.NONE, {}
            try:
                params[name] = decode_component(raw)
            except UndecodableError as exc:
                params[name] = sent = raw.decode("latin-1")
                errors.append(error(("path", name), exc.type, str(exc), sent))
        child: Scope = {
            "endpoint": self.endpoint,
            "path_params": {**scope.get("path_params", {}), **params},
            "route": self,
            PATH_ERRORS_KEY: errors,
        }
        if self.methods and scope["method"] not in self.methods:
            return Match.PARTIAL, child
        return Match.FULL, child

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        names = _query_names(self.dependant)

        async def strict(request: Request) -> Response:
            scope = request.scope
            errors = [*scope.get(PATH_ERRORS_KEY, ()), *query_errors(scope["query_string"], names)]
            if errors:
                raise RequestValidationError(errors)
            return await handle(request)

        return strict


def _is_param(part: str) -> bool:
    return part.startswith("{") and part.endswith("}") and part.count("{") == 1


def _decoded(raw: bytes) -> str | None:
    try:
        return decode_component(raw)
    except UndecodableError:
        return None


def _raw_segments(scope: Scope) -> list[bytes] | None:
    """The path as the client sent it, below the app's root path, split at its slashes; None
    when the server gives no raw path (it is optional in ASGI)."""
    raw: bytes | None = scope.get("raw_path") if scope["type"] == "http" else None
    if raw is None:
        return None
    root = scope.get("root_path", "").encode()
    if root and raw.startswith(root) and raw[len(root) : len(root) + 1] in (b"/", b""):
        raw = raw[len(root) :]
    # Starlette's redirect_slashes asks every route again with a slash added to or taken off
    # the decoded path only: do the same to the raw one, so `POST …/a@example.com/` still
    # redirects.
    slash = raw.endswith(b"/") or raw[-3:].upper() == b"%2F"
    if scope["path"].endswith("/") != slash:
        raw = raw.rstrip(b"/") if slash else raw + b"/"
    return raw.split(b"/")


def _query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters of an endpoint and of every dependency it has."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


async def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]
TEXT_RULES = (
    "1–500 characters, no control characters; percent-encoded UTF-8 (`+` is a space), "
    "given at most once."
)
EMAIL_RULES = (
    "An email address, written to log.txt exactly as sent: no surrounding whitespace, no "
    "display name. Percent-encode what a path segment cannot hold as is (`/` as `%2F`, `?` as "
    "`%3F`, `#` as `%23`, `%` as `%25`); the decoded address must be valid UTF-8."
)
QText = Annotated[Text | None, Query(description=TEXT_RULES, examples=["hello"])]

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
        TaskQueue(request, background_tasks).queue_line(lines.found_query(q))
    return q


async def continue_write_readme(
    request: Request, background_tasks: BackgroundTasks, q: QText = None
) -> str | None:
    """The seed's dependency: queue the intro paragraph when q is given."""
    if q:
        TaskQueue(request, background_tasks).queue_line(lines.intro_paragraph())
    return q


async def send_notification(
    email: Annotated[
        Email, Path(description=EMAIL_RULES, examples=["user@example.com", "a/b@example.com"])
    ],
    request: Request,
    background_tasks: BackgroundTasks,
    q: Annotated[str | None, Depends(get_query)],
) -> Any:
    """Queue `message to {email}` (after `found query: {q}` when q is given) for log.txt."""
    TaskQueue(request, background_tasks).queue_line(lines.message_to(email))
    return {"message": NOTIFICATION_SENT}


async def run_bg_task(
    framework: Annotated[Text, Query(description=TEXT_RULES, examples=["FastAPI"])],
    request: Request,
    background_tasks: BackgroundTasks,
) -> Any:
    """Queue `\\n## {framework} 框架精讲` for README.md."""
    TaskQueue(request, background_tasks).queue_line(lines.framework_heading(framework))
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
        health.owners = await registry.store.live_owners()
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
        app.router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=Message,
            responses=REFUSED,
            tags=["seed"],
            route_class_override=SeedRoute,
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
