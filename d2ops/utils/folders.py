"""The one rule for every folder d2ops writes at a path the user names (an export's ``--out``, the demo's ``--out``):
d2ops never deletes or overwrites what it did not write.

- A new or empty folder is written.
- A folder that holds exactly what d2ops wrote there before (its manifest, ``d2ops-export.json``, lists every
  file with its sha256, and nothing was added, removed or edited since) and came from the same model is
  replaced only when the caller says so (``--force``); the demo replaces its own earlier output.
- Anything else is refused before any work starts, with what to do; so is an ``--out`` that is, is inside, or
  holds the model being exported.

Replacing is atomic: the new content is built in a sibling temporary folder; the old folder is moved aside
(never deleted) until the new one is renamed into place, and only then removed. A failure at any point leaves
the old folder where it was, and no temporary folder behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from d2ops.utils.files import atomic_write, fsync_dir

__all__ = ["MANIFEST", "OutputFolderError", "check_output_folder", "read_manifest", "refuse_overlap", "written_folder"]

log = logging.getLogger(__name__)

MANIFEST = "d2ops-export.json"
_CHUNK = 4 * 1024 * 1024


class OutputFolderError(ValueError):
    """The output folder holds something d2ops may not replace; the message says what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` but the manifest, by its POSIX path relative to ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_dir():
            found[path.relative_to(folder).as_posix()] = path
    found.pop(MANIFEST, None)
    return found


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest d2ops wrote into ``folder``, or None when there is none (or it is not d2ops's JSON)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _changes(folder: Path, recorded: dict[str, Any]) -> list[str]:
    """What differs between ``folder`` and the files its manifest records: added, missing or edited files."""
    present = _files(folder)
    problems = [f"{name} (added)" for name in present if name not in recorded]
    problems += [f"{name} (missing)" for name in recorded if name not in present]
    problems += [
        f"{name} (edited)"
        for name, path in present.items()
        if name in recorded and (path.is_symlink() or _sha256(path) != recorded[name])
    ]
    return problems


def _overlaps(out: Path, source: Path) -> str | None:
    out, source = out.resolve(), source.resolve()
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "holds"
    return None


def refuse_overlap(out: Path, sources: Sequence[Path], kind: str) -> None:
    """Raise :class:`OutputFolderError` when ``out`` is, is inside, or holds one of ``sources`` (the model)."""
    for source in sources:
        overlap = _overlaps(Path(out), Path(source))
        if overlap:
            raise OutputFolderError(f"--out {out} {overlap} the model {source}; write the {kind} to a new folder")


def check_output_folder(
    out: Path, *, kind: str, model: str, sources: Sequence[Path] = (), force: bool = False, replace_own: bool = False
) -> None:
    """Raise :class:`OutputFolderError` unless d2ops may write its ``kind`` output of ``model`` at ``out``.

    ``sources``: the model's files or folders, which ``out`` must neither be, be inside, nor hold.
    ``replace_own``: replace an earlier output of this kind without ``force`` (the demo's scratch folder).
    """
    refuse_overlap(out, sources, kind)
    if out.is_symlink():
        raise OutputFolderError(f"--out {out} is a symbolic link; name a real folder (d2ops does not replace links)")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file; name a new folder")
    if not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    if manifest is None:
        raise OutputFolderError(
            f"--out {out} holds files d2ops did not write (it has no {MANIFEST}); d2ops never replaces them: "
            "name a new folder, or move that one away yourself"
        )
    if manifest.get("kind") != kind or manifest.get("model") != model:
        raise OutputFolderError(
            f"--out {out} holds the d2ops {manifest.get('kind')} of model {manifest.get('model')}, not the "
            f"{kind} of model {model}; d2ops replaces only its own output of the same model: name a new folder, "
            "or move that one away yourself"
        )
    changed = _changes(out, manifest["files"])
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise OutputFolderError(
            f"--out {out} was changed since d2ops wrote it ({shown}); d2ops never replaces files it did not write: "
            "name a new folder, or move that one away yourself"
        )
    if not (force or replace_own):
        raise OutputFolderError(f"--out {out} holds an earlier {kind} of this model; pass --force to replace it")


def _publish(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an earlier ``out`` is moved aside first and removed once the new one is in."""
    if not out.exists():
        os.replace(staging, out)
        fsync_dir(out.parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    previous = aside / out.name
    os.replace(out, previous)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(previous, out)  # put the old folder back: nothing is lost
        aside.rmdir()
        raise
    fsync_dir(out.parent)
    shutil.rmtree(aside)


@contextmanager
def written_folder(
    out: str | Path,
    *,
    kind: str,
    model: str,
    sources: Sequence[Path] = (),
    force: bool = False,
    replace_own: bool = False,
    manifest: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; when the block ends without an error, its content becomes
    ``out``, with a manifest (``kind``, ``model``, every file's sha256, and ``manifest``'s extra entries).

    The rule (:func:`check_output_folder`) is checked before the block runs and again just before the rename.
    On an error the staging folder is removed and ``out`` is untouched.
    """
    out = Path(out).absolute()
    check_output_folder(out, kind=kind, model=model, sources=sources, force=force, replace_own=replace_own)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new.", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the folder from a builder or server running as another user
        yield staging
        record = {
            **(manifest or {}),
            "kind": kind,
            "model": model,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {name: _sha256(path) for name, path in _files(staging).items()},
        }
        with atomic_write(staging / MANIFEST, "w") as handle:
            json.dump(record, handle, indent=2, allow_nan=False)
        check_output_folder(out, kind=kind, model=model, sources=sources, force=force, replace_own=replace_own)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("%s output of %s written to %s", kind, model, out)
