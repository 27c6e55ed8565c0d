"""One durability policy for every file d2ops writes: :func:`atomic_write`.

A reader, a resumed run or a server watching the file sees the old content or the whole new one, never a
torn file: the bytes go to a temporary file beside the target (same filesystem), which is renamed over it.
``durable`` (the default) also fsyncs the file before the rename and the folder after it, so the new
content survives a power loss, not only a kill: records, checkpoints, bundles, reports. Downloads into the
dataset cache pass ``durable=False``: they are re-fetched and checked by hash, and a fsync per image would
cost more than the transfer. Folders are swapped by their writers (a staged folder renamed into place).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["atomic_write", "fsync_dir", "temp_beside"]


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name next to ``path``: ``.<name>.<12 hex><suffix>``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where the platform cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(
    path: str | Path, mode: Literal["w", "wb"] = "wb", *, temp: Path | None = None, durable: bool = True
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; when the block ends without an error, it replaces ``path``.

    On any error (a full disk, an interrupt) the temporary file is removed and ``path`` is untouched.
    ``temp`` names the temporary file (default :func:`temp_beside`), for writers that sweep the leftovers
    of a killed process by name. The new file has the permissions a plain ``open`` gives (the umask's).
    """
    path = Path(path)
    tmp = temp or temp_beside(path)
    try:
        with open(tmp, mode.replace("w", "x")) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
