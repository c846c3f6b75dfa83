"""Where a running `bgtasks serve` listens, so other commands find it with no flags."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from server.paths import default_data_dir, user_state_dir

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True, slots=True)
class ServerState:
    url: str
    pid: int
    data_dir: str


def state_file() -> Path:
    return user_state_dir() / "server.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state() -> ServerState | None:
    """The recorded server, if its process is still alive."""
    try:
        raw = json.loads(state_file().read_text())
        state = ServerState(url=str(raw["url"]), pid=int(raw["pid"]), data_dir=str(raw["data_dir"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if _alive(state.pid) else None


def write_state(state: ServerState) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(path)


def clear_state(pid: int) -> None:
    """Remove the state file if it still describes process `pid`."""
    path = state_file()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def resolve_url(option: str | None) -> str:
    """--url / BGTASKS_URL, else the running server's, else the default."""
    if option:
        return option.rstrip("/")
    state = read_state()
    return state.url if state else DEFAULT_URL


def resolve_data_dir(option: Path | None) -> Path:
    """--data-dir / BGTASKS_DATA_DIR, else the running server's, else the default."""
    if option is not None:
        return option.expanduser()
    if os.environ.get("BGTASKS_DATA_DIR"):
        return default_data_dir()
    state = read_state()
    return Path(state.data_dir) if state else default_data_dir()
