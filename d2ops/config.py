"""The experiment config: one YAML file, validated into a typed schema at load time.

The schema is deliberately strict (unknown keys are errors) so that a typo in a config
fails before any data is fetched or GPU time is spent. The detectron2 part stays in
detectron2's own vocabulary: ``model.overrides`` holds detectron2 keys verbatim.

Credentials never live here: S3 keys come from the environment or clearml.conf.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from d2ops.config_secrets import (
    DOCKER_ARGS_ADVICE,
    docker_args_credentials,
    has_uri_credentials,
    is_secret_name,
    uri_userinfo,
)

__all__ = [
    "NULL_WORDS",
    "ConfigError",
    "ExperimentConfig",
    "LaunchChecks",
    "apply_overrides",
    "check_overrides",
    "config_hash",
    "has_uri_credentials",
    "load_config",
    "uri_userinfo",
]

# Which names and values are credentials (they would end up as ClearML hyperparameters): d2ops.config_secrets.
_HIDDEN = "<not shown: it may hold credentials>"
_KEY_ADVICE = "use the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or clearml.conf"
_URI_ADVICE = (
    "a URI with credentials in it (scheme://user:password@host) is not allowed in a config "
    "(it becomes ClearML hyperparameters and logs); remove them from the URI and put them in the "
    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or in clearml.conf (sdk.aws.s3.credentials)"
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


#: Checks beside the schema's: ``checks(raw, cfg)`` -> one line per problem (``cfg`` is None when the schema
#: refused the config, so the checks still run beside its errors); see :mod:`d2ops.pipeline.preflight`.
LaunchChecks = Callable[[dict[str, Any], "ExperimentConfig | None"], list[str]]


def _dotted(path: tuple[str | int, ...]) -> str:
    """``("model", "overrides", "MODEL.WEIGHTS")`` -> model.overrides.MODEL.WEIGHTS; list items as [i]."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _show_key(key: object) -> str | int:
    """A key as an error message may name it (a key that is itself a URI with credentials is not named)."""
    if isinstance(key, int):
        return key
    return "<a key holding a URI with credentials>" if has_uri_credentials(key) else str(key)


def _credentials_in(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(path, "key" | "uri") of every credential-looking key and every URI with credentials in ``value``."""
    if has_uri_credentials(value):
        yield path, "uri"
    elif isinstance(value, dict):
        for key, item in value.items():
            if has_uri_credentials(key):
                yield (*path, _show_key(key)), "uri"
            elif is_secret_name(key):
                yield (*path, str(key)), "key"
            else:
                yield from _credentials_in(item, (*path, str(key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _credentials_in(item, (*path, index))


def _masked(value: Any) -> Any:
    """``value`` as an error message may show it: credential-looking keys' values and URIs with
    credentials replaced, at any depth."""
    if has_uri_credentials(value):
        return _HIDDEN
    if isinstance(value, dict):
        return {_show_key(key): _HIDDEN if is_secret_name(key) else _masked(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_masked(item) for item in value)
    return value


def _sensitive_strings(value: Any, under_secret_key: bool = False) -> set[str]:
    """Every string in ``value`` that no message may contain: values of credential-looking keys,
    URIs with credentials, their userinfo and its parts."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            found |= _sensitive_strings(key)  # a key is sensitive only as a URI with credentials
            found |= _sensitive_strings(item, under_secret_key or is_secret_name(key))
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            found |= _sensitive_strings(item, under_secret_key)
    elif isinstance(value, str) or (under_secret_key and value is not None and not isinstance(value, bool)):
        text = str(value)
        if under_secret_key:
            found.add(text)
        for userinfo in uri_userinfo(text):
            found |= {text, userinfo, *userinfo.split(":", 1)}
    return {text for text in found if len(text) >= 3}


def _scrubbed(message: str, *sources: Any) -> str:
    """``message`` with every sensitive string of ``sources`` (see :func:`_sensitive_strings`) removed."""
    for text in sorted(set().union(*(_sensitive_strings(s) for s in sources)), key=len, reverse=True):
        message = message.replace(text, _HIDDEN)
    return message


# The strings a user writes for "nothing" where YAML's own null (null, ~, empty) was meant: ``--set
# model.weights=None`` reaches the schema as the string "None". A quoted "~" stays a string (a home folder).
NULL_WORDS = frozenset({"None", "none", "NONE", "null", "Null", "NULL"})


def _admits_none(annotation: Any) -> bool:
    """Whether a field's type is ``X | None`` (or ``Optional[X]``, or ``Any``)."""
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_none(arg) for arg in typing.get_args(annotation))
    return False


@cache
def _nullable_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, field in model.model_fields.items() if _admits_none(field.annotation))


class _Strict(BaseModel):
    # hide_input_in_errors: a ValidationError printed as it is never shows a rejected value (it may
    # hold a credential); parse_config's own messages show them masked.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        """No field, at any depth, holds a credential-looking key or a URI with credentials.

        The error names where (relative to the field) and never the value.
        """
        for path, kind in _credentials_in(value):
            message = _URI_ADVICE if kind == "uri" else f"credentials are not allowed in a config; {_KEY_ADVICE}"
            raise PydanticCustomError("credentials_in_config", message, {"where": _dotted(path)})
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _null_words(cls, value: Any, info: ValidationInfo) -> Any:
        """``None`` and ``null`` mean null for every nullable key, as YAML's own null and ``~`` do, in YAML
        files and in ``--set`` (where YAML reads ``None`` as a string); a key that cannot be null says so,
        with its default."""
        word = isinstance(value, str) and value.strip() in NULL_WORDS
        if value is not None and not word:
            return value
        name = info.field_name or ""
        if name in _nullable_fields(cls):
            return None
        field = cls.model_fields.get(name)
        default = None if field is None or field.is_required() else field.get_default(call_default_factory=True)
        default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        if field is None or field.is_required():
            raise PydanticCustomError("not_nullable", "cannot be null: this key is required, give it a value")
        raise PydanticCustomError(
            "not_nullable",
            f"cannot be null: give it a value, or leave the key out for its default ({_masked(default)!r})",
        )


SplitRole = Literal["train", "val", "test"]


def _default_splits() -> dict[SplitRole, str]:
    return {"train": "train", "val": "valid", "test": "test"}


class DataConfig(_Strict):
    """Where the dataset lives and how it is laid out."""

    source: str = Field(description="s3://host:port/bucket/prefix, s3://bucket/prefix or a local folder")
    format: Literal["coco", "via"] = "coco"
    annotation_file: str = Field(
        default="_annotations.coco.json",
        description="annotation file in each split folder (_annotations.coco.json, via_region_data.json)",
    )
    splits: dict[SplitRole, str] = Field(
        default_factory=_default_splits,
        description="split role -> sub-folder of the dataset root",
    )
    class_names: list[str] | None = Field(
        default=None, description="VIA only: the class list (single-class datasets name their one class)"
    )
    label_attribute: str | None = Field(
        default=None, description="VIA only: the region attribute holding the class name; null = single class"
    )
    cache_dir: str = Field(default="outputs/cache/datasets", description="local download cache")
    val_fraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="carve the val split from train (this fraction of its images, seeded) for datasets without one; "
        "data.splits.val is then not read",
    )
    val_seed: int = Field(default=0, description="the seed of the val_fraction split: same seed, same split")
    duplicate_images: Literal["error", "warn"] = Field(
        default="error",
        description="an image byte-identical in two splits: error (default) or warn and train anyway",
    )
    dataset_id: str | None = Field(
        default=None,
        description="a ClearML Dataset version to train on (set by the on-data trigger); null = data.source",
    )
    register_dataset: bool = Field(
        default=False,
        description="register the downloaded S3 data as a ClearML Dataset that links (not copies) the objects",
    )

    @property
    def folders(self) -> dict[str, str]:
        """Split role -> folder, for the splits that are folders (not val when it is carved from train)."""
        return {role: folder for role, folder in self.splits.items() if role != "val" or self.val_fraction is None}

    @model_validator(mode="after")
    def _check_splits(self) -> DataConfig:
        if "train" not in self.splits:
            raise ValueError("data.splits must name the 'train' folder")
        if "val" not in self.splits and self.val_fraction is None:
            raise ValueError(
                "data.splits must name the 'val' folder, or set data.val_fraction (e.g. 0.1) to carve one from train"
            )
        if self.format == "via" and not self.class_names:
            raise ValueError("data.class_names is required for format 'via' (e.g. [balloon])")
        return self


class ModelConfig(_Strict):
    """The detectron2 architecture, its initial weights and detectron2-key overrides."""

    zoo_config: str | None = Field(
        default=None, description="detectron2 model-zoo config, e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"
    )
    config_file: str | None = Field(default=None, description="a detectron2 config file (local path or s3://)")
    weights: str | None = Field(default=None, description="initial weights: s3://..., a local path, or null")
    overrides: dict[str, Any] = Field(default_factory=dict, description="detectron2 keys, e.g. MODEL.RESNETS.DEPTH: 18")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if bool(self.zoo_config) == bool(self.config_file):
            raise ValueError("set exactly one of model.zoo_config or model.config_file")
        return self

    @field_validator("overrides")
    @classmethod
    def _detectron2_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            head = key.split(".")[0]
            if not head or head != head.upper():
                raise ValueError(
                    f"model.overrides key {key!r} is not a detectron2 key (upper case, e.g. MODEL.RPN.NMS_THRESH)"
                )
        return value


class SolverConfig(_Strict):
    """Optimisation settings, mapped onto detectron2's SOLVER/DATALOADER/TEST keys."""

    max_iter: int = Field(default=1000, gt=0)
    ims_per_batch: int = Field(default=4, gt=0)
    base_lr: float = Field(default=0.0025, gt=0)
    warmup_iters: int = Field(default=100, ge=0)
    steps: list[int] = Field(default_factory=list, description="iterations at which the lr drops by 10x")
    checkpoint_period: int = Field(default=500, gt=0)
    eval_period: int = Field(default=0, ge=0, description="periodic evaluation on val; 0 = only at the end")
    num_workers: int = Field(default=2, ge=0)
    seed: int = 42

    @model_validator(mode="after")
    def _steps_inside(self) -> SolverConfig:
        bad = [s for s in self.steps if not 0 < s < self.max_iter]
        if bad:
            raise PydanticCustomError(
                "steps_outside",
                "{bad} must lie strictly between 0 and solver.max_iter ({max_iter})",
                {"bad": bad, "steps": list(self.steps), "max_iter": self.max_iter},
            )
        return self


class EvalConfig(_Strict):
    """How the evaluate step scores a model."""

    score_threshold: float = Field(default=0.5, ge=0, le=1, description="for precision/recall/F-beta")
    iou_threshold: float = Field(default=0.5, gt=0, lt=1, description="match IoU for precision/recall/F-beta")
    f_beta: float = Field(default=2.0, gt=0)
    split: Literal["val", "test"] = "test"


class InferenceConfig(_Strict):
    """Batch inference over a folder or S3 prefix."""

    source: str | None = Field(default=None, description="folder or s3:// prefix; null = the eval split's images")
    score_threshold: float = Field(default=0.5, ge=0, le=1)
    debug_images: int = Field(default=8, ge=0, description="how many raw/drawn image pairs to report")
    runtime: Literal["auto", "pytorch", "torchscript", "onnx", "openvino"] = Field(
        default="pytorch",
        description="pytorch: the trained model as is; auto: on the CPU, exported to ONNX and OpenVINO (where "
        "installed) and the fastest measured beside PyTorch (eager included) predicts, on CUDA eager PyTorch; a "
        "runtime named is exported in the step; every export is checked against PyTorch on the source's first images "
        "before it predicts",
    )


class QualityGate(_Strict):
    metric: str = Field(default="bbox.AP50", description="a key of the evaluation metrics, e.g. bbox.AP50 or f2")
    min_value: float = 0.0


_METRIC_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_TAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


class ChampionGate(_Strict):
    """Champion/challenger: a candidate replaces the production model only if it beats it by a margin.

    Both models are evaluated on the same split by the same code in the register step; the
    absolute ``quality_gate`` still applies as a floor.
    """

    enabled: bool = Field(default=True, description="false = only the absolute quality_gate decides")
    metric: str = Field(default="bbox.AP", description="the metric both models are compared on, e.g. bbox.AP or f2")
    min_improvement: float = Field(
        default=0.0, ge=0, description="how much the candidate must beat the champion by (metric units); ties never win"
    )
    tag: str = Field(default="production", description="the tag that marks the current champion")
    retired_tag: str = Field(
        default="production-retired", description="a replaced champion's tag (plus <retired_tag>-<UTC date>)"
    )

    @field_validator("metric")
    @classmethod
    def _metric_name(cls, value: str) -> str:
        if not _METRIC_NAME.match(value):
            raise ValueError("must be a dotted metric name such as bbox.AP, bbox.AP50 or f2")
        return value

    @field_validator("tag", "retired_tag")
    @classmethod
    def _tag_name(cls, value: str) -> str:
        if not _TAG_NAME.match(value):
            raise ValueError("must be a tag of letters, digits and _.:- (no spaces), e.g. production")
        return value

    @model_validator(mode="after")
    def _distinct_tags(self) -> ChampionGate:
        if self.tag == self.retired_tag:
            raise ValueError(f"registry.champion.retired_tag must differ from registry.champion.tag ({self.tag!r})")
        return self


#: In ``name``, ``registry.model_name`` and ``registry.tags``: the dataset's name, the last part of data.source.
DATASET_PLACEHOLDER = "{dataset}"


def _no_placeholder(value: Any) -> Any:
    """``{dataset}`` left in a name: data.source has no last part to fill it with."""
    if any(
        isinstance(text, str) and DATASET_PLACEHOLDER in text
        for text in (value if isinstance(value, list) else [value])
    ):
        raise PydanticCustomError(
            "dataset_placeholder",
            "{dataset} is the last part of data.source, which has none here: give the key a value, e.g. "
            "--set name=my-run --set registry.model_name=my-model --set registry.tags=[my-data]",
        )
    return value


class RegistryConfig(_Strict):
    model_name: str = "d2ops-detector"
    tags: list[str] = Field(default_factory=list)
    quality_gate: QualityGate = Field(default_factory=QualityGate)
    champion: ChampionGate = Field(default_factory=ChampionGate)
    local_dir: str = Field(
        default="outputs/registry",
        description="offline model registry: <local_dir>/<model_name>/ holds promoted bundles and the champion",
    )
    export: list[Literal["torchscript", "onnx", "openvino"]] = Field(
        default_factory=list,
        description="runtimes the registered bundle also carries (d2ops export, checked against PyTorch on the "
        "eval split before registration; a failed check fails the step), so `d2ops serve --runtime auto` and "
        "clearml-serving's Triton engine get them from the registry; [] registers the PyTorch bundle alone",
    )

    _placeholder = field_validator("model_name", "tags")(_no_placeholder)

    @field_validator("export")
    @classmethod
    def _export_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"registry.export names a runtime twice: {value}; list each once")
        return value

    @model_validator(mode="after")
    def _gate_tags_not_static(self) -> RegistryConfig:
        clash = {self.champion.tag, self.champion.retired_tag} & set(self.tags)
        if clash:
            raise ValueError(
                f"registry.tags must not contain {sorted(clash)}: the champion gate alone sets those tags "
                "(remove them from registry.tags)"
            )
        return self


warnings.filterwarnings("ignore", message='Field name "register" in "QueuesConfig"', category=UserWarning)


class QueuesConfig(_Strict):
    """One queue per step; ``controller`` runs the PipelineController itself."""

    controller: str = "services"
    download: str = "cpu"
    train: str = "gpu"
    evaluate: str = "gpu"
    infer: str = "gpu"
    register: str = "cpu"


def _no_secret_docker_args(value: str | None) -> str | None:
    """The one credential rule (:func:`d2ops.config_secrets.docker_args_credentials`): the error names
    each variable, never its value."""
    names = docker_args_credentials(value)
    if names:
        raise ValueError(f"docker arguments must not carry credentials ({', '.join(names)}): {DOCKER_ARGS_ADVICE}")
    return value


class StepExecution(_Strict):
    """How one pipeline step runs on a cluster (its queue is in ``clearml.queues``)."""

    docker_image: str | None = Field(default=None, description="null = clearml.docker_image")
    docker_args: str | None = Field(default=None, description="null = clearml.docker_args; never credentials")
    retries: int = Field(default=0, ge=0, le=10, description="re-runs after a failure (pre-emption, lost worker)")
    time_limit_min: float | None = Field(default=None, gt=0, description="abort and fail the step after this")

    _check_args = field_validator("docker_args")(_no_secret_docker_args)


StepName = Literal["download", "train", "evaluate", "infer", "register"]


def _default_step_execution() -> dict[StepName, StepExecution]:
    """GPU steps retry (pre-empted or lost workers); every step has a time limit."""
    return {
        "download": StepExecution(time_limit_min=60.0),
        "train": StepExecution(retries=2, time_limit_min=24 * 60.0),
        "evaluate": StepExecution(retries=2, time_limit_min=120.0),
        "infer": StepExecution(retries=2, time_limit_min=120.0),
        "register": StepExecution(time_limit_min=60.0),
    }


#: The training image when neither a config nor ``$D2OPS_IMAGE`` names one: docker/docker-compose.yml's own
#: fallback for ``${D2OPS_IMAGE}`` (a test keeps the two equal).
DEFAULT_DOCKER_IMAGE = "d2ops/detectron2:latest"


def default_docker_image() -> str:
    """``clearml.docker_image`` when a config leaves it unset: ``$D2OPS_IMAGE``, the variable docker/.env sets
    for the compose file's agents too (the one place the image's registry tag is written), else the default."""
    return os.environ.get("D2OPS_IMAGE", "").strip() or DEFAULT_DOCKER_IMAGE


class ClearMLConfig(_Strict):
    project: str = "d2ops"
    queues: QueuesConfig = Field(default_factory=QueuesConfig)
    docker_image: str = Field(
        default_factory=default_docker_image,
        description="unset: $D2OPS_IMAGE (docker/.env), else d2ops/detectron2:latest",
    )
    docker_args: str = Field(default="", description="extra docker arguments; never put credentials here")
    steps: dict[StepName, StepExecution] = Field(
        default_factory=_default_step_execution,
        description="per step: docker_image, docker_args, retries, time_limit_min (unset steps keep defaults)",
    )
    pool_frequency_s: float = Field(
        default=2.0, gt=0, le=60, description="how often the pipeline controller polls its steps"
    )
    pipeline_time_limit_min: float | None = Field(default=None, gt=0, description="abort the whole pipeline after")
    output_uri: str | None = Field(default=None, description="where checkpoints and models go (s3://..., path)")

    _check_args = field_validator("docker_args")(_no_secret_docker_args)

    @field_validator("steps", mode="before")
    @classmethod
    def _fill_steps(cls, value: Any) -> Any:
        """A config names only the steps and fields it changes; everything else keeps its default."""
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {name: ex.model_dump() for name, ex in _default_step_execution().items()}
        for name, given in value.items():
            given = given.model_dump(exclude_unset=True) if isinstance(given, StepExecution) else given
            merged[name] = {**merged.get(name, {}), **given} if isinstance(given, dict) else given
        return merged

    def step(self, name: str) -> StepExecution:
        """The effective execution settings of a step (image and args resolved)."""
        own = self.steps[name]  # type: ignore[index]
        return own.model_copy(
            update={
                "docker_image": own.docker_image or self.docker_image,
                "docker_args": self.docker_args if own.docker_args is None else own.docker_args,
            }
        )


class RuntimeConfig(_Strict):
    """Where and how the steps run: device, local folder, resuming, GPUs and machines for training."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "outputs/run"
    resume: bool = Field(
        default=True,
        description="continue from this run's last checkpoint (local or in clearml.output_uri); false = from scratch",
    )
    num_gpus: int = Field(
        default=1, ge=1, description="training processes per machine, one per GPU (device cpu: CPU processes, gloo)"
    )
    num_machines: int = Field(
        default=1, ge=1, description="machines for training; > 1 uses ClearML's Task.launch_multi_node on agents"
    )
    dist_port: int = Field(default=29500, gt=0, lt=65536, description="the master machine's port when num_machines > 1")
    resume_from: str | None = Field(
        default=None,
        description="continue another run's checkpoints (same training): its run key, or a checkpoint folder, "
        "S3 prefix or .pth of a d2ops run; logged and recorded as resumed_from in the bundle's lineage",
    )


def dataset_slug(source: str) -> str:
    """The dataset's name as ``{dataset}`` spells it: the last part of ``data.source``
    (``s3://minio:9000/datasets/aquarium/`` -> ``aquarium``), letters, digits and ``_.-`` only."""
    scheme, _, rest = source.rpartition("://")
    parts = [part for part in re.split(r"[/\\]", rest) if part and part != "."]
    if scheme and parts and ":" in parts[0]:
        parts = parts[1:]  # s3://host:port/bucket/prefix: the host is not the dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", parts[-1] if parts else "").strip("-.")


class ExperimentConfig(_Strict):
    """A whole experiment: the single source of truth for every step."""

    name: str = "experiment"
    data: DataConfig
    model: ModelConfig
    solver: SolverConfig = Field(default_factory=SolverConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    clearml: ClearMLConfig = Field(default_factory=ClearMLConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    _placeholder = field_validator("name")(_no_placeholder)

    @model_validator(mode="before")
    @classmethod
    def _dataset_names(cls, value: Any) -> Any:
        """``{dataset}`` in name, registry.model_name and registry.tags becomes the dataset's name
        (:func:`dataset_slug` of data.source), so a config shared across datasets (configs/roboflow.yaml)
        never registers one dataset's model under another's name."""
        if not isinstance(value, dict):
            return value
        given = value.get("registry")
        registry: dict[str, Any] = given if isinstance(given, dict) else {}
        tags: list[Any] = registry["tags"] if isinstance(registry.get("tags"), list) else []
        named = [value.get("name"), registry.get("model_name"), *tags]
        if not any(isinstance(text, str) and DATASET_PLACEHOLDER in text for text in named):
            return value
        data = value.get("data")
        source = data.get("source") if isinstance(data, dict) else None
        slug = dataset_slug(source) if isinstance(source, str) else ""
        if not slug:
            return value  # _no_placeholder names each key still holding {dataset}, with the other errors

        def fill(text: Any) -> Any:
            return text.replace(DATASET_PLACEHOLDER, slug) if isinstance(text, str) else text

        value = {**value}
        if "name" in value:
            value["name"] = fill(value["name"])
        if registry:
            value["registry"] = {**registry, "model_name": fill(registry.get("model_name"))}
            if "model_name" not in registry:
                del value["registry"]["model_name"]
            if tags:
                value["registry"]["tags"] = [fill(tag) for tag in tags]
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class _Launch:
    """What the error messages may say about how a config was given: the keys set with ``--set`` and
    the file's own solver.max_iter (to suggest steps at the same fractions of a shrunk max_iter)."""

    set_keys: frozenset[str] = frozenset()
    file_max_iter: int | None = None
    set_errors: tuple[str, ...] = ()  # malformed --set items, reported with the config's other problems


def _steps_fix(ctx: dict[str, Any], launch: _Launch) -> str:
    """The exact ``--set`` line that fixes solver.steps outside (0, max_iter)."""
    max_iter, steps = int(ctx["max_iter"]), [int(s) for s in ctx["steps"]]
    shrunk = "solver.max_iter" in launch.set_keys and "solver.steps" not in launch.set_keys
    old = launch.file_max_iter if shrunk else None
    scaled = sorted({round(s * max_iter / old) for s in steps} if old else set())  # the same fractions
    scaled = [s for s in scaled if 0 < s < max_iter] or sorted({max_iter * 2 // 3, max_iter * 9 // 10} - {0})
    below = f"--set solver.steps=[{','.join(str(s) for s in scaled)}]" if scaled else ""
    fix = "--set solver.steps=[] (no lr drops)" + (f" or steps below it, e.g. {below}" if below else "")
    if shrunk:
        return f"; --set solver.max_iter={max_iter} leaves the config's solver.steps {steps} past the end: add {fix}"
    return f"; fix: {fix}"


def _validation_lines(
    err: ValidationError, launch: _Launch | None = None, only: Callable[[tuple[Any, ...]], bool] | None = None
) -> list[str]:
    """One line per error (``only``: those whose location it accepts), naming the key. A rejected value is
    shown only with its credential-looking keys' values and its URIs with credentials masked, at any depth
    (the message lands in logs)."""
    launch = launch or _Launch()
    lines: list[str] = []
    for item in err.errors():
        if only is not None and not only(tuple(item["loc"])):
            continue
        key = ".".join(str(_show_key(p)) for p in item["loc"]) or "<root>"
        kind = item["type"]
        got = repr(_masked(item.get("input")))
        if kind == "credentials_in_config":
            where = str(item.get("ctx", {}).get("where", ""))
            key = f"{key}{'' if not where or where.startswith('[') else '.'}{where}" if key != "<root>" else where
            lines.append(f"  - {key}: {item['msg']}")
        elif kind == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (check the spelling; see configs/demo.yaml for every key)")
        elif kind == "literal_error":
            allowed = item.get("ctx", {}).get("expected", "")
            lines.append(f"  - {key}: got {got}, allowed: {allowed}")
        elif kind == "missing":
            lines.append(f"  - {key}: required key is missing")
        elif kind in ("not_nullable", "dataset_placeholder"):
            lines.append(f"  - {key}: {item['msg']}")
        elif kind == "steps_outside":
            lines.append(f"  - {key}.steps: {item['msg']}{_steps_fix(item.get('ctx', {}), launch)}")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            # Never echo a rejected value that may hold a secret (it would land in logs).
            shown = "" if key.endswith("docker_args") else f" (got {got})"
            lines.append(f"  - {key}: {msg}{shown}")
    return lines


def _format_validation_error(err: ValidationError, source: str) -> str:
    """The schema's errors as :class:`ConfigError`'s message: a header naming the source, one line each."""
    return "\n".join([f"invalid config {source}:", *_validation_lines(err)])


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; detectron2 keys under model.overrides stay one key."""
    parts = dotted.split(".")
    if parts[:2] == ["model", "overrides"] and len(parts) > 2:
        tree.setdefault("model", {}).setdefault("overrides", {})[".".join(parts[2:])] = value
        return
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _plain_mapping(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str | int | float) for v in value.values())


def _seed_defaults(raw: dict[str, Any], key: str) -> None:
    """Give an absent mapping on a ``--set`` key's path the schema's default first, so that one key set
    under it keeps the others: ``--set data.splits.val=validation`` on a config that names no splits
    still has train and test."""
    model: Any = ExperimentConfig
    node: Any = raw
    for part in key.split(".")[:-1]:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None or not isinstance(node, dict):
            return
        if part not in node:
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                node[part] = {}  # a section: the schema fills in its other keys
            elif _plain_mapping(default := field.get_default(call_default_factory=True)):
                node[part] = dict(default)  # a mapping of plain values (splits); not one of sections
            else:
                return
        node, model = node[part], field.annotation


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with every well-formed ``--set`` applied, and one message per malformed one."""
    result = copy.deepcopy(raw)
    errors: list[str] = []
    for item in overrides or []:
        try:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                shown = _HIDDEN if has_uri_credentials(item) else repr(item)
                raise ConfigError(f"--set {shown}: expected KEY=VALUE, e.g. --set solver.max_iter=500")
            try:
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError as err:
                problem = getattr(err, "problem", None) or type(err).__name__
                raise ConfigError(f"--set {key.strip()}: the value is not valid YAML ({problem})") from None
            _seed_defaults(result, key.strip())
            _set_dotted(result, key.strip(), value)
        except ConfigError as err:
            errors.append(_scrubbed(str(err), list(overrides or [])))
    return result, errors


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config dict.

    Every malformed ``--set`` is named in one :class:`ConfigError`. Errors never show an override's
    value if it may hold credentials (a URI with userinfo).
    """
    result, errors = _apply_overrides(raw, overrides)
    if errors:
        raise ConfigError(
            errors[0] if len(errors) == 1 else "\n".join(["invalid --set:", *(f"  - {e}" for e in errors)])
        )
    return result


def _key_path(key: str) -> tuple[str, ...]:
    """A ``--set`` key as the path :func:`_set_dotted` writes (a detectron2 key under model.overrides is one part)."""
    parts = key.strip().split(".")
    return (*parts[:2], ".".join(parts[2:])) if parts[:2] == ["model", "overrides"] and len(parts) > 2 else tuple(parts)


def _one_type(annotation: Any) -> Any:
    """``X | None`` -> X; anything else as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _schema_key_problem(key: str) -> str | None:
    """Why ``key`` names no key of :class:`ExperimentConfig` (a typo, a value taken for a section), or None.
    Keys under model.overrides are detectron2's (checked at launch, not by the schema)."""
    parts = key.strip().split(".")
    node: Any = ExperimentConfig
    for depth, part in enumerate(parts):
        where, parent = ".".join(parts[: depth + 1]), ".".join(parts[:depth])
        node = _one_type(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                close = difflib.get_close_matches(part, list(node.model_fields), n=1)
                hint = f"did you mean {'.'.join([*parts[:depth], close[0]])}?" if close else "check the spelling;"
                return f"{where}: unknown key ({hint} configs/demo.yaml shows every key)"
            node = node.model_fields[part].annotation
        elif typing.get_origin(node) is dict:
            names, value = typing.get_args(node)
            allowed = typing.get_args(names) if typing.get_origin(names) is Literal else ()
            if allowed and part not in allowed:
                return f"{where}: unknown key, allowed under {parent}: {', '.join(allowed)}"
            if value is Any:
                return None
            node = value
        else:
            return f"{where}: {parent} is a value, not a section"
    return None


#: Stands in for the template run's experiment when ``--set`` items are checked alone: only the errors
#: at or under a key they set are reported (the clone validates the whole experiment when it starts).
_CHECK_SKELETON: dict[str, Any] = {
    "data": {"source": "s3://bucket/dataset"},
    "model": {"zoo_config": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"},
}


def check_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """Check ``--set`` items that are not applied to a config here (``d2ops schedule --set`` without
    ``--config`` sets them on another run's experiment), as far as they go alone: KEY=VALUE and YAML
    values; no credentials, neither a credential-looking key nor a URI with credentials at any depth nor
    one in docker arguments; every key a key of the schema (a typo fails here, not in every clone); every
    value one the schema accepts for its key. One :class:`ConfigError` names each key, never a value."""
    overrides = list(overrides)
    problems = [
        f"{_dotted(path)}: "
        + (_URI_ADVICE if kind == "uri" else f"credentials are not allowed in a config; {_KEY_ADVICE}")
        for path, kind in _credentials_in(apply_overrides({}, overrides))
    ]
    if not problems:
        keys = list(dict.fromkeys(item.partition("=")[0].strip() for item in overrides))
        unknown = {key: problem for key in keys if (problem := _schema_key_problem(key))}
        problems += list(unknown.values())
        paths = [_key_path(key) for key in keys if key not in unknown]
        try:
            ExperimentConfig.model_validate(apply_overrides(_CHECK_SKELETON, overrides))
        except ValidationError as err:

            def set_here(loc: tuple[Any, ...]) -> bool:
                return any(tuple(str(p) for p in loc[: len(path)]) == path for path in paths)

            problems += [line.removeprefix("  - ") for line in _validation_lines(err, only=set_here)]
    if problems:
        message = (
            f"--set {problems[0]}"
            if len(problems) == 1
            else "\n".join(["invalid --set:", *(f"  - {p}" for p in problems)])
        )
        raise ConfigError(_scrubbed(message, overrides))


def _secret_problems(tree: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str, str]]:
    """(dotted key, problem) for each credential-looking key anywhere in the raw config (lists of
    mappings included)."""
    return [
        (
            _dotted(where),
            f"{_dotted(where)}: credentials are not allowed in a config (it becomes ClearML hyperparameters); "
            f"{_KEY_ADVICE}",
        )
        for where, kind in _credentials_in(tree, path)
        if kind == "key"
    ]


def parse_config(
    raw: dict[str, Any],
    source: str = "<dict>",
    *,
    checks: LaunchChecks | None = None,
    _given: _Launch | None = None,
) -> ExperimentConfig:
    """Validate a raw config dict into an :class:`ExperimentConfig`.

    Every problem is reported in one :class:`ConfigError`: the schema's errors and what ``checks`` finds
    (``checks(raw, cfg)``, ``cfg`` None when the schema refused it: the launch checks of
    :mod:`d2ops.pipeline.preflight`, which look at detectron2, S3 and this machine).
    No error message contains a value of a credential-looking key or a URI with credentials.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of sections")
    try:
        secrets = _secret_problems(raw)
        problems: list[str] = [f"  - {error}" for error in (_given.set_errors if _given else ())]
        problems += [f"  - {problem}" for _, problem in secrets]
        cfg: ExperimentConfig | None = None
        try:
            cfg = ExperimentConfig.model_validate(raw)
        except ValidationError as err:
            # a credential key is named once, as a credential (the schema also calls it unknown)
            problems += [
                line
                for line in _validation_lines(err, _given)
                if not any(line.startswith(f"  - {key}:") for key, _ in secrets)
            ]
        if checks is not None:
            problems += [f"  - {line}" for line in checks(raw, cfg)]
        if problems or cfg is None:
            raise ConfigError("\n".join([f"invalid config {source}:", *problems]))
        return cfg
    except ConfigError as err:
        raise ConfigError(_scrubbed(str(err), raw)) from None


BASE_KEY = "_BASE_"


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file into a raw dict, with a clear error for a missing or malformed file.

    A file may name ``_BASE_`` (a file, or a list of them, relative to it), as detectron2's configs do: the
    bases are read first, in order, and this file's keys are merged over them (mappings key by key, any
    other value replaced), so an experiment states only what differs. The schema validates the result.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (configs/ holds the shipped ones)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        # Not str(err): it quotes the file's lines around the error, which may hold a credential.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict) or BASE_KEY not in raw:
        return raw
    bases = raw.pop(BASE_KEY)
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"config file {path}: {BASE_KEY} must name a config file, or a list of them, relative to it")
    chain = (*_chain, path.resolve())
    merged: dict[str, Any] = {}
    for name in names:
        base = (path.parent / name).resolve()
        if base in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(base) :], base))
            raise ConfigError(f"config file {path}: {BASE_KEY} {name} includes itself ({cycle})")
        if not base.is_file():
            raise ConfigError(f"config file {path}: its {BASE_KEY} {name} was not found (looked for {base})")
        base_raw = read_config_file(base, chain)
        if not isinstance(base_raw, dict):
            raise ConfigError(f"config file {base} (a {BASE_KEY} of {path}): the top level must be a mapping")
        merged = _merged(merged, base_raw)
    return _merged(merged, raw)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings key by key, anything else (lists too) replaced."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _merged(out[key], value) if both else copy.deepcopy(value)
    return out


def _set_keys(overrides: list[str] | None) -> frozenset[str]:
    return frozenset(item.partition("=")[0].strip() for item in overrides or [] if "=" in item)


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    checks: LaunchChecks | None = None,
) -> ExperimentConfig:
    """Load, override and validate an experiment config; ``checks`` as in :func:`parse_config`.

    ``d2ops pipeline`` and ``d2ops step`` load it through :func:`d2ops.pipeline.preflight.launch_config`,
    which adds the launch checks (detectron2 keys, inputs, split folders, device). Every problem comes in
    one :class:`ConfigError`.
    """
    raw = read_config_file(path)
    solver = raw.get("solver") if isinstance(raw, dict) else None
    file_max_iter = solver.get("max_iter") if isinstance(solver, dict) else None
    applied, set_errors = _apply_overrides(raw, overrides) if isinstance(raw, dict) else (raw, [])
    given = _Launch(_set_keys(overrides), file_max_iter if isinstance(file_max_iter, int) else None, tuple(set_errors))
    return parse_config(applied, str(path), checks=checks, _given=given)


def config_hash(cfg: ExperimentConfig) -> str:
    """A short stable hash of the config, for lineage metadata."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
