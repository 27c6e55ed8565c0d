"""The one credential rule (d2ops.config_secrets), wherever a value enters: a YAML config, ``--set``,
docker arguments in any spelling, ``d2ops schedule --set`` without a config, a hyperparameter edited in the UI.

Each refusal names the variable or key and never its value, and says what to do instead; the settings a
real user passes (``--ipc=host``, ``-e CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1``, ``TOKENIZERS_PARALLELISM``,
a variable passed by name only, an ``--env-file``) still load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from d2ops.clearml.hyperparams import experiment_from_parameters, experiment_parameters
from d2ops.config import ConfigError, ExperimentConfig, check_overrides, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
SENTINEL = "SENTINELv4lue0f4cred"

#: The issue's five, and the rule's other families: each must be refused in docker arguments.
CREDENTIAL_NAMES = [
    "WANDB_API_KEY",
    "AZURE_STORAGE_KEY",
    "DB_PASS",
    "PRIVATE_KEY_PEM",
    "GITHUB_PAT",
    "HF_TOKEN",
    "DB_PASSWORD",
    "MYSQL_PASSWD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "OPENAI_API_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "clientSecret",
]
#: Docker's ways of setting one variable (shell-quoted, as a YAML string or --set value holds them).
SPELLINGS = [
    "-e {name}={value}",
    "--env {name}={value}",
    "--env={name}={value}",
    "-e{name}={value}",
    "-e '{name}={value}'",
    '--env "{name}={value} with spaces"',
    "--ipc=host -it -e {name}={value} --shm-size=8g",
]
#: What a real user passes: none of it is a credential.
LEGITIMATE_DOCKER_ARGS = [
    "--ipc=host",
    "--shm-size=8g -e CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1",
    "-e KEY_FRAME_INTERVAL=10 -e TOKENIZERS_PARALLELISM=false -e OMP_NUM_THREADS=4",
    "-e AWS_DEFAULT_REGION=eu-west-1 -e AWS_PROFILE=training -e NVIDIA_VISIBLE_DEVICES=all",
    "--env-file /etc/d2ops/worker.env",
    "--env-file=/etc/d2ops/worker.env -e GITHUB_PAT -e WANDB_API_KEY",  # by name: docker reads the agent's env
    "-v /run/secrets:/run/secrets:ro -e POSTGRES_PASSWORD_FILE=/run/secrets/db_pass",
    "-e GOOGLE_APPLICATION_CREDENTIALS=/run/secrets/gcs.json -e WANDB_MODE=offline",
]


def _minimal(**clearml: Any) -> dict[str, Any]:
    return {
        "data": {"source": "outputs/datasets/shapes"},
        "model": {"zoo_config": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"},
        "clearml": clearml,
    }


def _refusal(call: Any, *args: Any) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    return str(info.value)


def _assert_names_not_value(message: str, name: str) -> None:
    assert name in message, message
    assert SENTINEL not in message, message
    assert "must not carry credentials" in message and "clearml.conf" in message and "-e NAME" in message


@pytest.mark.parametrize("name", CREDENTIAL_NAMES)
def test_credentials_in_docker_args_are_refused_naming_the_variable(name: str) -> None:
    message = _refusal(parse_config, _minimal(docker_args=f"--ipc=host -e {name}={SENTINEL}"), "c.yaml")
    assert "clearml.docker_args: docker arguments must not carry credentials" in message
    _assert_names_not_value(message, name)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_docker_spelling_of_a_variable_is_seen(spelling: str) -> None:
    args = spelling.format(name="GITHUB_PAT", value=SENTINEL)
    message = _refusal(parse_config, _minimal(steps={"train": {"docker_args": args}}), "c.yaml")
    assert "clearml.steps.train.docker_args:" in message
    _assert_names_not_value(message, "GITHUB_PAT")


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "AZURE_STORAGE_KEY", "DB_PASS", "PRIVATE_KEY_PEM", "GITHUB_PAT"])
def test_credentials_in_step_docker_args_set_on_the_command_line_are_refused(name: str) -> None:
    overrides = [f"clearml.steps.evaluate.docker_args=--ipc=host -e {name}={SENTINEL}"]
    message = _refusal(load_config, DEMO, overrides)
    assert "clearml.steps.evaluate.docker_args: docker arguments must not carry credentials" in message
    _assert_names_not_value(message, name)


def test_a_uri_with_credentials_in_a_docker_variable_is_refused() -> None:
    args = f"-e DATABASE_URL=postgres://d2ops:{SENTINEL}@db:5432/runs"
    message = _refusal(parse_config, _minimal(docker_args=args), "c.yaml")
    assert "clearml.docker_args: a URI with credentials in it" in message and SENTINEL not in message
    from d2ops.config_secrets import docker_args_credentials

    assert docker_args_credentials(args) == ["DATABASE_URL"]


def test_unbalanced_quotes_in_docker_args_are_refused_without_echoing_them() -> None:
    message = _refusal(parse_config, _minimal(docker_args=f"-e 'GITHUB_PAT={SENTINEL}"), "c.yaml")
    assert "clearml.docker_args: docker arguments are not valid shell words" in message
    assert SENTINEL not in message


@pytest.mark.parametrize("args", LEGITIMATE_DOCKER_ARGS)
def test_legitimate_docker_args_load(args: str) -> None:
    cfg = parse_config(_minimal(docker_args=args, steps={"infer": {"docker_args": args}}), "c.yaml")
    assert cfg.clearml.docker_args == args and cfg.clearml.step("infer").docker_args == args


def test_a_ui_edit_of_docker_args_with_a_credential_is_refused() -> None:
    """The values a task runs on are read back from its hyperparameters: an edit in the UI meets the same rule."""
    values, _ = experiment_parameters(parse_config(_minimal(), "c.yaml"))
    for key, name in [("clearml/docker_args", "GITHUB_PAT"), ("clearml/steps/train/docker_args", "DB_PASS")]:
        edited = {**values, key: f"--ipc=host --env={name}={SENTINEL}"}
        message = _refusal(experiment_from_parameters, edited)
        assert f"{key.replace('/', '.')}: docker arguments must not carry credentials" in message
        _assert_names_not_value(message, name)


@pytest.mark.parametrize("name", ["GITHUB_PAT", "DB_PASS", "PRIVATE_KEY_PEM", "WANDB_API_KEY", "HF_TOKEN"])
def test_credential_names_as_config_keys_are_refused(name: str) -> None:
    """A detectron2-looking override key is a config key like any other (model.overrides are hyperparameters)."""
    message = _refusal(load_config, DEMO, [f"model.overrides.MODEL.{name}={SENTINEL}"])
    assert f"model.overrides.MODEL.{name}: credentials are not allowed in a config" in message
    assert SENTINEL not in message


def _schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(f"{prefix}{name}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _schema_keys(field.annotation, f"{prefix}{name}.")
    return keys


def test_no_schema_key_and_no_detectron2_key_is_taken_for_a_credential() -> None:
    """The rule is broad (``*_KEY``, ``*PASS*``, ``*_TOKEN``): it must not refuse the keys d2ops and detectron2 use."""
    from detectron2.config import get_cfg

    from d2ops.config_secrets import is_secret_name

    def d2_keys(node: Any, prefix: str = "") -> list[str]:
        return [
            k
            for key, v in node.items()
            for k in (d2_keys(v, f"{prefix}{key}.") if hasattr(v, "items") else [f"{prefix}{key}"])
        ]

    keys = _schema_keys(ExperimentConfig) + d2_keys(get_cfg())
    assert len(keys) > 250
    assert [key for key in keys if any(is_secret_name(part) for part in (key, *key.split(".")))] == []


# --------------------------------------------------------------------------- d2ops schedule --set, checked alone


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ("solvr.max_iter=5000", "solvr: unknown key (did you mean solver?"),
        ("solver.max_iters=5000", "solver.max_iters: unknown key (did you mean solver.max_iter?"),
        ("clearml.steps.trian.retries=1", "clearml.steps.trian: unknown key, allowed under clearml.steps: download"),
        ("solver.max_iter=many", "solver.max_iter: Input should be a valid integer"),
        ("eval.split=valid", "eval.split: got 'valid', allowed"),
        ("solver.base_lr=-1", "solver.base_lr: Input should be greater than 0"),
        ("clearml.docker_args=-e AWS_SECRET_ACCESS_KEY=" + SENTINEL, "clearml.docker_args: docker arguments must not"),
    ],
)
def test_set_items_alone_are_checked_against_the_schema(item: str, named: str) -> None:
    message = _refusal(check_overrides, [item])
    assert message.startswith(f"--set {named}"), message
    assert SENTINEL not in message


def test_every_bad_set_item_is_named_in_one_error() -> None:
    message = _refusal(check_overrides, ["solvr.max_iter=1", "solver.max_iter=2", "eval.split=x", "runtime.devcie=cpu"])
    assert message.splitlines()[0] == "invalid --set:"
    assert [line.split(":")[0] for line in message.splitlines()[1:]] == [
        "  - solvr",
        "  - runtime.devcie",
        "  - eval.split",
    ]


def test_good_set_items_alone_pass() -> None:
    check_overrides(
        [
            "solver.max_iter=5000",
            "name=weekly-retrain",
            "data.dataset_id=abc123",
            "data.splits.val=validation",
            "model.overrides.MODEL.RPN.NMS_THRESH=0.6",
            "clearml.steps.train.retries=3",
            "clearml.docker_args=--ipc=host -e WANDB_API_KEY",
            "inference.source=None",
        ]
    )
