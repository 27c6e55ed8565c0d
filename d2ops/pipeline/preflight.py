"""Launch checks: every input, split folder and device a config names, looked at before any task or transfer."""

from __future__ import annotations

from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ValidationError

from d2ops.config import (
    NULL_WORDS,
    DataConfig,
    ExperimentConfig,
    RuntimeConfig,
    has_uri_credentials,
    load_config,
)
from d2ops.data.validation import missing_split_fix
from d2ops.engine.d2config import detectron2_problems
from d2ops.storage import s3 as storage
from d2ops.storage.s3 import s3_problem

__all__ = ["device_problems", "input_problems", "launch_config", "launch_problems", "split_problems"]

Inputs = Literal["all", "s3", "none"]


def launch_config(
    path: str | Path, overrides: list[str] | None = None, *, inputs: Inputs = "all", device: bool | None = None
) -> ExperimentConfig:
    """Load, override and validate a config with the launch checks (:func:`launch_problems`): what
    ``d2ops pipeline`` and ``d2ops step`` run before any task or transfer. Every problem, the schema's and
    the checks', comes in one :class:`~d2ops.config.ConfigError`."""
    return load_config(path, overrides, checks=partial(launch_problems, inputs=inputs, device=device))


def launch_problems(
    raw: dict[str, Any], cfg: ExperimentConfig | None, *, inputs: Inputs = "all", device: bool | None = None
) -> list[str]:
    """The launch checks, one line per problem: model.zoo_config and every model.overrides key against
    detectron2's config, with the closest real key for a typo (:func:`~d2ops.engine.d2config.detectron2_problems`);
    the inputs (:func:`input_problems`: S3 objects, prefixes, the output bucket and, with ``inputs="all"``,
    local paths; ``"s3"`` when the steps run on agents, whose disks the paths name; ``"none"``); the split
    folders (:func:`split_problems`); and ``device``: runtime.device against this machine's GPUs (default:
    with ``inputs="all"``, where the steps run here). ``cfg`` is None when the schema refused ``raw``: each
    section valid by itself is still checked, beside the schema's errors."""
    problems = detectron2_problems(raw)
    if inputs == "none":
        return problems
    missing = input_problems(raw, local_paths=inputs == "all")
    problems += missing
    runtime = cfg.runtime if cfg is not None else _section(raw, "runtime", RuntimeConfig)
    if (inputs == "all" if device is None else device) and runtime is not None:  # the steps run here
        problems += device_problems(runtime)
    data = cfg.data if cfg is not None else _section(raw, "data", DataConfig)
    if data is not None and not any(line.startswith("data.source:") for line in missing):
        problems += split_problems(data, local_paths=inputs == "all")
    return problems


_S = TypeVar("_S", bound=BaseModel)


def _section(raw: dict[str, Any], name: str, model: type[_S]) -> _S | None:
    """One section alone, when it is valid by itself (the schema names its errors otherwise), so that its
    launch checks still run beside another section's errors."""
    try:
        return model.model_validate(raw.get(name) or {})
    except (ValidationError, TypeError):
        return None


def _raw_value(raw: Any, dotted: str) -> Any:
    node = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


#: The inputs checked at launch: key -> what must be there (a prefix with objects, an object, a bucket).
_INPUTS: dict[str, Literal["prefix", "object", "bucket"]] = {
    "data.source": "prefix",
    "model.weights": "object",
    "model.config_file": "object",
    "inference.source": "prefix",
    "clearml.output_uri": "bucket",
}


def input_problems(raw: Any, *, local_paths: bool = True) -> list[str]:
    """Every input that is not there, checked at launch before any transfer, one line each naming its key:
    data.source and inference.source (an S3 prefix with objects, or a folder), model.weights and
    model.config_file (an S3 object or a file), clearml.output_uri (its S3 bucket reachable).

    ``local_paths=False`` (steps that run on agents) checks S3 only: a path names the worker's disk.
    Works on the raw dict, so it runs beside the schema's errors; data.source is not checked when
    data.dataset_id names a ClearML Dataset to train on instead.
    """
    problems: list[str] = []
    for key, want in _INPUTS.items():
        value = _raw_value(raw, key)
        if not isinstance(value, str) or not value.strip() or value.strip() in NULL_WORDS:
            continue
        if key == "data.source" and isinstance(_raw_value(raw, "data.dataset_id"), str):
            continue
        if has_uri_credentials(value):
            continue  # the schema refuses it
        if value.lower().startswith("s3://"):
            problem = s3_problem(value, want)
            if problem:
                problems.append(f"{key}: {problem}")
        elif local_paths and ("://" not in value or value.startswith("file://")):
            path = Path(value.removeprefix("file://")).expanduser()
            if want == "bucket":
                continue  # a local output folder is created
            if want == "prefix" and not path.is_dir():
                problems.append(f"{key}: folder {value} does not exist{'' if not path.exists() else ' (a file)'}")
            elif want == "object" and not path.is_file():
                problems.append(f"{key}: file {value} does not exist")
    return problems


def split_problems(data: DataConfig, *, local_paths: bool = True) -> list[str]:
    """Each split folder that data.source lacks, found at launch (one small S3 listing per split, or a look
    at the folder) and named with the fix, before anything is downloaded.

    Says nothing when data.source itself cannot be read (:func:`input_problems` names that), or when the
    dataset is a ClearML Dataset (``data.dataset_id``). A split at the root itself (``train: .``) is there.
    """
    if data.dataset_id or not data.source:
        return []
    source = data.source
    splits: dict[str, str] = {str(role): folder for role, folder in data.splits.items()}
    folders = {
        role: tuple(p for p in PurePosixPath(folder).parts if p not in (".", "/"))
        for role, folder in data.folders.items()
    }
    if source.lower().startswith("s3://"):
        try:
            loc = storage.parse_s3_uri(source)
            prefix = loc.prefix if not loc.prefix or loc.prefix.endswith("/") else f"{loc.prefix}/"
            client = storage.make_s3_client(loc, max_pool_connections=2)

            def listed(sub: str, keys: int, **kwargs: Any) -> Any:
                return client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix + sub, MaxKeys=keys, **kwargs)

            missing = [
                r for r, parts in folders.items() if parts and not listed("/".join(parts) + "/", 1).get("KeyCount")
            ]
            if not missing:
                return []
            top = listed("", 1000, Delimiter="/")  # the first page of what data.source holds, for the fix
            present = [p["Prefix"][len(prefix) :].rstrip("/") for p in top.get("CommonPrefixes", [])]
        except (storage.StorageError, BotoCoreError, ClientError, ValueError):
            return []  # unreachable: input_problems says so, and the download step would too
    elif local_paths and ("://" not in source or source.startswith("file://")):
        root = Path(source.removeprefix("file://")).expanduser()
        if not root.is_dir():
            return []
        missing = [role for role, parts in folders.items() if parts and not root.joinpath(*parts).is_dir()]
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        return []
    return [
        f"data.splits.{role}: the {role} split folder {splits[role]!r} is not in {source}; fix: "
        f"{missing_split_fix(role, splits, source, present)}"
        for role in missing
    ]


def device_problems(runtime: RuntimeConfig) -> list[str]:
    """runtime.device and runtime.num_gpus against this machine's CUDA devices, for a launch whose steps run
    here (``--offline``, ``--local``): a shipped cluster config says ``device: cuda``, which a laptop lacks."""
    import torch

    visible = torch.cuda.device_count()
    where = "this machine sees no CUDA device" if not visible else f"this machine sees {visible} CUDA device(s)"
    if runtime.device == "cuda" and not visible:
        return [f"runtime.device: cuda, but {where} and the steps run here: --set runtime.device=cpu (or auto)"]
    if runtime.device != "cpu" and runtime.num_gpus > max(visible, 1):
        return [
            f"runtime.num_gpus: {runtime.num_gpus}, but {where} and the steps run here: "
            f"--set runtime.num_gpus={max(visible, 1)}, or --set runtime.device=cpu for CPU processes"
        ]
    return []
