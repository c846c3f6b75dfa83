"""CPU instructions per request of one route, counted by valgrind: a cost that does not move
from run to run, for deciding whether a change helps on a machine whose timings move ±25%.

Run from the repository root:

    python benchmarks/instructions.py                  # notify and its baseline, 2,000 each
    python benchmarks/instructions.py --route plain --requests 500
    python benchmarks/instructions.py --in-process --requests 50   # no valgrind: just drive it

The app (`same_shape_app.py`: bgtasks plus `/plain/{email}`) is driven in-process through
ASGI, 50 requests at a time, with no sockets or HTTP parser, on a fresh data directory with
delay 0 and retention 1,000 (so prunes happen, as they do under load). The count per request is
(instructions for warm-up + N requests − instructions for the warm-up alone) / N, both runs
under `valgrind --tool=callgrind`. Instructions are not time: memory stalls and the kernel's
share of syscalls are not in them, so confirm a change on the real server (bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

ROUTES = {"notify": "/send-notification/", "plain": "/plain/"}
WARM_UP = 1_500
CONCURRENCY = 50
CALLGRIND_TOTAL = re.compile(rb"Collected\s*:\s*(\d+)")


async def drive(route: str, warm_up: int, requests: int) -> int:
    """Serve `warm_up` then `requests` requests of `route` in-process; return the 200s."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from same_shape_app import create_bench_app
    from starlette.types import Message

    app = create_bench_app()
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one(tag: str) -> None:
        path = f"{ROUTES[route]}{tag}@example.com"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": f"q={tag}".encode(),
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "app": app,
        }
        await app(scope, receive, send)

    async def run(prefix: str, count: int) -> None:
        tags = iter(range(count))

        async def worker() -> None:
            for n in tags:
                await one(f"{prefix}{n}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        while app.state.runner.unfinished:  # every line written
            await asyncio.sleep(0.001)

    async with app.router.lifespan_context(app):
        await run("w", warm_up)
        await run("m", requests)
    return statuses.count(200)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop, as the server does, when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def count(route: str, warm_up: int, requests: int) -> int:
    """Instructions of one in-process run under callgrind."""
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    argv += [__file__, "--in-process", "--route", route]
    argv += ["--warm-up", str(warm_up), "--requests", str(requests)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(argv, env=env, capture_output=True, check=True)
    found = CALLGRIND_TOTAL.search(done.stderr)
    if found is None:
        raise RuntimeError("callgrind printed no total")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", choices=[*ROUTES, "both"], default="both")
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--warm-up", type=int, default=WARM_UP)
    parser.add_argument("--in-process", action="store_true", help="drive the app, no valgrind")
    args = parser.parse_args()
    routes = list(ROUTES) if args.route == "both" else [args.route]
    if args.in_process:
        for route in routes:
            with tempfile.TemporaryDirectory() as data:
                os.environ.update(
                    BGTASKS_DATA_DIR=data, BGTASKS_DELAY="0", BGTASKS_RETENTION="1000"
                )
                ok = run_loop(drive(route, args.warm_up, args.requests))
            print(f"{route}: {ok} of {args.warm_up + args.requests} requests got a 200")
        return
    for route in routes:
        base = count(route, args.warm_up, 0)
        total = count(route, args.warm_up, args.requests)
        print(f"{route}: {(total - base) // args.requests:,} instructions per request")


if __name__ == "__main__":
    main()
