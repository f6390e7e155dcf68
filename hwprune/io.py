"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (``export_library``); when
    the block ends without an error the file is flushed to disk and renamed into place, else removed.

    Example:
        >>> target = Path(tempfile.mkdtemp()) / "lib.so"
        >>> with atomic_path(target, ".so") as tmp:
        ...     _ = tmp.write_bytes(b"ELF")
        >>> target.read_bytes()
        b'ELF'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the file system allows it)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it into place.

    Example:
        >>> p = atomic_write_bytes(Path(tempfile.mkdtemp()) / "x.bin", b"ok"); p.read_bytes()
        b'ok'
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the user's usual permissions
        tmp.write_bytes(data)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic write of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic write of pretty-printed JSON (NaN is written as null, so other tools can read it)."""
    return atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` to memory, then an atomic write."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return _clean(obj.item())
        except (ValueError, RuntimeError):
            pass
    return obj


_HELD: dict[str, list] = {}  # folder -> [open lock file, depth]: the lock is re-entrant within a process


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "hwprune fit") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``.hwprune.lock`` inside it) while the block runs, so that two
    processes never write one run folder at once. A second process gets a clear error at once (no wait);
    the lock goes with the process, so a killed run leaves nothing to clean up.

    Example:
        >>> d = tempfile.mkdtemp()
        >>> with folder_lock(d):
        ...     with folder_lock(d):       # the same process may enter again
        ...         pass
    """
    import fcntl

    from .errors import HwpruneError

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".hwprune.lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise HwpruneError(f"{folder} is in use by {holder}; wait for it to finish, or choose another --out "
                           "folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"{what} (pid {os.getpid()})")
    f.flush()
    _HELD[key] = [f, 1]
    try:
        yield
    finally:
        del _HELD[key]
        f.close()  # closing the file releases the lock


def check_writable_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Before any work: ``folder`` exists or can be made, is a folder, and takes a new file (a probe,
    removed at once). Raises a one-line error naming ``flag`` otherwise.

    Example:
        >>> check_writable_folder(tempfile.mkdtemp()).is_dir()
        True
    """
    from .errors import HwpruneError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HwpruneError(f"{flag} {folder}: that is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hwprune-probe-"):
            pass
    except OSError as e:
        raise HwpruneError(f"{flag} {folder}: cannot write there ({e.strerror}); choose a writable folder") from None
    return folder
