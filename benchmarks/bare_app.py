"""bgtasks' notification endpoint shape with no background work: its throughput baseline.

The service has no such route and the benchmark does not change the service, so this app
rebuilds the shape on the same stack: FastAPI, the same validators (`Email`, `Text` from
`server.validation`) and the same response model, with no BackgroundTasks, no registry and no
middleware. Like the reference's `/plain/{email}`, it takes q directly rather than through a
dependency: the seed's dependency exists to queue a task, so it counts as background work.
"""

from typing import Annotated

from fastapi import FastAPI, Path, Query
from pydantic import BaseModel

from server.validation import Email, Text

app = FastAPI()


class Message(BaseModel):
    message: str


@app.post("/send-notification/{email}", response_model=Message)
async def send_notification(
    email: Annotated[Email, Path()], q: Annotated[Text | None, Query()] = None
) -> dict[str, str]:
    """Validate like bgtasks' endpoint, queue nothing, answer with the same body."""
    return {"message": "Message sent"}


@app.get("/health")
async def health() -> dict[str, str]:
    """Readiness probe for bench.py."""
    return {"status": "ok"}
