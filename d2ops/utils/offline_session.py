"""Reading a ClearML offline session, kept as its zip only.

ClearML writes each offline task to a folder and, when the task closes, a zip of that folder
(``Task.close`` in clearml/task.py); ``Task.import_offline_session`` takes either. d2ops keeps only
the zip (:func:`keep_zip_only`): the folder is a second copy of everything in it, weights included.
This module reads a session's files from either form, with no ClearML import (the report and the
tests read sessions; only ``d2ops/clearml/`` imports ClearML).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

__all__ = ["keep_zip_only", "session_file", "session_names"]

#: The record ClearML's import reads first; a zip without it is not a session.
TASK_RECORD = "task.json"


def keep_zip_only(folder: str | Path) -> Path:
    """Remove an offline session's folder once its zip holds every file of it; returns the session.

    The zip is the session (``Task.import_offline_session`` reads it). The folder stays when ClearML
    wrote no zip, or one that lacks any of the folder's files (a zip ClearML could not finish).
    """
    folder = Path(folder)
    archive = folder.with_name(folder.name + ".zip")
    if not archive.is_file() or not zipfile.is_zipfile(archive):
        return folder
    with zipfile.ZipFile(archive) as zf:
        stored = {info.filename: info.file_size for info in zf.infolist()}
    on_disk = {path.relative_to(folder).as_posix(): path.stat().st_size for path in folder.rglob("*") if path.is_file()}
    if TASK_RECORD not in stored or any(stored.get(name) != size for name, size in on_disk.items()):
        return folder
    shutil.rmtree(folder)
    return archive


def session_names(session: str | Path) -> list[str]:
    """The files a session holds, relative to it (``task.json``, ``metrics.jsonl``, ``data/...``)."""
    session = Path(session)
    if session.is_dir():
        return sorted(path.relative_to(session).as_posix() for path in session.rglob("*") if path.is_file())
    with zipfile.ZipFile(session) as zf:
        return sorted(name for name in zf.namelist() if not name.endswith("/"))


def session_file(session: str | Path, name: str) -> bytes | None:
    """One file of a session (a zip or a folder), ``None`` when it has no such file."""
    session = Path(session)
    if session.is_dir():
        path = session / name
        return path.read_bytes() if path.is_file() else None
    if not zipfile.is_zipfile(session):
        return None
    with zipfile.ZipFile(session) as zf:
        try:
            return zf.read(name)
        except KeyError:
            return None
