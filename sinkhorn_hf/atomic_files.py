"""Atomic single-file writes: the content goes to a hidden temporary sibling in the target's folder, which is then
renamed over the target (``os.replace``), so a reader sees the old file or the new one, never half of one.

On any exception (including KeyboardInterrupt) the temporary sibling is removed again and the target is left as it
was; nothing but that sibling, which this module created, is ever deleted. No fsync: the guarantee is against
killed or failing programs, not power loss.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write`` on a binary file open on a temporary sibling ``.{name}.{random}.tmp`` of ``path``, then rename
    it to ``path``. Raises FileNotFoundError naming the folder when ``path``'s folder does not exist. Returns
    ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its folder {path.parent} does not exist")
    temporary, file = _create_sibling(path)
    try:
        with file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # our own temporary file, never the target
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`). Returns ``path``."""
    if not isinstance(text, str):
        raise TypeError(f"the text to write to {path} must be a str, got {type(text).__name__}")
    return write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON (``indent`` spaces, a final newline) to ``path`` atomically. Returns ``path``."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def save_figure_atomic(figure: Figure, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """``figure.savefig`` to ``path`` atomically, in the format of ``path``'s suffix unless ``format=`` is given
    (other keywords, e.g. ``dpi``, go to savefig); then close the figure if pyplot made it. Returns ``path``."""
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    write_atomic(path, lambda file: figure.savefig(file, **savefig_kwargs))
    if figure.canvas.manager is not None:  # only pyplot's figures are held by pyplot until closed
        import matplotlib.pyplot as plt

        plt.close(figure)
    return path


def _create_sibling(path: Path) -> tuple[Path, IO[bytes]]:
    """A new hidden file next to ``path`` (exclusive creation: never one that exists), open for binary writing."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return temporary, open(temporary, "xb")  # noqa: SIM115  (closed by write_atomic)
        except FileExistsError:
            continue
