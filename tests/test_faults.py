"""A registry damaged while the server runs: nothing more is accepted, and every read says
why (issue 13, bug 8), against a real server."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable

import httpx

from server.paths import registry_path
from tests.helpers import LiveServer, wait_until
from tests.loadgen import post_concurrently


def test_a_registry_damaged_while_serving_refuses_work_and_says_so(
    start_server: Callable[..., LiveServer],
) -> None:
    live = start_server()
    paths = [f"/send-notification/u{n}@example.com?q=q{n}" for n in range(200)]
    assert post_concurrently(live.url, paths) == [200] * 200
    wait_until(lambda: httpx.get(f"{live.url}/health").json()["unfinished_tasks"] == 0)
    path = registry_path(live.data_dir)
    outside = sqlite3.connect(path, isolation_level=None)
    outside.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    outside.close()
    with open(path, "r+b") as db:  # dd if=/dev/urandom bs=4096 count=4 conv=notrunc
        db.write(os.urandom(4 * 4096))
    statuses = [
        httpx.post(f"{live.url}/send-notification/late{n}@example.com").status_code
        for n in range(3)
    ]
    # The first commit finds the damage: from then on nothing is accepted.
    assert statuses == [503, 503, 503]
    health = httpx.get(f"{live.url}/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unavailable"
    assert "file is not a database" in health.json()["error"]
    tasks = httpx.get(f"{live.url}/tasks")
    assert tasks.status_code == 503 and "file is not a database" in tasks.json()["detail"]
    refused = httpx.post(f"{live.url}/send-notification/x@example.com")
    assert refused.status_code == 503 and "nothing was queued" in refused.json()["detail"]
    assert live.read("log.txt").count(b"\n") == 400  # only what was accepted before
