"""Crash-safe checkpoints: written atomically, the previous good one kept, corruption detected.

``checkpoint.pt`` is the newest; before it is replaced, the current one becomes
``checkpoint.prev.pt``. Both are written with an atomic rename, so a crash at any moment leaves at
least one complete checkpoint. Loading uses ``weights_only=True``: no code in a checkpoint runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io import atomic_torch_save

FORMAT = "hwprune-checkpoint/1"


class Checkpointer:
    """Saves and loads a run folder's checkpoint.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     ck = Checkpointer(run_dir)
        ...     ck.save({"stage": "dense", "epoch": 3})
        ...     ck.save({"stage": "dense", "epoch": 4})          # epoch 3 becomes checkpoint.prev.pt
        ...     ck.load()["epoch"], ck.prev.exists()
        (4, True)
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "checkpoint.pt"
        self.prev = self.run_dir / "checkpoint.prev.pt"

    def save(self, payload: dict[str, Any]) -> None:
        payload = {**payload, "format": FORMAT}
        if self.path.exists():
            os.replace(self.path, self.prev)  # atomic: the old good checkpoint survives as .prev
        atomic_torch_save(self.path, payload)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, ...
            raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an hwprune checkpoint")
        return payload

    def load(self) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None if the folder has none.

        A corrupt newest checkpoint is reported and the previous one is used; if both are unusable the
        error says so.
        """
        candidates = [p for p in (self.path, self.prev) if p.exists()]
        if not candidates:
            return None
        errors = []
        for p in candidates:
            try:
                payload = self._read(p)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            if errors:
                print(f"hwprune: {errors[0]}; resuming from the previous checkpoint {p.name}", file=sys.stderr)
            return payload
        raise CheckpointError("; ".join(errors) + ". No usable checkpoint: start a new run (another --out folder).")
