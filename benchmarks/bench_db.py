"""A PostgreSQL database of a benchmark's own, on a loopback server: made with a random name,
dropped at the end (its sessions ended first), also on a failure, Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

PREFIX = "bgtasks_bench_"


def is_loopback(url: str) -> bool:
    """Whether the URL's host is a loopback address (or localhost)."""
    import psycopg

    host = psycopg.conninfo.conninfo_to_dict(url).get("host") or "localhost"
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


@contextlib.contextmanager
def bench_database(admin_url: str) -> Iterator[str]:
    """A new database on the server of `admin_url`: its URL, dropped at the end. SIGTERM
    stops the run as Ctrl-C does, through the drop."""
    import psycopg

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    name = PREFIX + secrets.token_hex(6)  # hex digits: nothing to quote
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the drop finish
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
                end_sessions(admin, name)
                admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            signal.signal(signal.SIGTERM, previous)


def end_sessions(conn: Any, name: str) -> None:
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )


def fresh_registry(url: str) -> None:
    """Drop the registry's schema (the servers made it; they have stopped)."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        end_sessions(conn, url.rsplit("/", 1)[1])
        conn.execute("DROP SCHEMA IF EXISTS bgtasks CASCADE")


def backends(url: str) -> list[int]:
    """The PostgreSQL server processes serving the run's database."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(row[0]) for row in rows]


@contextlib.contextmanager
def commit_session_states(url: str, every_s: float = 0.02) -> Iterator[Counter[str]]:
    """While the block runs, sample what the registry's commit sessions are doing every
    `every_s` (from pg_stat_activity, on a connection of its own in a thread): `idle` between
    transactions, `waits for the client` inside one (a pipeline not yet sent whole, or
    waiting on the client's reading an answer), `works` (no wait event), or the wait event.
    The counter holds how many samples of each."""
    import psycopg

    states: Counter[str] = Counter()
    stop = threading.Event()
    query = (
        "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'bgtasks % commits'"
    )

    def sample() -> None:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            while not stop.wait(every_s):
                for state, kind, event in conn.execute(query).fetchall():
                    if state != "active":
                        states[str(state)] += 1
                    elif event == "ClientRead":
                        states["waits for the client"] += 1
                    else:
                        states[f"{kind}:{event}" if event else "works"] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield states
    finally:
        stop.set()
        sampler.join()
