"""detectron2 configs built from the experiment: model zoo base, d2ops settings, overrides, and their checks."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg

from d2ops.config import NULL_WORDS, ExperimentConfig
from d2ops.data.registration import RegisteredDataset
from d2ops.utils.device import resolve_device

log = logging.getLogger(__name__)

__all__ = ["build_d2_config", "check_model_config", "detectron2_problems"]


def _base_config(cfg: ExperimentConfig) -> CfgNode:
    d2 = get_cfg()
    d2.set_new_allowed(True)
    if cfg.model.zoo_config:
        try:
            path = model_zoo.get_config_file(cfg.model.zoo_config)
        except RuntimeError as err:
            raise ValueError(
                f"model.zoo_config {cfg.model.zoo_config!r} is not in detectron2's model zoo "
                "(e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml)"
            ) from err
    else:
        path = str(cfg.model.config_file)
    d2.merge_from_file(path)
    d2.set_new_allowed(False)
    return d2


def _merge_overrides(d2: CfgNode, overrides: dict[str, Any]) -> None:
    pairs: list[Any] = []
    for key, value in overrides.items():
        pairs += [key, value]
    try:
        d2.merge_from_list(pairs)
    except (KeyError, AttributeError, AssertionError, ValueError) as err:
        raise ValueError(
            f"model.overrides: {err} (keys must exist in detectron2's config, with values of the same type)"
        ) from None


def check_model_config(cfg: ExperimentConfig) -> None:
    """Fail early (before data or GPU time) on a bad model-zoo name or detectron2 override.

    The launch check (:func:`d2ops.pipeline.preflight.launch_config`) finds these first; this one catches an
    experiment edited in the ClearML UI and run by an agent, with the same lines and suggestions.
    """
    try:
        _merge_overrides(_base_config(cfg), cfg.model.overrides)
    except ValueError:
        problems = detectron2_problems(cfg.to_dict())
        if not problems:
            raise
        raise ValueError("; ".join(problems)) from None


def build_d2_config(
    cfg: ExperimentConfig,
    dataset: RegisteredDataset,
    output_dir: Path,
    weights: str | None = None,
) -> CfgNode:
    """The full, frozen detectron2 config for this experiment and dataset."""
    d2 = _base_config(cfg)
    d2.MODEL.WEIGHTS = weights or ""
    d2.DATASETS.TRAIN = (dataset.name("train"),)
    d2.DATASETS.TEST = (dataset.name("val"),)
    d2.DATALOADER.NUM_WORKERS = cfg.solver.num_workers
    d2.SOLVER.IMS_PER_BATCH = cfg.solver.ims_per_batch
    d2.SOLVER.BASE_LR = cfg.solver.base_lr
    d2.SOLVER.MAX_ITER = cfg.solver.max_iter
    d2.SOLVER.WARMUP_ITERS = cfg.solver.warmup_iters
    d2.SOLVER.STEPS = tuple(cfg.solver.steps)
    d2.SOLVER.CHECKPOINT_PERIOD = cfg.solver.checkpoint_period
    d2.TEST.EVAL_PERIOD = cfg.solver.eval_period
    d2.SEED = cfg.solver.seed
    d2.MODEL.ROI_HEADS.NUM_CLASSES = len(dataset.class_names)
    d2.MODEL.RETINANET.NUM_CLASSES = len(dataset.class_names)
    _merge_overrides(d2, cfg.model.overrides)
    d2.MODEL.DEVICE = resolve_device(cfg.runtime.device)
    d2.OUTPUT_DIR = str(output_dir)
    d2.freeze()
    return d2


def _d2_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a detectron2 CfgNode (sections and leaves)."""
    for name, child in node.items():
        key = f"{prefix}{name}"
        yield key
        if isinstance(child, dict):
            yield from _d2_keys(child, f"{key}.")


def _zoo_root() -> Path:
    """detectron2's model-zoo config folder, found without importing detectron2.model_zoo (which imports
    the model code: 1.7 s more). model_zoo.get_config_file resolves names against the same folder."""
    import detectron2

    return Path(detectron2.__file__).parent / "model_zoo" / "configs"


def _zoo_configs() -> list[str]:
    """The model-zoo config names (COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml, ...)."""
    root = _zoo_root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml")) if root.is_dir() else []


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.8)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def detectron2_problems(raw: Any) -> list[str]:
    """``model.zoo_config`` and every ``model.overrides`` key checked against detectron2's own config
    (get_cfg() plus what the zoo config or a local model.config_file adds), the closest real key
    suggested for a typo, and each override's value merged to check its type. One line per problem.

    Imports detectron2.config (and torch: about 1.4 s on 2 cores), so it runs at launch
    (:func:`d2ops.pipeline.preflight.launch_config`), not in the schema. A raw dict whose model section is broken is
    checked as far as it goes.
    """
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        return []
    problems: list[str] = []
    d2 = get_cfg()
    d2.set_new_allowed(True)
    zoo, config_file = model.get("zoo_config"), model.get("config_file")
    use_zoo = isinstance(zoo, str) and zoo.strip() not in NULL_WORDS | {""}
    readable = isinstance(config_file, str) and "://" not in config_file and Path(config_file).is_file()
    if isinstance(zoo, str) and use_zoo:
        zoo_file = _zoo_root() / zoo
        if zoo_file.is_file():
            d2.merge_from_file(str(zoo_file))
        else:
            problems.append(
                f"model.zoo_config: {zoo!r} is not in detectron2's model zoo"
                f"{_did_you_mean(zoo, _zoo_configs()) or ' (e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml)'}"
            )
    elif isinstance(config_file, str) and readable:
        try:
            d2.merge_from_file(config_file)
        except Exception as err:  # yacs and yaml raise many kinds; all mean "not a detectron2 config"
            problems.append(f"model.config_file: {config_file} is not a detectron2 config ({type(err).__name__})")
    # A config file read here (or none) gives every key; one on S3 may add keys of its own, so an override
    # missing from get_cfg() is then not called a typo (its type is still checked when the key exists).
    given_file = isinstance(config_file, str) and config_file.strip() not in NULL_WORDS | {""}
    all_keys = use_zoo or readable or not given_file
    d2.set_new_allowed(False)
    overrides = model.get("overrides")
    if not isinstance(overrides, dict):
        return problems
    keys = sorted(_d2_keys(d2))
    known = set(keys)
    for key, value in overrides.items():
        head = str(key).split(".")[0]
        if not isinstance(key, str) or not head or head != head.upper():
            continue  # the schema names it (not upper case)
        if key not in known:
            if all_keys:
                problems.append(f"model.overrides.{key}: not a key of detectron2's config{_did_you_mean(key, keys)}")
            continue
        node: Any = d2
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            problems.append(
                f"model.overrides.{key}: is a section of detectron2's config, not a key; name keys under it, "
                f"e.g. {key}.{next(iter(node), 'NAME')}"
            )
            continue
        try:
            d2.merge_from_list([key, value])
        except (KeyError, AttributeError, AssertionError, ValueError, TypeError) as err:
            problems.append(f"model.overrides.{key}: {err} (the value must have the type of detectron2's default)")
    return problems
