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
import time
import uuid
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


def data_dir_id(data_dir: Path) -> str:
    """This data directory's id (`.bgtasks/id`, made at its first use): claims in a store
    shared by many machines name the directory their file is in."""
    path = data_dir / STATE_DIR / "id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = uuid.uuid4().hex
        try:
            with open(path, "x") as file:  # a sibling starting at once may have made it first
                file.write(fresh + "\n")
        except FileExistsError:
            return path.read_text().strip()
        return fresh


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

    def take_if_dead(self, owner: str, *, patient: bool = False) -> int | None:
        """Take `owner`'s lock if nobody holds it (the owner is dead and no sibling is
        recovering it); None if it is held. `patient`: if held, look once more a moment later,
        in case `alive` was looking at it (at start, when a wrong answer costs a whole run)."""
        fd = self._lock(owner, blocking=False)
        if fd is None and patient:
            time.sleep(0.01)
            fd = self._lock(owner, blocking=False)
        return fd

    def alive(self) -> int:
        """How many owners hold their lock."""
        return sum(self.holds(owner) for owner in self.listed())

    def holds(self, owner: str) -> bool:
        """Whether `owner` holds its lock (or a recoverer does, for a moment). A look that
        takes a shared lock for an instant: it never stops another look, and a recoverer looks
        twice (`take_if_dead`)."""
        try:
            fd = os.open(self._path(owner), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False  # no file: its owner closed, or was recovered
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

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
