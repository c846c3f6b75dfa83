"""The data files: long-lived O_APPEND descriptors, their locks, and the one write per claim.

Each file is opened once and kept open; a file that was removed or replaced is reopened. Only
regular files are written: anything else there (a FIFO, a device, a directory) fails the task
with a clear error, since a write to it could block the event loop or never reach a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger("bgtasks.registry")

FLOCK_RETRY_S = 0.0005  # how soon a file another process holds is tried again

# Appending and reading (recovery reads back what it finds at an offset); never through a
# symlink, so the service cannot be led to write outside its data directory; non-blocking, so
# that opening a FIFO cannot wait for a reader.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


class NotARegularFile(OSError):
    """A data file's name is taken by something that is not a regular file."""


class DataFiles:
    """The data directory's files, each opened once and locked around every claim's write.

    A file's lock is two: an asyncio lock, because `flock` on one descriptor does not keep
    this process's group commit and its recovery apart, and the `flock`, which keeps other
    processes out. The `flock` is tried without blocking and tried again after a pause: a
    sibling holding it across a networked commit must not stop this process's event loop.
    """

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self._fds: dict[str, int] = {}
        self._turns: dict[str, asyncio.Lock] = {}

    async def lock(self, name: str) -> tuple[int, int, int]:
        """Lock `name` exclusively and return (fd, inode, size): while the lock is held, its
        size is where the next line goes (rule 3). Raises OSError (then it is not held)."""
        turn = self._turns.setdefault(name, asyncio.Lock())
        await turn.acquire()
        try:
            return await self._lock(name)
        except BaseException:
            turn.release()
            raise

    async def _lock(self, name: str) -> tuple[int, int, int]:
        path = self._dir / name
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = _open_regular(path)
        await _flock(fd)
        st = os.fstat(fd)
        try:
            current = os.stat(path, follow_symlinks=False)
            same = (current.st_ino, current.st_dev) == (st.st_ino, st.st_dev)
        except FileNotFoundError:
            same = False
        if not same:  # removed or replaced since it was opened: write to what is there now
            self._close(name)
            fd = self._fds[name] = _open_regular(path)
            await _flock(fd)
            st = os.fstat(fd)
        return fd, st.st_ino, st.st_size

    def unlock(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._turns[name].release()

    def _close(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        for name in list(self._fds):
            self._close(name)


async def _flock(fd: int) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(FLOCK_RETRY_S)


def _open_regular(path: Path) -> int:
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as exc:
        try:  # say what is there, if that is why (a socket cannot be opened at all)
            mode = os.stat(path, follow_symlinks=False).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            raise
        raise _not_regular(path, mode) from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


def _not_regular(path: Path, mode: int) -> NotARegularFile:
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return NotARegularFile(f"{path.name} is {kind}, not a regular file")


def append_lines(fd: int, start: int, lines: list[bytes]) -> tuple[int, OSError | None]:
    """Append a claim's lines, which sit back to back from `start`, with one `os.write` (rule
    4): whole lines in one write, so no other writer's bytes can come between or inside them.

    Returns how many lines landed whole, and the error that kept the rest out (None if all
    landed). On a short write (a full disk) the part of a line that landed is cut off, so
    that the next line written does not follow half a line."""
    data = b"".join(lines)
    try:
        written = os.write(fd, data)
    except OSError as exc:
        return 0, exc
    if written == len(data):
        return len(lines), None
    landed = kept = 0
    while kept + len(lines[landed]) <= written:
        kept += len(lines[landed])
        landed += 1
    if kept != written:
        try:
            os.ftruncate(fd, start + kept)
        except OSError:
            logger.exception("could not cut off a partly written line")
    return landed, OSError(f"short write: {written} of {len(data)} bytes")
