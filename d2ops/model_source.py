"""Resolve "a model" as users name it into a local bundle folder.

Accepted forms of ``M``:
- a bundle folder (``model_final.pth``, ``config.yaml``, ``labels.json``), or a bundle ``.zip``;
- an ``s3://`` URI of a bundle prefix or of a bundle zip;
- a ClearML model id (32 hex characters);
- ``clearml://<project>/<name>[@<tag>]``: the newest *published* ClearML model with that name (and tag).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from d2ops import storage

__all__ = [
    "ModelNotFoundError",
    "ModelRef",
    "ModelRegistryClient",
    "model_registry",
    "parse_model_ref",
    "resolve_model",
    "use_model_registry",
]

log = logging.getLogger(__name__)

_MODEL_ID = re.compile(r"^[0-9a-f]{32}$")
_REQUIRED = ("model_final.pth", "config.yaml", "labels.json")


class ModelNotFoundError(FileNotFoundError):
    """``M`` names no loadable bundle; the message says which forms are accepted."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: exactly one of path / s3 / model_id / (project, name) is set."""

    kind: str  # "path" | "s3" | "clearml_id" | "clearml_query"
    value: str
    project: str | None = None
    name: str | None = None
    tag: str | None = None


def parse_model_ref(ref: str) -> ModelRef:
    """Classify a model reference string (no I/O)."""
    if ref.startswith("clearml://"):
        body, _, tag = ref.removeprefix("clearml://").partition("@")
        project, _, name = body.rpartition("/")
        if not project or not name:
            raise ModelNotFoundError(f"{ref!r}: expected clearml://<project>/<name>[@<tag>]")
        return ModelRef("clearml_query", ref, project=project, name=name, tag=tag or None)
    if storage.is_s3_uri(ref):
        return ModelRef("s3", ref)
    if _MODEL_ID.match(ref) and not Path(ref).exists():
        return ModelRef("clearml_id", ref)
    return ModelRef("path", ref)


def _check_bundle(folder: Path, ref: str) -> Path:
    missing = [name for name in _REQUIRED if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{ref} is not a d2ops model bundle (missing {', '.join(missing)}); "
            "pass a bundle folder or zip, an s3:// URI, a ClearML model id or clearml://<project>/<name>[@<tag>]"
        )
    return folder


def _extract(archive: Path, cache_dir: Path) -> Path:
    """Unzip a bundle into a folder named by the archive's content hash (atomic, reused)."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    target = cache_dir / f"bundle-{digest}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
    except (zipfile.BadZipFile, OSError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelNotFoundError(f"{archive} is not a readable bundle zip: {err}") from None
    try:
        staging.replace(target)
    except OSError:
        # Another process extracted the same archive first: its copy is identical, use it.
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def _local(path: Path, ref: str, cache_dir: Path) -> Path:
    if path.is_file() and path.suffix == ".zip":
        return _check_bundle(_extract(path, cache_dir), ref)
    if path.is_dir():
        return _check_bundle(path, ref)
    raise ModelNotFoundError(f"model {ref} does not exist")


class ModelRegistryClient(Protocol):
    """What resolving ``clearml://`` references and ClearML model ids needs from a model registry.

    The ClearML implementation lives in :mod:`d2ops.clearml.models` and is installed by
    :func:`d2ops.clearml.install` (the CLI does this at start), so this layer never imports ClearML.
    """

    def local_copy(self, ref: ModelRef) -> Path:
        """Download the registered bundle (zip or folder) of ``ref``; raise :class:`ModelNotFoundError`."""
        ...

    def newest_id(self, ref: ModelRef) -> str | None:
        """The id of the newest published model matching a ``clearml_query`` ref, or None."""
        ...


_registry: ModelRegistryClient | None = None


def use_model_registry(client: ModelRegistryClient | None) -> None:
    """Install the client that resolves ClearML model references (``None`` removes it)."""
    global _registry
    _registry = client


def model_registry() -> ModelRegistryClient:
    """The installed model registry client; a clear error where there is none."""
    if _registry is None:
        raise ModelNotFoundError(
            "ClearML model references need the ClearML integration: call d2ops.clearml.install() first "
            "(the d2ops command does), or pass a bundle folder, zip or s3:// URI"
        )
    return _registry


def resolve_model(ref: str, cache_dir: Path | str = "outputs/cache/models") -> Path:
    """A local bundle folder for ``ref`` (downloading and unzipping as needed, cached)."""
    cache_dir = Path(cache_dir)
    parsed = parse_model_ref(ref)
    if parsed.kind == "path":
        return _local(Path(ref).expanduser(), ref, cache_dir)
    if parsed.kind == "s3":
        dest = cache_dir / ("s3-" + hashlib.sha256(ref.encode()).hexdigest()[:16])
        return _local(storage.resolve_local(ref, dest, progress=False), ref, cache_dir)
    local = model_registry().local_copy(parsed)
    return _local(local, ref, cache_dir) if local.suffix == ".zip" else _check_bundle(local, ref)
