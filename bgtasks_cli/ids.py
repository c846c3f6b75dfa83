"""Short forms of ids, for where the CLI has no room for a whole one."""

from __future__ import annotations

SHORT_ID_CHARS = 8


def short_id(full: str) -> str:
    """The end of an id, marked as such: request ids begin with the time (16 hex digits of
    nanoseconds, or a UUIDv7) and end with random digits, so their starts repeat for every
    request made within seconds while their ends tell them apart."""
    if len(full) <= SHORT_ID_CHARS + 1:
        return full
    return "…" + full[-SHORT_ID_CHARS:]
