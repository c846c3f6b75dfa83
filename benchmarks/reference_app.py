"""The seed's code exactly as FastAPI's tutorial writes it: the reference `bench.py` measures.

`write_log` is a plain `def` (so each task runs in anyio's thread pool) and opens the file for
every line; `get_query` is the tutorial's sync dependency. The only changes: `log.txt` lives in
the directory named by `BGTASKS_DATA_DIR` (never the project's files), and two routes the
tutorial does not have: `GET /health` for readiness and `POST /plain/{email}`, the same shape
and body with no background work, as the throughput baseline on the same server.
"""

import os

from fastapi import BackgroundTasks, Depends, FastAPI

_data_dir = os.environ.get("BGTASKS_DATA_DIR")
if not _data_dir:
    raise RuntimeError("set BGTASKS_DATA_DIR: the reference app writes log.txt only there")
LOG_PATH = os.path.join(_data_dir, "log.txt")

app = FastAPI()


def write_log(message: str):
    with open(LOG_PATH, mode="a") as log:
        log.write(message)


def get_query(background_tasks: BackgroundTasks, q: str | None = None):
    if q:
        message = f"found query: {q}\n"
        background_tasks.add_task(write_log, message)
    return q


@app.post("/send-notification/{email}")
async def send_notification(
    email: str, background_tasks: BackgroundTasks, q: str = Depends(get_query)
):
    message = f"message to {email}\n"
    background_tasks.add_task(write_log, message)
    return {"message": "Message sent"}


@app.post("/plain/{email}")
async def plain(email: str, q: str | None = None) -> dict[str, str]:
    """The notification endpoint's shape and body, with no background work."""
    return {"message": "Message sent"}


@app.get("/health")
async def health() -> dict[str, str]:
    """Readiness probe for bench.py."""
    return {"status": "ok"}
