"""Where the service keeps its files. Light on purpose: the CLI imports it."""

from __future__ import annotations

import os
from pathlib import Path

LOG_FILE = "log.txt"
README_FILE = "README.md"
STATE_DIR = ".bgtasks"
REGISTRY_FILE = "registry.db"
OWNERS_DIR = "owners"


def default_data_dir() -> Path:
    """The data directory: `BGTASKS_DATA_DIR`, else `data/` in the per-user state directory."""
    env = os.environ.get("BGTASKS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return user_state_dir() / "data"


def user_state_dir() -> Path:
    """Per-user state (`~/.local/state/bgtasks` on Linux); `BGTASKS_STATE_DIR` overrides it."""
    env = os.environ.get("BGTASKS_STATE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_state_path

    return user_state_path("bgtasks")


def registry_path(data_dir: Path) -> Path:
    return data_dir / STATE_DIR / REGISTRY_FILE


def owners_dir(data_dir: Path) -> Path:
    return data_dir / STATE_DIR / OWNERS_DIR
