"""The seed's code as FastAPI's tutorial writes it: plain `BackgroundTasks`, no registry.

`bgtasks demo --crash` runs it beside bgtasks to show what a `kill -9` does to its work, and
`benchmarks/reference_app.py` measures it. The body of `create_app` is the tutorial's code with
two changes only: `log.txt` lives where it is told (never the current directory), and the sync
`write_log` sleeps `delay` seconds before it writes, the same simulated slow mail bgtasks has.

Never imported by the CLI: it runs in its own process, under
`python -m uvicorn --factory server.tutorial_app:app_from_env`.
"""

# The tutorial's functions are kept as it writes them, without annotations: a return
# annotation on the endpoint would make FastAPI validate the response through a model.
# mypy: allow-untyped-defs, allow-incomplete-defs

import math
import os
import time

from fastapi import BackgroundTasks, Depends, FastAPI


def create_app(log_path: str, delay: float = 0.0) -> FastAPI:
    """The tutorial's app, appending to `log_path` after sleeping `delay` seconds per line."""
    app = FastAPI()

    def write_log(message: str):
        time.sleep(delay)
        with open(log_path, mode="a") as log:
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

    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory: `log.txt` in `$BGTASKS_DATA_DIR`, `$BGTASKS_DELAY` seconds per line
    (default 0)."""
    data_dir = os.environ.get("BGTASKS_DATA_DIR")
    if not data_dir:
        raise RuntimeError("set BGTASKS_DATA_DIR: the tutorial app writes log.txt only there")
    raw = os.environ.get("BGTASKS_DELAY", "0")
    try:
        delay = float(raw)
    except ValueError:
        delay = math.nan
    if not (math.isfinite(delay) and 0 <= delay <= 3600):
        raise RuntimeError(f"BGTASKS_DELAY must be seconds from 0 to 3600, not {raw!r}")
    return create_app(os.path.join(data_dir, "log.txt"), delay)
