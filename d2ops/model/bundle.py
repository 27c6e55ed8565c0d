"""The model bundle: the one owner of its file names, its checks, its version and its zip.

A bundle is a folder::

    model_final.pth   detectron2 weights
    config.yaml       the detectron2 config the model was trained with
    labels.json       class names, in the model's class-index order
    metrics.json      evaluation metrics (optional for loading)
    metadata.json     who built it, from what, and the sha256 of each file above (optional for loading)

An exported bundle (``d2ops export onnx|torchscript|openvino``, :mod:`d2ops.model.export`) adds each runtime's
graph (``model.onnx``, ``model.ts``, ``model.xml`` + ``model.bin``), listed with their sha256 under
``metadata.json``'s ``runtimes``; it keeps the model's version (``model_version``): the same model, run faster.

Every other module reaches these files through :class:`ModelBundle`. It imports neither torch nor
detectron2 at module level, so anything that only describes a bundle stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import d2ops
from d2ops.utils import jsonio
from d2ops.utils.files import atomic_write

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

__all__ = [
    "BundleError",
    "InconsistentBundleError",
    "ModelBundle",
    "ModelNotFoundError",
    "ReferenceMismatchError",
    "build_bundle",
    "code_version",
    "sha256_file",
    "zip_bundle",
]

MIB = 1024 * 1024


class ModelNotFoundError(FileNotFoundError):
    """The model reference does not lead to a usable bundle; the message says what to pass instead."""


BundleError = ModelNotFoundError


class InconsistentBundleError(ModelNotFoundError):
    """The bundle's files are not the set its metadata.json names: it is being replaced, or was edited by hand."""


class ReferenceMismatchError(ModelNotFoundError):
    """An exported graph does not give the detections recorded beside it at export time: its bytes changed."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(4 * MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelBundle:
    """A bundle folder. Build one with :meth:`open` (checks it) or :meth:`write` (creates it atomically)."""

    path: Path

    WEIGHTS = "model_final.pth"
    CONFIG = "config.yaml"
    LABELS = "labels.json"
    METRICS = "metrics.json"
    METADATA = "metadata.json"
    #: Every file of a bundle, in the order they are hashed for the version.
    FILES = (WEIGHTS, CONFIG, LABELS, METRICS, METADATA)
    #: What a bundle needs to be loaded.
    REQUIRED = (WEIGHTS, CONFIG, LABELS)
    #: Files whose sha256 metadata.json records, so a half-replaced bundle is never loaded.
    HASHED = (WEIGHTS, CONFIG, LABELS, METRICS)

    # ------------------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, ref: str | None = None) -> ModelBundle:
        """The bundle at ``path``; :class:`ModelNotFoundError` naming ``ref`` when files are missing."""
        folder = Path(path)
        ref = ref or str(path)
        if not folder.is_dir():
            raise ModelNotFoundError(f"model {ref} does not exist (pass a bundle folder or zip)")
        missing = [name for name in cls.REQUIRED if not (folder / name).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{ref} is not a d2ops model bundle (missing {', '.join(missing)}); pass a bundle folder or zip, "
                "an s3:// URI, a ClearML model id or clearml://<project>/<name>[@<tag>]"
            )
        unreadable = [name for name in cls.REQUIRED if not os.access(folder / name, os.R_OK)]
        if unreadable:
            raise ModelNotFoundError(
                f"{ref}: {', '.join(unreadable)} cannot be read by this user (uid {os.getuid()}); "
                "make the bundle readable, e.g. chmod -R a+rX on the folder"
            )
        return cls(folder)

    @classmethod
    def find(cls, path: str | Path) -> Path:
        """Where the bundle is in a downloaded model: the folder itself, or its only bundle subfolder."""
        local = Path(path)
        if local.is_dir() and not (local / cls.WEIGHTS).is_file():
            inner = [p for p in local.iterdir() if p.is_dir() and (p / cls.WEIGHTS).is_file()]
            if len(inner) == 1:
                return inner[0]
        return local

    @classmethod
    def extract(cls, archive: Path, cache_dir: Path) -> Path:
        """Unzip a bundle zip into ``cache_dir/bundle-<content hash>`` (atomic, reused); returns the folder."""
        digest = sha256_file(archive)[:16]
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
        staging.chmod(0o755)  # mkdtemp makes 0700; a server running as another user must read it
        try:
            staging.replace(target)
        except OSError:
            # Another process extracted the same archive first: its copy is identical, use it.
            shutil.rmtree(staging, ignore_errors=True)
            if not target.is_dir():
                raise
        return target

    # ----------------------------------------------------------------------------------- contents

    def file(self, name: str) -> Path:
        if name not in self.FILES:
            raise KeyError(f"{name} is not a bundle file ({', '.join(self.FILES)})")
        return self.path / name

    @property
    def weights(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    def files(self) -> Iterator[Path]:
        """The bundle files present, in :attr:`FILES` order, then the exported runtimes' files."""
        names = [*self.FILES, *(name for entry in self.runtimes().values() for name in entry.get("files", {}))]
        return (self.path / n for n in dict.fromkeys(names) if (self.path / n).is_file())

    def runtimes(self) -> dict[str, dict[str, Any]]:
        """The exported runtimes recorded in metadata.json (``{"onnx": {"file": "model.onnx", ...}}``)."""
        runtimes = self.metadata().get("runtimes")
        if not isinstance(runtimes, Mapping):
            return {}
        return {str(k): dict(v) for k, v in runtimes.items() if isinstance(v, Mapping) and "file" in v}

    def labels(self) -> list[str]:
        labels = self._json(self.LABELS, None)
        if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
            raise ModelNotFoundError(f"{self.path / self.LABELS} must be a JSON list of class names")
        return labels

    def metrics(self) -> dict[str, Any]:
        return self._dict(self.METRICS)

    def metadata(self) -> dict[str, Any]:
        return self._dict(self.METADATA)

    def segments(self) -> bool:
        """Whether the model predicts instance masks (``MODEL.MASK_ON``), read without detectron2."""
        import yaml

        config = yaml.safe_load(self.config_file.read_text()) or {}
        return bool((config.get("MODEL") or {}).get("MASK_ON"))

    def version(self) -> str:
        """A content hash of the bundle files: equal files, equal version. An exported bundle keeps the version
        of the bundle it was exported from (``model_version`` in metadata.json): it is the same model."""
        exported_from = self.metadata().get("model_version")
        if isinstance(exported_from, str) and exported_from:
            return exported_from
        digest = hashlib.sha256()
        for path in self.files():
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(4 * MIB), b""):
                    digest.update(chunk)
        return digest.hexdigest()[:12]

    @property
    def hashed(self) -> bool:
        """Whether metadata.json records the sha256 of each file (bundles built before d2ops did have none)."""
        return isinstance(self.metadata().get("files"), Mapping)

    def hashes(self) -> dict[str, str]:
        """The sha256 of every bundle file present, computed now (what an unhashed bundle is compared by)."""
        return {path.name: sha256_file(path) for path in self.files()}

    def verify(self) -> None:
        """Raise :class:`InconsistentBundleError` when a file differs from the sha256 metadata.json records.

        Bundles written before d2ops recorded the hashes have none to check, and pass.
        """
        recorded = self.metadata().get("files")
        if not isinstance(recorded, Mapping):
            return
        recorded = {
            **{name: digest for name, digest in recorded.items() if name in self.HASHED},
            **{name: digest for entry in self.runtimes().values() for name, digest in entry.get("files", {}).items()},
        }
        changed = [
            name
            for name, digest in recorded.items()
            if not (self.path / name).is_file() or sha256_file(self.path / name) != digest
        ]
        if changed:
            raise InconsistentBundleError(
                f"{self.path}: {', '.join(changed)} differ from what metadata.json records; the bundle is being "
                "replaced (or was edited by hand) and is not loaded until its files match again"
            )

    def zip(self, archive: Path | None = None) -> Path:
        """A zip of the bundle files (default: beside the folder, ``<folder>.zip``), written atomically."""
        archive = archive or self.path.with_name(self.path.name + ".zip")  # a dotted name keeps its dot
        archive.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(archive, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in self.files():
                zf.write(path, path.name)
        return archive

    def copy_to(self, dest: Path) -> ModelBundle:
        """Copy the bundle files into ``dest`` (created)."""
        dest.mkdir(parents=True, exist_ok=True)
        for path in self.files():
            shutil.copy2(path, dest / path.name)
        return ModelBundle(dest)

    # ------------------------------------------------------------------------------------ writing

    @classmethod
    def write(
        cls,
        out_dir: Path,
        *,
        weights: Path,
        d2_config: Path,
        labels: list[str],
        metrics: dict[str, Any],
        metadata: dict[str, Any],
    ) -> ModelBundle:
        """Write a bundle folder atomically (built beside ``out_dir``, then renamed into place).

        metadata.json gets ``created`` and the sha256 of every other file under ``files``.
        """
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes 0700: a serving image running as another user could not read it
            shutil.copy2(weights, staging / cls.WEIGHTS)
            shutil.copy2(d2_config, staging / cls.CONFIG)
            (staging / cls.LABELS).write_text(jsonio.dumps(labels))
            (staging / cls.METRICS).write_text(jsonio.dumps(metrics, indent=2))
            meta = {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **metadata,
                "files": {name: sha256_file(staging / name) for name in cls.HASHED},
            }
            (staging / cls.METADATA).write_text(jsonio.dumps(meta, indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(out_dir)

    # ------------------------------------------------------------------------------------ helpers

    def _json(self, name: str, default: Any) -> Any:
        path = self.path / name
        if not path.is_file():
            return default
        try:
            return json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelNotFoundError(f"{path} is not valid JSON ({err})") from None

    def _dict(self, name: str) -> dict[str, Any]:
        data = self._json(name, {})
        return data if isinstance(data, dict) else {"value": data}


def code_version() -> str:
    """The git commit of the working tree (with ``-dirty``), or the package version outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"d2ops-{d2ops.__version__}"


def build_bundle(
    out_dir: Path,
    *,
    weights: Path,
    d2_config: Path,
    labels: list[str],
    metrics: dict[str, Any],
    metadata: dict[str, Any],
) -> Path:
    """Write a bundle folder atomically (:meth:`ModelBundle.write`), recording the code that built it."""
    meta = {"code_version": code_version(), "d2ops_version": d2ops.__version__, **metadata}
    bundle = ModelBundle.write(out_dir, weights=weights, d2_config=d2_config, labels=labels, metrics=metrics,
                               metadata=meta)  # fmt: skip
    log.info("model bundle written to %s", bundle.path)
    return bundle.path


def zip_bundle(bundle_dir: Path) -> Path:
    """A zip of the bundle beside it (what gets uploaded as the registered model's weights)."""
    return ModelBundle(Path(bundle_dir)).zip()
