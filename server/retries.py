"""When a failed attempt is tried again, and how long after: exponential backoff with full
jitter, for the errors a later attempt may not meet."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from server.registry import StoreBusy


def retryable(error: BaseException) -> bool:
    """Whether a later attempt may succeed: the file system's errors (a full disk, a data file
    replaced by a directory, a permission) may be fixed, and a registry busy past its lock
    timeout may be free. A damaged registry, or a bug, would fail the same way again."""
    return isinstance(error, OSError | StoreBusy)


def describe(error: BaseException) -> str:
    """An error as a task's `last_error` shows it."""
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`max_attempts` attempts at most; after the n-th fails, a wait drawn uniformly from 0 to
    min(`cap`, `base` × 2^(n-1)) seconds ("full jitter": retries of many tasks spread out
    instead of coming back together)."""

    max_attempts: int = 5
    base: float = 0.5
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after attempt number `attempt` (from 1) failed."""
        return self.rng.uniform(0.0, min(self.cap, self.base * 2 ** (attempt - 1)))

    def should_retry(self, attempts: int, error: BaseException) -> bool:
        """After `attempts` attempts, the last of which failed with `error`."""
        return attempts < self.max_attempts and retryable(error)
