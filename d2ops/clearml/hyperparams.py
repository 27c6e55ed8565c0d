"""The validated experiment as flat, typed ClearML hyperparameters: one section per config section.

ClearML compares runs side by side, plots them in parallel coordinates and lets a clone be
edited field by field only for hyperparameters, not for a YAML configuration object. So every
leaf of the :class:`~d2ops.config.ExperimentConfig` becomes one hyperparameter:

=====================================  ===========================================
config key                             hyperparameter (section/name)
=====================================  ===========================================
``solver.base_lr``                     ``solver/base_lr``
``data.splits.train``                  ``data/splits/train``
``model.overrides.MODEL.RPN.NMS_THRESH``  ``model/overrides/MODEL.RPN.NMS_THRESH``
``clearml.steps.train.retries``        ``clearml/steps/train/retries``
``name``                               ``experiment/name``
=====================================  ===========================================

A pipeline controller keeps the same names under ``Args/`` (``Args/solver/base_lr``).

**One source of truth.** A task's experiment *is* its flat hyperparameters. The YAML file and
``--set`` overrides are read only where a run is launched (the laptop, ``d2ops schedule``); they
are validated and written out as these values, and everything after reads the values back
(:func:`experiment_from_parameters`), validates them again with the same schema, and runs on
exactly that. A clone edited in the UI therefore runs what the edited values say. The
``experiment`` configuration object attached to each task is written *from* the values, for
reading; editing it changes nothing. Credentials cannot appear: the schema rejects them.

**Complete and exact.** The values are the whole experiment: a key the schema does not know (a
misspelled ``solvr/max_iter``, a new section) or a key that is missing (a deleted ``solver/max_iter``,
which would otherwise become the schema's default) fails, naming the key, instead of being ignored.
Entries of ``model/overrides`` are the user's own keys: adding or deleting one is an edit like any other.

Values are written as YAML scalars or flow collections (``0.005``, ``[128]``, ``'123'`` for a
string that looks like a number), and an empty value means null, so every value round-trips
exactly and an edit is typed the way ``--set`` is.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any

import yaml

from d2ops.config import ConfigError, ExperimentConfig, parse_config

__all__ = [
    "CLEARML_SECTIONS",
    "EXPERIMENT_SECTIONS",
    "experiment_from_parameters",
    "experiment_parameters",
    "flat_experiment",
    "format_value",
    "is_experiment_name",
    "parameter_name",
    "parameter_types",
]

#: ClearML sections that hold the experiment (top-level keys of the config; ``experiment`` holds ``name``).
EXPERIMENT_SECTIONS = ("experiment", "data", "model", "solver", "eval", "inference", "registry", "clearml", "runtime")
#: Sections ClearML itself writes on a task and reads back (user properties, the agent's environment).
CLEARML_SECTIONS = ("properties", "Environment")
_TOP_LEVEL = "experiment"
#: Dict-valued keys whose entries are user keys (kept whole as one name part), not schema fields.
_OPAQUE_DICTS = {("model", "overrides")}


def format_value(value: Any) -> str:
    """One value as the text ClearML stores: a YAML scalar or flow collection; null is empty."""
    if value is None:
        return ""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _leaves(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict) and value and path[:2] not in _OPAQUE_DICTS:
        for key, child in value.items():
            yield from _leaves(child, (*path, str(key)))
    elif isinstance(value, dict) and path[:2] in _OPAQUE_DICTS and len(path) == 2:
        for key, child in value.items():
            yield (*path, str(key)), child
    else:
        yield path, value


def flat_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """``{"solver/base_lr": 0.005, ...}``: every leaf of the validated config, typed."""
    flat: dict[str, Any] = {}
    for key, value in cfg.model_dump(mode="json").items():
        if isinstance(value, dict):
            for path, leaf in _leaves(value, (key,)):
                flat["/".join(path)] = leaf
        else:
            flat[f"{_TOP_LEVEL}/{key}"] = value
    return flat


def parameter_types(flat: Mapping[str, Any]) -> dict[str, str]:
    """The type ClearML shows beside each value (``float``, ``int``, ``str``, ``list``...)."""
    return {name: type(value).__name__ if value is not None else "str" for name, value in flat.items()}


def experiment_parameters(cfg: ExperimentConfig, prefix: str = "") -> tuple[dict[str, str], dict[str, str]]:
    """The experiment as ClearML stores it: ``{prefix + name: text}`` and ``{prefix + name: type}``."""
    flat = flat_experiment(cfg)
    values = {f"{prefix}{name}": format_value(value) for name, value in flat.items()}
    types = {f"{prefix}{name}": kind for name, kind in parameter_types(flat).items()}
    return values, types


def parameter_name(key: str) -> str:
    """A config key (``solver.base_lr``, ``model.overrides.MODEL.RPN.NMS_THRESH``, ``name``) as its
    hyperparameter name (``solver/base_lr``, ``model/overrides/MODEL.RPN.NMS_THRESH``, ``experiment/name``)."""
    parts = key.strip().split(".")
    if len(parts) == 1:
        return f"{_TOP_LEVEL}/{parts[0]}"
    if tuple(parts[:2]) in _OPAQUE_DICTS and len(parts) > 2:
        return "/".join([*parts[:2], ".".join(parts[2:])])
    return "/".join(parts)


def _set(tree: dict[str, Any], name: str, value: Any) -> None:
    section, _, rest = name.partition("/")
    parts = rest.split("/")
    if section == _TOP_LEVEL:
        tree[rest] = value
        return
    node = tree.setdefault(section, {})
    opaque = (section, parts[0]) in _OPAQUE_DICTS
    if opaque:
        node.setdefault(parts[0], {})["/".join(parts[1:])] = value
        return
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def is_experiment_name(name: str) -> bool:
    """True for a name of the experiment's form, ``<experiment section>/<key>`` (``solver/base_lr``)."""
    return "/" in name and name.split("/", 1)[0] in EXPERIMENT_SECTIONS


def _flexible(name: str) -> bool:
    """A name inside a dict of user keys (``model/overrides/...``), which may be added or deleted."""
    parts = tuple(name.split("/"))
    return any(parts[: len(opaque)] == opaque for opaque in _OPAQUE_DICTS)


def _keys(names: list[str]) -> str:
    return f"hyperparameter {names[0]} is" if len(names) == 1 else f"hyperparameters {', '.join(sorted(names))} are"


def experiment_from_parameters(
    params: Mapping[str, Any],
    *,
    prefix: str = "",
    source: str = "task",
    other_sections: Collection[str] = ("General", *CLEARML_SECTIONS),
) -> ExperimentConfig:
    """The experiment recorded in a task's hyperparameters (``prefix`` ``"Args/"`` for a pipeline controller).

    ``params`` is ``Task.get_parameters()``: ``section/name`` -> text. The result is validated by the
    schema, so a bad edit in the UI fails here, naming the key, and so does a key that is not part of
    the experiment or one that is missing (:class:`~d2ops.config.ConfigError`, one line naming every such
    key and what to do). With a ``prefix``, every key under it must be an experiment key (keys outside it
    are ClearML's); without one, a key of a section that is neither an experiment section nor one of
    ``other_sections`` is unknown. Raises when the task records no experiment.
    """
    tree: dict[str, Any] = {}
    given: dict[str, str] = {}
    unknown: list[str] = []
    for full, text in params.items():
        if prefix:
            if not full.startswith(prefix):
                continue
            name = full[len(prefix) :]
        else:
            name = full
            if full.split("/", 1)[0] in other_sections:
                continue
        if not is_experiment_name(name):
            unknown.append(full)
            continue
        try:
            value = yaml.safe_load(str(text)) if str(text).strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not YAML"
            raise ConfigError(f"hyperparameter {full}: not a valid value ({problem})") from None
        _set(tree, name, value)
        given[name] = full
    if not given:
        raise ConfigError(
            f"{source} records no d2ops experiment hyperparameters ({prefix or ''}solver/..., data/..., ...): "
            "launch it with d2ops (pipelines/run_pipeline.py, tasks/<step>.py) so they are recorded"
        )
    if unknown:
        sections = ", ".join(EXPERIMENT_SECTIONS)
        raise ConfigError(
            f"{source}: {_keys(unknown)} not part of the d2ops experiment: correct the name to an existing key "
            f"({prefix}<section>/<key>; sections: {sections}) or delete it"
        )
    cfg = parse_config(tree, f"{source} hyperparameters")
    missing = [f"{prefix}{name}" for name in flat_experiment(cfg) if name not in given and not _flexible(name)]
    if missing:
        raise ConfigError(
            f"{source}: {_keys(missing)} missing, and a missing key is not taken from the schema's default: "
            "add it back with the value to run (the task must record the whole experiment), or clone the task again"
        )
    return cfg
