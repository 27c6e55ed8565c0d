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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from d2ops.model.bundle import ModelBundle, ModelNotFoundError

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
    if ref.startswith("s3://"):
        return ModelRef("s3", ref)
    if _MODEL_ID.match(ref) and not Path(ref).exists():
        return ModelRef("clearml_id", ref)
    return ModelRef("path", ref)


def _check_bundle(folder: Path, ref: str) -> Path:
    return ModelBundle.open(folder, ref).path


def _local(path: Path, ref: str, cache_dir: Path) -> Path:
    if path.is_file() and path.suffix == ".zip":
        return _check_bundle(ModelBundle.extract(path, cache_dir), ref)
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
        # lazy: boto3; serving a local bundle never loads it
        from d2ops.storage import s3 as storage

        dest = cache_dir / ("s3-" + hashlib.sha256(ref.encode()).hexdigest()[:16])
        return _local(storage.resolve_local(ref, dest, progress=False), ref, cache_dir)
    local = model_registry().local_copy(parsed)
    return _local(local, ref, cache_dir) if local.suffix == ".zip" else _check_bundle(local, ref)
