"""Where the shipped targets and profiles live.

A checkout keeps them at the top of the repo (``targets/``, ``profiles/``); a non-editable install copies
them to ``<prefix>/share/hwprune/``. ``$HWPRUNE_TARGETS`` / ``$HWPRUNE_PROFILES`` (os.pathsep-separated)
are searched first, so a team can keep its own targets elsewhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# hwprune/target/files.py -> the checkout's root
REPO_ROOT = Path(__file__).resolve().parents[2]


def _dirs(env_var: str, name: str) -> list[Path]:
    found: list[Path] = []
    for part in os.environ.get(env_var, "").split(os.pathsep):
        if part:
            found.append(Path(part).expanduser())
    for candidate in (REPO_ROOT / name, Path(sys.prefix) / "share" / "hwprune" / name):
        if candidate.is_dir() and candidate not in found:
            found.append(candidate)
    return found


def target_dirs() -> list[Path]:
    """Folders searched for shipped targets, in order.

    Example:
        >>> any(d.name == "targets" for d in target_dirs())
        True
    """
    return _dirs("HWPRUNE_TARGETS", "targets")


def profile_dirs() -> list[Path]:
    """Folders searched for latency profiles, in order (the first is where new profiles are written)."""
    return _dirs("HWPRUNE_PROFILES", "profiles")
