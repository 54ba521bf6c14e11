"""One run at a time per output directory: an exclusive ``fcntl.flock`` on a lock file inside it, held for the run.

The lock dies with its process (``kill -9`` included), so a crashed run never blocks the next one; the lock file
itself stays (removing it would let two runs lock two different files).
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
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
            raise OutputDirInUseError(
                f"--output_dir {output_dir} is in use by another run (pid {holder}, lock {path}); wait for it to "
                "finish or choose another --output_dir"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(handle)  # releases the lock
