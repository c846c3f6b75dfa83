"""bgtasks' own app plus `POST /plain/{email}?q=`: the notification endpoint's shape (the same
validators, the same dependency taking q, the same body) with no background work, on the same
server, behind the same middleware. Measure 2 divides notify's req/s by this route's, so the
ratio is the cost of the background work itself: BackgroundTasks, the registry and the writes.
"""

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path

from server import routes
from server.app import create_app
from server.routes import NOTIFICATION_SENT, Message, QText
from server.validation import Email


async def get_query(q: QText = None) -> str | None:
    """The seed's dependency without its task."""
    return q


async def plain(
    email: Annotated[Email, Path()], q: Annotated[str | None, Depends(get_query)]
) -> Any:
    return {"message": NOTIFICATION_SENT}


def create_bench_app() -> FastAPI:
    app = create_app()
    # Served by the service's own router, just ahead of /send-notification/{email}: routing
    # tries routes in order (a few µs each), so the baseline is, if anything, found sooner.
    routes.router.add_api_route("/plain/{email}", plain, methods=["POST"], response_model=Message)
    routes.router.routes.insert(0, routes.router.routes.pop())
    return app
