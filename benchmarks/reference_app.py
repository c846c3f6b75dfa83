"""The seed's code exactly as FastAPI's tutorial writes it: the reference `bench.py` measures.

The app is `server/tutorial_app.py` (the one `bgtasks demo --crash` runs) with no delay:
`write_log` is a plain `def` (so each task runs in anyio's thread pool) and opens the file for
every line; `get_query` is the tutorial's sync dependency. `log.txt` lives in the directory
named by `BGTASKS_DATA_DIR` (never the project's files). Two routes the tutorial does not have
are added here: `GET /health` for readiness and `POST /plain/{email}`, the same shape and body
with no background work, as the throughput baseline on the same server.
"""

import os

from server.tutorial_app import create_app

_data_dir = os.environ.get("BGTASKS_DATA_DIR")
if not _data_dir:
    raise RuntimeError("set BGTASKS_DATA_DIR: the reference app writes log.txt only there")
LOG_PATH = os.path.join(_data_dir, "log.txt")

# Delay 0 whatever BGTASKS_DELAY says: the benchmark measures the tutorial's own cost.
app = create_app(LOG_PATH, delay=0.0)


@app.post("/plain/{email}")
async def plain(email: str, q: str | None = None) -> dict[str, str]:
    """The notification endpoint's shape and body, with no background work."""
    return {"message": "Message sent"}


@app.get("/health")
async def health() -> dict[str, str]:
    """Readiness probe for bench.py."""
    return {"status": "ok"}
