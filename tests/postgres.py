"""A PostgreSQL database of its own for a test: created with a random name on the server at
127.0.0.1:5432 (or $BGTASKS_TEST_POSTGRES), dropped after it.

Without a server the tests that need one skip with the reason, except under CI (`CI=true`),
where a missing server is a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

SERVER = os.environ.get("BGTASKS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "bgtasks_test_"
STORES = ["sqlite", "postgresql"]
"""What `pytest.mark.parametrize("store", STORES, indirect=True)` runs a test on."""


def _admin() -> object:
    import psycopg

    try:
        return psycopg.connect(SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"no PostgreSQL server answers at {SERVER}: {' '.join(str(exc).split())}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database; dropped at the end (its sessions ended first)."""
    import psycopg

    name = PREFIX + secrets.token_hex(6)
    admin = _admin()
    assert isinstance(admin, psycopg.Connection)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # a name of hex digits: nothing to quote
        try:
            yield SERVER.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
