"""The routes that change the registry on an operator's word: retry a failed task, cancel an
unfinished one, write here what a lost host had claimed. They answer only requests from this
machine (loopback) or that carry the bearer token `BGTASKS_ADMIN_TOKEN`: anything else gets a
403."""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Request

from server.models import Detail, TaskOut
from server.records import TaskRecord
from server.registry import Registry
from server.registry.registry import OwnerAlive
from server.runner import TaskRunner
from server.status import ENDED

TaskId = Annotated[str, Path(max_length=200, examples=["3f2a9c1b-7"])]
OwnerId = Annotated[str, Path(pattern=r"^[0-9a-f]{8}$", examples=["3f2a9c1b"])]


def require_operator(request: Request) -> None:
    """Loopback, or the bearer token: else a 403 that says which."""
    client = request.client.host if request.client else ""
    try:
        if ipaddress.ip_address(client).is_loopback:
            return
    except ValueError:
        pass  # a unix socket or a test client: not known to be this machine
    token = request.app.state.settings.admin_token
    given = request.headers.get("authorization", "")
    if token is not None and hmac.compare_digest(given, f"Bearer {token.get_secret_value()}"):
        return
    raise HTTPException(
        403,
        "retrying and cancelling tasks is for requests from this machine, or with"
        " `Authorization: Bearer <BGTASKS_ADMIN_TOKEN>`",
    )


Operator = Depends(require_operator)


def _state(request: Request) -> tuple[Registry, TaskRunner]:
    return request.app.state.registry, request.app.state.runner


async def _found(registry: Registry, task_id: str) -> dict[str, Any]:
    task = await registry.get_task(task_id)
    if task is None:
        raise HTTPException(404, f"no task {task_id!r} in the registry")
    return task


async def retry_task(task_id: TaskId, request: Request) -> Any:
    """Give a failed task a fresh set of attempts: this server runs it again."""
    registry, runner = _state(request)
    task = await registry.requeue(task_id)
    if task is None:
        found = await _found(registry, task_id)
        raise HTTPException(
            409, f"task {task_id} is {found['status']}: only a failed task can be retried"
        )
    runner.adopt([task])
    return await _found(registry, task_id)


async def cancel_task(task_id: TaskId, request: Request) -> Any:
    """Cancel a task that is queued, asleep in its delay or retrying: it is never written."""
    registry, runner = _state(request)
    if await registry.cancel(task_id, time.time()):
        runner.forget(task_id)
        return await _found(registry, task_id)
    found = await _found(registry, task_id)
    if found["status"] in ENDED:
        reason = f"it is already {found['status']}"
    else:
        reason = "its line is being written at this moment"
    raise HTTPException(409, f"task {task_id} cannot be cancelled: {reason}")


async def get_owner(owner: OwnerId, request: Request) -> Any:
    """A server process known to the registry (by its owner id): where it ran, whether it is
    alive, and the lines it claimed in a data directory other than this server's, which wait
    for that directory to come back."""
    registry, _ = _state(request)
    known, waiting = await registry.lost_lines(owner)
    if known is None and not waiting:
        raise HTTPException(404, f"no owner {owner!r} in the registry")
    return {
        **(known or {"owner": owner}),
        "alive": await registry.is_alive(owner),
        "waiting": [_line(task) for task in waiting],
    }


async def rewrite_lost_lines(owner: OwnerId, request: Request) -> Any:
    """For a host gone for good: write here the lines this dead owner claimed in its own data
    directory. They may be there already, in that lost directory: this can write a line
    twice, which is why it needs an operator's word."""
    registry, _ = _state(request)
    try:
        written = await registry.rewrite_lost_lines(owner)
    except OwnerAlive as exc:
        raise HTTPException(409, str(exc)) from None
    return {
        "owner": owner,
        "rewritten": [_line(task) for task in written],
        "warning": "these lines may also be in the lost data directory: each may be there twice",
    }


def _line(task: TaskRecord) -> dict[str, Any]:
    return {"id": task.id, "request_id": task.request_id, "file": task.file, "line": task.line}


def add_operator_routes(app: FastAPI) -> None:
    refused: dict[int | str, dict[str, Any]] = {
        403: {"model": Detail, "description": "Not from loopback, and no valid token."},
        404: {"model": Detail, "description": "No such task in the registry."},
        409: {"model": Detail, "description": "The task is not in a state that allows it."},
    }
    for path, endpoint in (
        ("/tasks/{task_id}/retry", retry_task),
        ("/tasks/{task_id}/cancel", cancel_task),
    ):
        app.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=TaskOut,
            responses=refused,
            dependencies=[Operator],
            tags=["operators"],
        )
    app.add_api_route(
        "/owners/{owner}", get_owner, methods=["GET"], responses=refused, tags=["operators"]
    )
    app.add_api_route(
        "/owners/{owner}/rewrite",
        rewrite_lost_lines,
        methods=["POST"],
        responses=refused,
        dependencies=[Operator],
        tags=["operators"],
    )
