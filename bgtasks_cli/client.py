"""A thin client for the bgtasks HTTP API. Raises `BgtasksError`s, never prints."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bgtasks_cli.errors import BgtasksError, InvalidInput, ServerUnreachable
from server.status import ENDED, SUCCEEDED

# httpx's __init__ imports its own command line (click, rich, pygments) whenever click is
# installed, and uvicorn installs it: 80-130 ms of every `bgtasks notify` spent on code this
# process never runs. A None entry makes that optional import fail fast, as it would without
# click; httpx keeps working (upstream makes the import lazy: pydantic/httpx2#947).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
import httpx  # noqa: E402

START_HINT = "start it with `bgtasks serve`, or point --url / BGTASKS_URL at a running server"


@dataclass(slots=True)
class Fired:
    """A request as the client saw it: client-side times are Unix seconds."""

    method: str
    path: str
    url: str
    status: int
    body: Any
    request_id: str
    sent_at: float
    received_at: float

    @property
    def elapsed_ms(self) -> float:
        return (self.received_at - self.sent_at) * 1000


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


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', [])[1:]) or 'input'}: {err.get('msg')}"
            for err in detail
        )
    return str(detail)


class Client:
    """Calls the service at `base_url`; pass `transport` to test without a socket."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Loading the CA bundle costs ~90 ms of start-up; plain-http URLs never use it.
        verify = self.base_url.startswith("https:")
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return self._http.request(method, path, params=params)
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"no bgtasks server answers at {self.base_url} ({type(exc).__name__})", START_HINT
            ) from None

    def fire(self, path: str, params: dict[str, Any] | None = None) -> Fired:
        """POST to a seed endpoint. Raises InvalidInput on a 422, BgtasksError on other errors."""
        sent = time.time()
        response = self._call("POST", path, params)
        received = time.time()
        if response.status_code == 422:
            raise InvalidInput(
                f"the server refused the input: {_detail(response)}",
                "see `bgtasks COMMAND --help` for what each argument accepts",
            )
        if response.status_code >= 400:
            raise BgtasksError(
                f"{response.status_code} {response.reason_phrase}: {_detail(response)}"
            )
        return Fired(
            method="POST",
            path=path,
            url=str(response.url),
            status=response.status_code,
            body=response.json(),
            request_id=response.headers.get("x-request-id", ""),
            sent_at=sent,
            received_at=received,
        )

    def _get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        response = self._call("GET", path, params)
        if response.status_code >= 400:
            raise BgtasksError(
                f"GET {path}: {response.status_code} {response.reason_phrase}: {_detail(response)}"
            )
        return response.json()

    def request_record(self, request_id: str) -> dict[str, Any]:
        record: dict[str, Any] = self._get_json(f"/requests/{request_id}")
        return record

    def tasks(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        tasks: list[dict[str, Any]] = self._get_json("/tasks", params)
        return tasks

    def health(self) -> dict[str, Any]:
        health: dict[str, Any] = self._get_json("/health")
        return health

    def follow(
        self, fired: Fired, *, timeout: float, poll: float = 0.05
    ) -> Iterator[dict[str, Any]]:
        """Yield the request's record each time it changes, until its tasks all ended and its
        response time is recorded, or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            try:
                record = self.request_record(fired.request_id)
            except ServerUnreachable:
                raise
            except BgtasksError:
                record = {"id": fired.request_id, "tasks": []}  # not recorded yet (404)
            if record != last:
                last = record
                yield record
            tasks = record.get("tasks", [])
            if record.get("response_sent_at") and all(t["status"] in ENDED for t in tasks):
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(poll)

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
