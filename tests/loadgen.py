"""A small raw HTTP/1.1 load generator for tests: httpx's pool slows down badly with hundreds of
requests waiting on it, so tests that need real concurrency speak HTTP themselves."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit


async def _post(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        return int(head.split()[1]), body
    finally:
        writer.close()


async def post_all(
    url: str, paths: Sequence[str], *, timeout: float = 60, concurrency: int | None = None
) -> list[int | None]:
    """POST every path, each on its own connection, at most `concurrency` at once (default:
    all at once). None marks a request that got no response (refused, reset or timed out)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    slots = asyncio.Semaphore(concurrency or len(paths) or 1)

    async def one(path: str) -> int | None:
        async with slots:
            try:
                status, _ = await _post(host, port, path, timeout)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                return None
            return status

    return list(await asyncio.gather(*(one(p) for p in paths)))


def post_concurrently(
    url: str, paths: Sequence[str], *, timeout: float = 60, concurrency: int | None = None
) -> list[int | None]:
    return asyncio.run(post_all(url, paths, timeout=timeout, concurrency=concurrency))
