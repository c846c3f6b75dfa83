"""The task registry: every request and task, recorded so that accepted work is written exactly
once, even across `kill -9`. The rules it keeps are numbered in docs/protocol.md.

    registry.py   Registry, what the rest of the server uses: lifecycle, hand-overs, reads
    batch.py      the group commit: what waits for the next transaction, one commit at a time
    claims.py     the protocol's pure parts: where lines go, and whether they are there
    files.py      the data files: descriptors, locks, the one write per claim
    owners.py     owner locks: who is alive
    recovery.py   finishing what dead owners left
    store.py      the seam: what the protocol needs from a database (Store)
    sqlite/       the SQLite store: schema and migrations, checkpoints, prune, reads
"""

from server.registry.batch import Ended
from server.registry.registry import Registry
from server.registry.sqlite import SqliteStore, check_registry, connect
from server.registry.store import (
    RegistryError,
    Store,
    StoreBusy,
    StoreFault,
    TaskDropped,
)

__all__ = [
    "Ended",
    "Registry",
    "RegistryError",
    "SqliteStore",
    "Store",
    "StoreBusy",
    "StoreFault",
    "TaskDropped",
    "check_registry",
    "connect",
]
