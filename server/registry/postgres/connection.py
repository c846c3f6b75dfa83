"""Connections to the PostgreSQL registry: their session settings, the owner's advisory lock,
and psycopg's errors as the registry's."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.types.array import ListBinaryDumper
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

from server.registry.store import StoreBusy, StoreFault

T = TypeVar("T")

# A host that loses its network sends nothing: its sessions end, and its lock is freed, only
# once TCP keepalives fail. These make that about 11 s on both sides, not two hours. A plan
# made for tables while they were small would stay cached for the connection's whole life
# (scanning whole tables as they grow): every execution is planned for the tables as they are.
SESSION = (
    "keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=3"
    " options='-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2"
    " -c tcp_keepalives_count=3 -c synchronous_commit=on -c plan_cache_mode=force_custom_plan'"
)

LOCKS = (
    "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = %s::oid AND objsubid = 2"
)


def lock_key(owner: str) -> int:
    """The second key of an owner's advisory lock: its 8 hex digits, as a signed int4."""
    value = int(owner, 16)
    return value - (1 << 32) if value >= 1 << 31 else value


def shielded(read: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """A read on the connection the process's reads share, run to its end even if its caller
    is cancelled (a client that closed its event stream): psycopg closes a connection whose
    query is cancelled midway, which would fail every read of the process after it."""
    return asyncio.shield(read)


async def connect(
    url: str, name: str, *, timeout: float = 5.0, **kwargs: Any
) -> AsyncConnection[Any]:
    """A connection with the session settings every registry connection needs; `name` is
    what `pg_stat_activity.application_name` shows of it. A statement that waits for a lock,
    or runs, longer than `timeout` seconds fails (and is retried, then refused, as a busy
    registry is), rather than holding the group commit.

    Statements are not prepared on the server: psycopg would count a statement skipped in a
    pipeline after a failed one as prepared, and every later commit would fail on it."""
    settings = psycopg.conninfo.conninfo_to_dict(SESSION)
    ms = max(1, round(timeout * 1000))
    options = f"{settings.get('options') or ''} -c lock_timeout={ms} -c statement_timeout={ms}"
    settings["options"] = options
    conninfo = psycopg.conninfo.make_conninfo(url, application_name=name, **settings)
    conn: AsyncConnection[Any] = await AsyncConnection.connect(
        conninfo, autocommit=True, prepare_threshold=None, **kwargs
    )
    # Every int as a bigint, so a statement's parameter types (and its prepared plan) stay the
    # same as keys grow; lists as binary arrays (the text form quotes each element in Python).
    conn.adapters.register_dumper(int, Int8Dumper)
    conn.adapters.register_dumper(int, Int8BinaryDumper)
    conn.adapters.register_dumper(list, ListBinaryDumper)
    return conn


# What says the database cannot hold the registry as it is: read-only, not allowed, damaged,
# or its tables gone. Anything else may pass (a lost connection, a deadlock, a full disk) or is
# one statement's trouble, not the store's: the commit is retried, then its work refused.
_FAULTS = (
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.DataCorrupted,
    psycopg.errors.IndexCorrupted,
    psycopg.errors.InvalidSchemaName,
    psycopg.errors.InvalidCatalogName,
)


@contextmanager
def translated(what: str, url: str) -> Iterator[None]:
    """psycopg's errors as the registry's: StoreFault when the database cannot hold the
    registry, StoreBusy for anything that may pass."""
    try:
        yield
    except _FAULTS as exc:
        raise StoreFault(f"task registry unusable ({what}): {one_line(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreBusy(f"task registry unavailable ({what}): {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
