"""A thin client for the bgtasks HTTP API. Raises `BgtasksError`s, never prints."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

from bgtasks_cli.errors import (
    BgtasksError,
    InvalidInput,
    Refused,
    ServerUnreachable,
    WrongServer,
)
from server.status import ENDED, SUCCEEDED, TaskStatus

if TYPE_CHECKING:
    from bgtasks_cli.sse import EventStream

# httpx's __init__ imports its own command line (click, rich, pygments) whenever click is
# installed, and uvicorn installs it: 80-130 ms of every `bgtasks notify` spent on code this
# process never runs. A None entry makes that optional import fail fast, as it would without
# click; httpx keeps working (upstream makes the import lazy: pydantic/httpx2#947).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
import httpx  # noqa: E402

from bgtasks_cli.urls import check_url  # noqa: E402  (it imports httpx)

START_HINT = "start it with `bgtasks serve`, or point --url / BGTASKS_URL at a running server"
WRONG_SERVER_HINT = (
    "is --url / BGTASKS_URL the address `bgtasks serve` printed? start one with `bgtasks serve`"
)
TOKEN_HINT = (
    "from another machine, set BGTASKS_ADMIN_TOKEN (or --token) to the server's"
    " BGTASKS_ADMIN_TOKEN; from the server's own machine, use a loopback --url"
)
REQUEST_ID_HEADER = "x-request-id"
# What every task in a bgtasks response carries (the renderers rely on these).
TASK_KEYS = frozenset({"id", "request_id", "seq", "file", "line", "status", "queued_at"})
_STATUSES = frozenset(TaskStatus)
_NOT_JSON = object()


@dataclass(slots=True)
class Fired:
    """A request as the client saw it: client-side times are Unix seconds."""

    method: str
    path: str
    url: str
    status: int
    body: Any
    request_id: str
    client_sent_at: float
    client_received_at: float

    @property
    def elapsed_ms(self) -> float:
        return (self.client_received_at - self.client_sent_at) * 1000


@dataclass(slots=True)
class Outcome:
    """A fired request with the server's record of it once its tasks ended (or time ran out)."""

    fired: Fired
    record: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False

    @property
    def tasks(self) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = self.record.get("tasks", [])
        return tasks

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(t["status"] in SUCCEEDED for t in self.tasks)


def _one_line(text: str, limit: int = 200) -> str:
    """`text` fit for one line of an error: control characters and runs of space collapsed."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _json_body(response: httpx.Response) -> Any:
    """The response's JSON document, or `_NOT_JSON` if it does not carry one."""
    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        return _NOT_JSON
    try:
        return response.json()
    except ValueError:
        return _NOT_JSON


def _detail(body: Any) -> str:
    """What a bgtasks error response says, in one line."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', [])[1:]) or 'input'}: {err.get('msg')}"
            for err in detail
            if isinstance(err, dict)
        )
    return _one_line(str(detail)) if detail else ""


def _is_task(task: Any) -> bool:
    if not isinstance(task, dict) or not task.keys() >= TASK_KEYS:
        return False
    return isinstance(task["status"], str) and task["status"] in _STATUSES


def _is_task_list(body: Any) -> bool:
    return isinstance(body, list) and all(_is_task(task) for task in body)


def _is_request(body: Any) -> bool:
    return isinstance(body, dict) and "id" in body and _is_task_list(body.get("tasks"))


def _is_lines(lines: Any) -> bool:
    return isinstance(lines, list) and all(
        isinstance(line, dict) and line.keys() >= {"id", "request_id", "file", "line"}
        for line in lines
    )


def _is_owner(body: Any) -> bool:
    return isinstance(body, dict) and "owner" in body and _is_lines(body.get("waiting"))


def _is_rewrite(body: Any) -> bool:
    return isinstance(body, dict) and "owner" in body and _is_lines(body.get("rewritten"))


def _is_message(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("message"), str)


class Client:
    """Calls the service at `base_url`; pass `transport` to test without a socket.

    Every answer is checked to be a bgtasks one (JSON, tagged with X-Request-ID, of the
    expected shape) before it is used: anything else raises `WrongServer`, never a parse error.
    `token` (the server's BGTASKS_ADMIN_TOKEN) goes with the calls that change the registry
    (`retry`, `cancel`) and no others.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._operator_headers = {"authorization": f"Bearer {token}"} if token else {}
        parsed = check_url(self.base_url)
        # Loading the CA bundle costs ~90 ms of start-up; plain-http URLs never use it.
        verify = parsed.scheme == "https"
        self._http = httpx.Client(
            base_url=parsed, timeout=timeout, transport=transport, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            return self._http.request(method, path, params=params, headers=headers)
        except UnicodeEncodeError:
            # Text with lone surrogates (bytes that were not UTF-8); the CLI refuses it first.
            raise InvalidInput(f"{method} {path}: the input is not UTF-8 text") from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"no bgtasks server answers at {self.base_url} ({type(exc).__name__})", START_HINT
            ) from None

    def _answer(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        shape: Callable[[Any], bool],
        missing_ok: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[httpx.Response, Any]:
        """Send one request and return its response with the JSON body it carries.

        A 5xx is the server failing (BgtasksError), except 501: that server does not do the
        method at all, which a bgtasks server never answers. Anything else that is not a
        bgtasks answer raises WrongServer; a 422 InvalidInput; other 4xx Refused. With
        `missing_ok`, a bgtasks 404 returns a body of None.
        """
        response = self._call(method, path, params, headers)
        status, body = response.status_code, _json_body(response)
        what = f"{method} {path}"
        if status >= 500 and status != 501:
            detail = _detail(body) or _one_line(response.reason_phrase)
            raise BgtasksError(
                f"{what}: the server failed: {status} {detail}",
                "the server's log says why; `bgtasks serve` checks its registry when it starts",
            )
        if body is _NOT_JSON or REQUEST_ID_HEADER not in response.headers:
            media = response.headers.get("content-type", "no content type").split(";")[0]
            raise WrongServer(
                f"{self.base_url} does not answer like a bgtasks server ({what} got "
                f"{status} {_one_line(response.reason_phrase, 60)}, {_one_line(media, 40)})",
                WRONG_SERVER_HINT,
            )
        if status == 404 and missing_ok:
            return response, None
        if status == 422:
            raise InvalidInput(
                f"the server refused the input: {_detail(body)}",
                "see `bgtasks COMMAND --help` for what each argument accepts",
            )
        if status >= 400:
            detail = _detail(body) or _one_line(response.reason_phrase)
            hint = TOKEN_HINT if status == 403 else None
            raise Refused(f"{what}: {status} {detail}", hint, status=status, reason=detail)
        if not 200 <= status < 300 or not shape(body):
            raise WrongServer(
                f"{self.base_url} does not answer like a bgtasks server ({what} got {status}"
                " with a JSON document that is not a bgtasks answer)",
                WRONG_SERVER_HINT,
            )
        return response, body

    def fire(self, path: str, params: dict[str, Any] | None = None) -> Fired:
        """POST to a seed endpoint. Raises InvalidInput on a 422, BgtasksError on other errors."""
        sent = time.time()
        response, body = self._answer("POST", path, params, shape=_is_message)
        received = time.time()
        return Fired(
            method="POST",
            path=path,
            url=str(response.url),
            status=response.status_code,
            body=body,
            request_id=response.headers[REQUEST_ID_HEADER],
            client_sent_at=sent,
            client_received_at=received,
        )

    def request_record(self, request_id: str) -> dict[str, Any] | None:
        """The registry's record of a request with its tasks; None if it has none (yet)."""
        _, record = self._answer(
            "GET", f"/requests/{request_id}", shape=_is_request, missing_ok=True
        )
        return cast("dict[str, Any] | None", record)

    def tasks(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        _, tasks = self._answer("GET", "/tasks", params, shape=_is_task_list)
        return cast("list[dict[str, Any]]", tasks)

    def retry(self, task_id: str) -> dict[str, Any]:
        """`POST /tasks/{id}/retry`: a failed task gets a fresh set of attempts. Raises Refused
        (the server's reason) for a task that is not failed (409), unknown (404) or not ours
        to change (403)."""
        return self._operate(task_id, "retry")

    def cancel(self, task_id: str) -> dict[str, Any]:
        """`POST /tasks/{id}/cancel`: an unfinished task whose line is not being written ends
        `cancelled`, never written. Raises Refused as `retry` does."""
        return self._operate(task_id, "cancel")

    def _operate(self, task_id: str, action: str) -> dict[str, Any]:
        path = f"/tasks/{quote(task_id, safe='')}/{action}"
        _, task = self._answer("POST", path, shape=_is_task, headers=self._operator_headers)
        return cast("dict[str, Any]", task)

    def owner(self, owner: str) -> dict[str, Any]:
        """`GET /owners/{id}`: a server process the registry knows (where it ran, whether it
        is alive) and the lines it claimed in another data directory. Refused (404) if none."""
        _, body = self._answer("GET", f"/owners/{quote(owner, safe='')}", shape=_is_owner)
        return cast("dict[str, Any]", body)

    def rewrite_owner(self, owner: str) -> dict[str, Any]:
        """`POST /owners/{id}/rewrite` (operators): write here the lines dead `owner` claimed
        in its lost data directory; they may now be in both. Refused (409) if it is alive."""
        path = f"/owners/{quote(owner, safe='')}/rewrite"
        _, body = self._answer("POST", path, shape=_is_rewrite, headers=self._operator_headers)
        return cast("dict[str, Any]", body)

    def health(self) -> dict[str, Any]:
        _, health = self._answer("GET", "/health", shape=lambda body: isinstance(body, dict))
        return cast("dict[str, Any]", health)

    def metrics(self) -> str:
        """The server's `/metrics`, every worker's, in Prometheus' text format. Raises
        BgtasksError if the server keeps none (or fails), WrongServer if it is not bgtasks."""
        response = self._call("GET", "/metrics")
        status, body = response.status_code, _json_body(response)
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        tagged = REQUEST_ID_HEADER in response.headers
        if status == 200 and media == "text/plain" and tagged:
            return response.text
        if status >= 500 and status != 501:
            detail = _detail(body) or _one_line(response.reason_phrase)
            raise BgtasksError(f"GET /metrics: the server failed: {status} {detail}")
        if status == 404 and tagged and body is not _NOT_JSON:
            raise BgtasksError(
                f"GET /metrics: 404 {_detail(body) or 'Not Found'}",
                "that server keeps no metrics: start it without BGTASKS_METRICS=0",
            )
        raise WrongServer(
            f"{self.base_url} does not answer like a bgtasks server (GET /metrics got "
            f"{status} {_one_line(response.reason_phrase, 60)}, {_one_line(media, 40)})",
            WRONG_SERVER_HINT,
        )

    def follow(
        self, fired: Fired, *, timeout: float, poll: float = 0.05
    ) -> Iterator[dict[str, Any]]:
        """Yield the request's record each time it changes, until its tasks all ended and its
        response time is recorded, or `timeout` seconds pass: looked up again on each of its
        events (bgtasks_cli.watching), or every `poll` s if the server has no event stream."""
        from bgtasks_cli.watching import follow

        return follow(self, fired, timeout=timeout, poll=poll)

    def events(self, request_id: str | None = None) -> EventStream:
        """The server's event stream (of one request), not yet opened."""
        from bgtasks_cli.sse import EventStream

        return EventStream(self._http, {"request_id": request_id} if request_id else None)

    def run(
        self,
        path: str,
        params: dict[str, Any] | None,
        *,
        wait: bool,
        timeout: float,
        on_update: Callable[[Fired, dict[str, Any]], None] | None = None,
        on_response: Callable[[Fired], None] | None = None,
    ) -> Outcome:
        """Fire a request and, if `wait`, follow its tasks to the end."""
        fired = self.fire(path, params)
        if on_response:
            on_response(fired)
        outcome = Outcome(fired)
        if not wait:
            return outcome
        for record in self.follow(fired, timeout=timeout):
            outcome.record = record
            if on_update:
                on_update(fired, record)
        tasks = outcome.tasks
        outcome.timed_out = not outcome.record.get("response_sent_at") or any(
            t["status"] not in ENDED for t in tasks
        )
        return outcome
