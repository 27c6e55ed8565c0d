"""Images that sit in more than one split, found by content hash before any training.

A validation or test image that is also a training image makes every score on that split too high,
and nothing downstream can tell. Exports re-uploaded under new names, or merged by hand, carry such
images silently; they are found here by the sha256 of the file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SharedImage", "image_digests", "inside_split", "listed_images", "shared_images"]

_HASH_THREADS = 8


@dataclass(frozen=True)
class SharedImage:
    """One image content found in several splits: ``(role, path relative to the dataset root)`` each."""

    digest: str
    places: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return " = ".join(f"{role} {path}" for role, path in self.places)


def listed_images(split_dir: Path, annotation_file: str, fmt: str) -> list[str]:
    """The image files the split's annotation file names (empty when it cannot be read: validation says why)."""
    try:
        data: Any = json.loads((split_dir / annotation_file).read_text())
        if fmt == "coco":
            return [str(image["file_name"]) for image in data["images"]]
        return [str(entry["filename"]) for entry in data.values()]
    except (OSError, ValueError, RecursionError, TypeError, KeyError, AttributeError):
        return []


def inside_split(split_dir: Path, name: str) -> bool:
    """Whether a listed file name stays inside its split folder, so it may be opened: never what a hostile
    ``file_name`` points at (``..``, an absolute path; a NUL byte cannot even be resolved)."""
    return "\x00" not in name and (split_dir / name).resolve().is_relative_to(split_dir.resolve())


#: (path, size, mtime) -> sha256, so that the checks of one process (validation, the carve of each split
#: registration) hash an unchanged file once
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _digest(path: Path) -> str | None:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return None  # a FIFO or device would block or never end: the validator reports it
        key = (str(path), info.st_size, info.st_mtime_ns)
        if key not in _DIGESTS:
            with path.open("rb") as handle:
                _DIGESTS[key] = hashlib.file_digest(handle, "sha256").hexdigest()
        return _DIGESTS[key]
    except OSError:
        return None  # missing or unreadable: the validator reports it


def image_digests(paths: list[Path]) -> list[str | None]:
    """The sha256 of each file's bytes (None where it cannot be read), hashed on a few threads."""
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        return list(pool.map(_digest, paths))


def shared_images(root: Path, splits: Mapping[str, str], annotation_file: str, fmt: str) -> list[SharedImage]:
    """Every image content that appears in more than one split (byte-identical files), in split order."""
    listed: list[tuple[str, Path]] = []
    for role, folder in splits.items():
        split_dir = root / folder
        if split_dir.is_dir():
            for name in listed_images(split_dir, annotation_file, fmt):
                if inside_split(split_dir, name):
                    listed.append((role, split_dir / name))
    digests = image_digests([path for _, path in listed])
    places: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (role, path), digest in zip(listed, digests, strict=True):
        if digest is not None:
            places[digest].append((role, path.relative_to(root).as_posix()))
    return [
        SharedImage(digest, tuple(where)) for digest, where in places.items() if len({role for role, _ in where}) > 1
    ]
