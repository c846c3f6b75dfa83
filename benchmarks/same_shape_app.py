"""bgtasks' own app plus `POST /plain/{email}?q=`: the notification endpoint's shape (the same
route class, `SeedRoute`, the same validators, the same dependency taking q, the same body) with
no background work, on the same server, behind the same middleware. Measure 2 divides notify's
req/s by this route's, so the ratio is the cost of the background work itself: BackgroundTasks,
the registry and the writes.

The app is built by the factory `bgtasks serve` runs (`bgtasks_cli.served`), so it is served
as users run it: its GC frozen and its threshold raised once start-up is done.
"""

from typing import Annotated

from fastapi import Depends, FastAPI, Path

from bgtasks_cli.served import create_served_app
from server.models import NOTIFICATION_SENT, Message
from server.routes import QText, SeedRoute
from server.validation import Email


async def get_query(q: QText = None) -> str | None:
    """The seed's dependency without its task."""
    return q


async def plain(
    email: Annotated[Email, Path()], q: Annotated[str | None, Depends(get_query)]
) -> dict[str, str]:
    return {"message": NOTIFICATION_SENT}


def create_bench_app() -> FastAPI:
    app = create_served_app()
    # The seed's route class too: it reads the path and query from the raw URL, as notify's does.
    app.router.add_api_route(
        "/plain/{email}",
        plain,
        methods=["POST"],
        response_model=Message,
        route_class_override=SeedRoute,
    )
    app.state.recorded_paths.add("/plain/{email}")  # recorded like the seed's endpoints
    # Routing tries routes in order (a few µs each): put /plain just ahead of the service's
    # routes, which start with /send-notification/{email}, so if anything the baseline is
    # found sooner. Only FastAPI's own documentation routes come before them.
    docs = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url}
    routes = app.router.routes
    plain_route = routes.pop()
    first = next(i for i, r in enumerate(routes) if getattr(r, "path", None) not in docs)
    routes.insert(first, plain_route)
    return app
