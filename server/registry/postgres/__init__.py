"""The registry's PostgreSQL store: `store` (the Store), `schema` (tables and their version),
`queries` (reads and retention). Imported only when a database URL is given: psycopg is the
`postgres` extra."""

from server.registry.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
