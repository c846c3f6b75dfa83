"""Owner locks: how a process shows it is alive to the others that share its data directory.

An owner is one server process (one uvicorn worker); its id is 8 hex digits, fresh at every
start. It holds an exclusive `flock` on `.bgtasks/owners/<id>.lock` for as long as it lives
and removes the file when it closes; the kernel drops the lock when the process dies, however
it dies. So a lock that can be taken means its owner is gone (rule 6).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from server.paths import STATE_DIR, owners_dir
from server.registry.store import StoreFault

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


def check_state_dir(data_dir: Path) -> None:
    """Raise StoreFault if the data directory's state directory (or its owners directory) is a
    symbolic link: the service writes only inside its data directory."""
    for path in (data_dir / STATE_DIR, owners_dir(data_dir)):
        if path.is_symlink():
            raise StoreFault(
                f"{path} is a symbolic link; the service writes only inside its data directory"
            )


class OwnerLocks:
    """The owner lock files of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = owners_dir(data_dir)

    def listed(self) -> set[str]:
        """Every owner with a lock file: alive, or dead and not yet recovered."""
        return {path.stem for path in self._dir.glob("*.lock")}

    def hold(self, owner: str) -> int:
        """Take `owner`'s lock, waiting for it; this process's own, at start. Returns its fd."""
        self._dir.mkdir(parents=True, exist_ok=True)
        fd = self._lock(owner, blocking=True)
        assert fd is not None
        return fd

    def take_if_dead(self, owner: str) -> int | None:
        """Take `owner`'s lock if nobody holds it (the owner is dead and no sibling is
        recovering it); None if it is held."""
        return self._lock(owner, blocking=False)

    def release(self, owner: str, fd: int) -> None:
        """Remove the lock file and let go of its lock: this owner has nothing left to do."""
        with contextlib.suppress(OSError):
            os.unlink(self._path(owner))
        os.close(fd)

    def _path(self, owner: str) -> Path:
        return self._dir / f"{owner}.lock"

    def _lock(self, owner: str, *, blocking: bool) -> int | None:
        # A recoverer unlinks a dead owner's file while holding its lock, so a lock taken on a
        # file that is no longer at the path proves nothing: start again with the one there.
        path = self._path(owner)
        while True:
            fd = os.open(path, _FLAGS, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
