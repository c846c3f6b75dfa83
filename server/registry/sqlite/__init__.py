"""The registry's SQLite store: `store` (the Store), `schema` (tables, connections,
migrations), `checkpoint` (WAL checkpoints in a thread), `prune` (retention), `queries`
(reads)."""

from server.registry.sqlite.schema import check_registry, connect
from server.registry.sqlite.store import SqliteStore

__all__ = ["SqliteStore", "check_registry", "connect"]
