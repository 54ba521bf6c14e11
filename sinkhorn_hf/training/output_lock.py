"""One run at a time per output directory: an exclusive ``fcntl.flock`` on a lock file inside it, held for the run.

The lock dies with its process (``kill -9`` included), so a crashed run never blocks the next one. A run removes
its lock file when it ends, while still holding the lock; a run that locked the file just as it was removed sees
that the name no longer leads to the file it holds and locks the new one instead, so two runs never hold two
different lock files. An output directory the run created and left empty is removed again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".sinkhorn_hf_run.lock"


class OutputDirInUseError(RuntimeError):
    """Another run holds the lock on the output directory."""


@contextmanager
def output_dir_lock(output_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock on ``output_dir`` (created if needed) within the block; ``enabled=False`` (processes other
    than the main one) does nothing. Raises :class:`OutputDirInUseError` with the holder's pid."""
    if not enabled:
        yield
        return
    folder = Path(output_dir)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = _lock(path, output_dir)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: see the module docstring
        os.close(handle)  # releases the lock
        if created and not any(folder.iterdir()):
            folder.rmdir()


def _lock(path: Path, output_dir: str | Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, with this process's pid written in it."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise OutputDirInUseError(
                f"--output_dir {output_dir} is in use by another run (pid {holder}, lock {path}); wait for it to "
                "finish or choose another --output_dir"
            ) from None
        if _same_file(handle, path):
            os.ftruncate(handle, 0)
            os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
            return handle
        os.close(handle)  # its holder removed it as it ended: lock the file now under that name


def _same_file(handle: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
