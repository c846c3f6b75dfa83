"""The SQL of one group commit in PostgreSQL. Rows go in as arrays (`unnest`): one statement
for all of a batch's rows of one kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.records import RequestRecord
from server.status import UNFINISHED

_UNFINISHED = ", ".join(f"'{status}'" for status in sorted(UNFINISHED))

INSERT_REQUESTS = (
    "INSERT INTO bgtasks.requests (id, method, path, received_at, status_code, accepted)"
    " SELECT *, true FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::int[])"
)
# A client-chosen id that an accepted request already has stays that request's.
INSERT_CHOSEN_REQUESTS = (
    INSERT_REQUESTS + " ON CONFLICT (id) DO UPDATE SET method = excluded.method, path ="
    " excluded.path, received_at = excluded.received_at, response_sent_at = NULL,"
    " status_code = excluded.status_code, accepted = true WHERE NOT bgtasks.requests.accepted"
    " RETURNING id"
)
INSERT_TASKS = (
    "INSERT INTO bgtasks.tasks (id, request_id, seq, owner, file, line, status, queued_at)"
    " SELECT id, request_id, seq, %s, file, line, 'queued', queued_at FROM unnest(%s::text[],"
    " %s::text[], %s::int[], %s::text[], %s::text[], %s::float8[])"
    " AS u(id, request_id, seq, file, line, queued_at) RETURNING id, pk"
)
MARK_SENT = (
    "UPDATE bgtasks.requests AS r SET response_sent_at = u.sent, status_code = u.code"
    " FROM unnest(%s::text[], %s::float8[], %s::int[]) AS u(id, sent, code) WHERE r.id = u.id"
)
# Recorded whole, in place of an earlier request with the same id only if that one was not
# accepted either.
RECORD_REQUESTS = (
    "INSERT INTO bgtasks.requests (id, method, path, received_at, response_sent_at, status_code)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::float8[],"
    " %s::int[]) ON CONFLICT (id) DO UPDATE SET method = excluded.method, path = excluded.path,"
    " received_at = excluded.received_at, response_sent_at = excluded.response_sent_at,"
    " status_code = excluded.status_code WHERE NOT bgtasks.requests.accepted"
)
# Rules 2, 3 and 13 in one statement: number a claim, take each task that `owner` still owns
# and that has no claim yet, and record the claim with those tasks only, in the order given.
CLAIM = (
    "WITH n AS (SELECT nextval('bgtasks.claim_numbers') AS claim),"
    " owned AS (UPDATE bgtasks.tasks AS t SET claim = n.claim FROM n"
    f" WHERE t.pk = ANY(%(keys)s::bigint[]) AND t.owner = %(owner)s AND t.status IN ({_UNFINISHED})"
    " AND t.claim IS NULL RETURNING t.pk)"
    " INSERT INTO bgtasks.claims (claim, owner, data_dir, file, inode, start, tasks)"
    " SELECT n.claim, %(owner)s, %(here)s, %(file)s, %(inode)s, %(start)s,"
    " ARRAY(SELECT k FROM unnest(%(keys)s::bigint[]) WITH ORDINALITY AS u(k, i)"
    " WHERE k IN (SELECT pk FROM owned) ORDER BY i) FROM n RETURNING claim, tasks"
)
# Only this owner's, and never over a cancellation: a task another process adopted, or an
# operator cancelled, is no longer this one's to note. A failed attempt leaves nothing of its
# line in the file: its claim is let go.
UPDATE_TASKS = (
    "UPDATE bgtasks.tasks AS t SET status = u.status, started_at = u.started, finished_at ="
    " u.finished, last_error = u.error, attempts = u.attempts, next_attempt_at = u.next,"
    " claim = CASE WHEN u.status IN ('queued', 'retrying') THEN NULL ELSE t.claim END"
    " FROM unnest(%s::bigint[], %s::text[], %s::float8[], %s::float8[], %s::text[],"
    " %s::int[], %s::float8[]) AS u(pk, status, started, finished, error, attempts, next)"
    " WHERE t.pk = u.pk AND t.owner = %s AND t.status <> 'cancelled'"
)
INSERT_FAILURES = (
    "INSERT INTO bgtasks.failures SELECT * FROM unnest(%s::bigint[], %s::int[], %s::float8[],"
    " %s::float8[], %s::text[]) ON CONFLICT DO NOTHING"
)
END_CLAIMS = "UPDATE bgtasks.claims SET ended = true WHERE claim = ANY(%s::bigint[])"
# pg_locks shows the locks of every database on the server: only this one's owners count.


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as columns, one list per column (what `unnest` takes)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def request_columns(requests: Sequence[RequestRecord]) -> list[list[Any]]:
    return columns([(r.id, r.method, r.path, r.received_at, r.status_code) for r in requests], 5)
