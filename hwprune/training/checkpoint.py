"""Crash-safe checkpoints: written atomically, the previous good one kept, corruption detected.

``checkpoint.pt`` is the newest; before it is replaced, the current one becomes
``checkpoint.prev.pt``. Both are written with an atomic rename, so a crash at any moment leaves at
least one complete checkpoint. Loading uses ``weights_only=True``: no code in a checkpoint runs.

Each checkpoint carries the SHA-256 of its content (:func:`payload_digest`: every tensor's bytes,
dtype and shape and every other value, in a fixed order), checked on load: torch's zip reader does
not check CRCs, so a flipped bit in a tensor would otherwise load without a word.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io import atomic_torch_save

FORMAT = "hwprune-checkpoint/2"
UNCHECKED_FORMATS = ("hwprune-checkpoint/1",)  # written before checksums: loaded as they are


def payload_digest(payload: Any) -> str:
    """SHA-256 over a checkpoint's content: nested dicts (keys sorted), lists and tuples, tensors (dtype,
    shape and bytes) and plain values (their repr).

    Example:
        >>> a = {"w": torch.ones(2), "epoch": 3}
        >>> payload_digest(a) == payload_digest({"epoch": 3, "w": torch.ones(2)})
        True
        >>> payload_digest(a) == payload_digest({"w": torch.tensor([1.0, 1.0 + 2 ** -23]), "epoch": 3})
        False
    """
    import hashlib

    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                walk(v)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(x).encode())

    walk(payload)
    return h.hexdigest()


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

    def exists(self) -> bool:
        """Whether the folder holds a checkpoint (newest or previous): its run trained at least up to one."""
        return self.path.exists() or self.prev.exists()

    def save(self, payload: dict[str, Any]) -> None:
        payload = {**payload, "format": FORMAT}
        payload["sha256"] = payload_digest(payload)
        if self.path.exists():
            os.replace(self.path, self.prev)  # atomic: the old good checkpoint survives as .prev
        atomic_torch_save(self.path, payload)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, ...
            raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, *UNCHECKED_FORMATS):
            raise CheckpointError(f"{path} is not an hwprune checkpoint")
        if payload["format"] == FORMAT:
            stored = payload.pop("sha256", None)
            if stored != payload_digest(payload):
                raise CheckpointError(f"{path} is corrupt: its content does not match the checksum written with it")
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
