"""The experiment schema: every shipped config loads, and every invalid one fails with a useful message.

Fast: no data, no training, no model build. The detectron2 check only merges config nodes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from d2ops.config import ConfigError, apply_overrides, check_overrides, load_config, parse_config
from d2ops.engine.d2config import detectron2_problems
from d2ops.pipeline.preflight import launch_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CLEARML_CONF_EXAMPLE = ROOT / "clearml.conf.example"


def _minimal() -> dict[str, Any]:
    """The smallest valid raw config; each test breaks one thing in it."""
    return {
        "data": {"source": "outputs/datasets/shapes"},
        "model": {"zoo_config": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"},
    }


def _error(raw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "test.yaml")
    return str(info.value)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


# --- shipped configs -------------------------------------------------------------------------


def test_configs_are_shipped() -> None:
    names = {p.name for p in CONFIGS}
    assert CONFIGS, "no configs/*.yaml found"
    assert {"demo.yaml", "smoke.yaml", "balloon.yaml", "roboflow.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.splits["train"] and cfg.data.splits["val"]
    assert cfg.eval.split in cfg.data.splits, f"eval.split {cfg.eval.split!r} is not among data.splits"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_overrides_are_detectron2_keys(path: Path) -> None:
    """Each ``model.overrides`` key exists in detectron2's config and its value has the right type."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = load_config(path)
    if not cfg.model.zoo_config:
        pytest.skip("model.config_file configs need their file; only model-zoo configs are checked here")
    d2 = get_cfg()
    d2.merge_from_file(model_zoo.get_config_file(cfg.model.zoo_config))
    pairs = [item for key_value in cfg.model.overrides.items() for item in key_value]
    d2.merge_from_list(pairs)  # yacs: AssertionError "Non-existent key", ValueError "Type mismatch"
    for key, value in cfg.model.overrides.items():
        node: Any = d2
        for part in key.split("."):
            node = node[part]
        assert node == (tuple(value) if isinstance(value, list) else value), key


def test_balloon_is_the_detectron2_tutorial() -> None:
    cfg = load_config(ROOT / "configs" / "balloon.yaml")
    assert (cfg.data.format, cfg.data.annotation_file) == ("via", "via_region_data.json")
    assert cfg.data.splits == {"train": "train", "val": "val"}
    assert cfg.eval.split == "val"
    assert cfg.model.zoo_config == "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    s = cfg.solver
    assert (s.max_iter, s.ims_per_batch, s.base_lr, s.steps) == (300, 2, 0.00025, [])


def test_remote_uris_carry_the_minio_port() -> None:
    """Without host:port in the URI ClearML sends MinIO requests to AWS."""
    for path in (ROOT / "configs" / "balloon.yaml", ROOT / "configs" / "roboflow.yaml"):
        cfg = load_config(path)
        for uri in (cfg.data.source, cfg.model.weights, cfg.clearml.output_uri):
            assert uri and re.match(r"^s3://[^/]+:\d+/", uri), f"{path.name}: {uri!r} has no host:port"


# --- validation errors -----------------------------------------------------------------------


def test_unknown_top_level_key_is_named() -> None:
    raw = {**_minimal(), "modle": {}}
    message = _error(raw)
    assert "modle: unknown key" in message
    assert "test.yaml" in message


def test_unknown_nested_key_is_named() -> None:
    raw = {**_minimal(), "solver": {"max_iters": 10}}
    assert "solver.max_iters: unknown key" in _error(raw)


def test_bad_literal_lists_allowed_values() -> None:
    raw = _minimal()
    raw["data"]["format"] = "yolo"
    message = _error(raw)
    assert "data.format" in message and "'yolo'" in message
    assert "'coco'" in message and "'via'" in message


def test_missing_required_section() -> None:
    raw = _minimal()
    del raw["model"]
    assert "model: required key is missing" in _error(raw)


def test_via_needs_class_names() -> None:
    raw = _minimal()
    raw["data"].update(format="via", annotation_file="via_region_data.json")
    assert "data.class_names is required for format 'via'" in _error(raw)


def test_override_key_must_look_like_detectron2() -> None:
    raw = _minimal()
    raw["model"]["overrides"] = {"model.rpn.nms_thresh": 0.6}
    message = _error(raw)
    assert "'model.rpn.nms_thresh' is not a detectron2 key" in message


def test_solver_steps_outside_range() -> None:
    raw = {**_minimal(), "solver": {"max_iter": 100, "steps": [50, 100]}}
    message = _error(raw)
    assert "solver.steps: [100] must lie" in message
    assert "strictly between 0 and solver.max_iter (100)" in message


def test_zoo_config_and_config_file_are_exclusive() -> None:
    raw = _minimal()
    raw["model"]["config_file"] = "s3://minio.local:9000/configs/custom.yaml"
    assert "set exactly one of model.zoo_config or model.config_file" in _error(raw)


def test_neither_zoo_config_nor_config_file() -> None:
    raw = _minimal()
    raw["model"] = {"weights": None}
    assert "set exactly one of model.zoo_config or model.config_file" in _error(raw)


# --- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "dotted"),
    [
        (None, "aws_secret_access_key"),
        ("data", "data.aws_secret_access_key"),
        ("clearml", "clearml.aws_secret_access_key"),
    ],
)
def test_credential_key_is_rejected(section: str | None, dotted: str) -> None:
    raw = _minimal()
    (raw if section is None else raw.setdefault(section, {}))["aws_secret_access_key"] = "not-a-real-secret"
    message = _error(raw)
    assert f"\n  - {dotted}: credentials are not allowed" in message
    assert message.count(dotted) == 1, "named once, as a credential (not also as an unknown key)"
    assert "environment" in message and "clearml.conf" in message


def test_credential_in_docker_args_is_rejected() -> None:
    raw = {**_minimal(), "clearml": {"docker_args": "--ipc=host -e AWS_SECRET_ACCESS_KEY=not-a-real-secret"}}
    message = _error(raw)
    assert "clearml.docker_args: docker arguments must not carry credentials" in message
    assert "clearml.conf" in message


def test_rejected_docker_args_are_not_echoed() -> None:
    raw = {**_minimal(), "clearml": {"docker_args": "-e AWS_SECRET_ACCESS_KEY=not-a-real-secret"}}
    assert "not-a-real-secret" not in _error(raw)


#: Stand-in credentials: none of these (nor any piece of the URI that holds them) may reach a message.
_KEY, _SECRET = "AKIASENTINEL0CONFIG", "wJalrSENTINEL0config0secret"
_CRED_URI = f"s3://{_KEY}:{_SECRET}@minio.example:9000/sentinel-bucket/prefix/"
_URI_PIECES = (_KEY, _SECRET, "minio.example", "sentinel-bucket", _CRED_URI[:12])


def _assert_hidden(message: str) -> None:
    leaked = [piece for piece in _URI_PIECES if piece in message]
    assert not leaked, f"{leaked} in {message!r}"


@pytest.mark.parametrize(
    ("dotted", "patch"),
    [
        ("data.source", {"data": {"source": _CRED_URI}}),
        ("clearml.output_uri", {"clearml": {"output_uri": _CRED_URI}}),
        ("model.weights", {"model": {"weights": _CRED_URI}}),
        ("model.config_file", {"model": {"config_file": _CRED_URI, "zoo_config": None}}),
        ("inference.source", {"inference": {"source": _CRED_URI}}),
        ("model.overrides.MODEL.WEIGHTS", {"model": {"overrides": {"MODEL.WEIGHTS": _CRED_URI}}}),
        ("registry.tags[1]", {"registry": {"tags": ["smoke", f"from {_CRED_URI}"]}}),
        ("name", {"name": _CRED_URI.replace("s3://", "https://")}),
    ],
)
def test_uri_with_credentials_is_rejected_naming_the_key_never_the_value(dotted: str, patch: dict[str, Any]) -> None:
    raw = _minimal()
    for section, values in patch.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    message = _error(raw)
    assert f"{dotted}: a URI with credentials in it" in message
    assert "environment" in message and "clearml.conf" in message
    _assert_hidden(message)


def test_uri_with_credentials_via_set_is_rejected_naming_the_key_never_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "smoke.yaml", [f"clearml.output_uri={_CRED_URI}", f"data.source={_CRED_URI}"])
    message = str(info.value)
    assert "clearml.output_uri: a URI with credentials" in message and "data.source: a URI with credentials" in message
    _assert_hidden(message)


@pytest.mark.parametrize(
    ("items", "named"),
    [
        ([f"data.source={_CRED_URI}"], "--set data.source: a URI with credentials"),
        (
            ["solver.max_iter=5", f"model.overrides.MODEL.WEIGHTS={_CRED_URI}"],
            "--set model.overrides.MODEL.WEIGHTS: a URI",
        ),
        ([f"registry.tags=[a, {{token: {_SECRET}}}]"], "--set registry.tags[1].token: credentials are not allowed"),
        ([f"data.secret_key={_SECRET}"], "--set data.secret_key: credentials are not allowed"),
    ],
)
def test_overrides_checked_on_their_own_refuse_credentials(items: list[str], named: str) -> None:
    """``d2ops schedule --set`` without --config: overrides set on another run, never applied to a config here."""
    with pytest.raises(ConfigError) as info:
        check_overrides(items)
    assert str(info.value).startswith(named), str(info.value)
    _assert_hidden(str(info.value))
    check_overrides(["solver.max_iter=5", "data.source=s3://minio:9000/bucket/prefix/"])  # no credentials: fine


@pytest.mark.parametrize(
    "item",
    [f"data.source {_CRED_URI}", f"=data.source={_CRED_URI}", f"model.weights=[{_CRED_URI}"],
    ids=["no equals sign", "no key", "not YAML"],
)
def test_a_malformed_set_item_with_credentials_is_not_echoed(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(_minimal(), [item])
    assert str(info.value).startswith("--set ")
    _assert_hidden(str(info.value))


def test_assigning_a_uri_with_credentials_is_rejected_and_pydantic_does_not_show_it() -> None:
    from pydantic import ValidationError

    cfg = parse_config(_minimal())
    with pytest.raises(ValidationError) as info:
        cfg.data.source = _CRED_URI
    assert "credentials" in str(info.value)
    _assert_hidden(str(info.value))
    assert cfg.data.source == "outputs/datasets/shapes"


def test_uris_without_credentials_are_accepted() -> None:
    raw = _minimal()
    raw["data"]["source"] = "s3://minio:9000/bucket/path@v2/"  # an @ after the host is not userinfo
    raw["model"]["weights"] = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    raw["clearml"] = {"output_uri": "https://files.example:8081/out", "docker_image": "repo/img@sha256:0123abcd"}
    cfg = parse_config(raw)
    assert cfg.data.source == "s3://minio:9000/bucket/path@v2/" and cfg.clearml.output_uri.startswith("https://")


_NESTED_SECRET = "d2ops-nested-sentinel-5e1f"


@pytest.mark.parametrize(
    ("dotted", "patch"),
    [
        # a list where a mapping belongs: pydantic's error would show the whole list
        ("model.overrides[0].secret_key", {"model": {"overrides": [{"MODEL.X": 1, "secret_key": _NESTED_SECRET}]}}),
        # a bad detectron2 key next to a nested credential: the error would show the whole mapping
        ("model.overrides.bad[0].password", {"model": {"overrides": {"bad": [{"password": _NESTED_SECRET}]}}}),
        # accepted today: a credential deep inside a valid override
        (
            "model.overrides.MODEL.X[0].nested[1].api_token",
            {"model": {"overrides": {"MODEL.X": [{"nested": [1, {"api_token": _NESTED_SECRET}]}]}}},
        ),
        ("registry.tags[0].token", {"registry": {"tags": [{"token": _NESTED_SECRET}]}}),
        ("solver.steps[0].credentials", {"solver": {"steps": [{"credentials": {"key": _NESTED_SECRET}}]}}),
    ],
)
def test_a_credential_key_nested_in_a_list_is_rejected_and_never_echoed(dotted: str, patch: dict[str, Any]) -> None:
    raw = _minimal()
    for section, values in patch.items():
        raw.setdefault(section, {}).update(values)
    message = _error(raw)
    assert f"\n  - {dotted}: credentials are not allowed" in message, message
    assert _NESTED_SECRET not in message


@pytest.mark.parametrize(
    "raw",
    [
        {"model": {"zoo_config": "x.yaml", "overrides": [{"MODEL.X": 1, "secret_key": _NESTED_SECRET}]}},
        {"model": {"zoo_config": "x.yaml", "overrides": {"bad": [{"password": _NESTED_SECRET}]}}},
        {"model": {"zoo_config": "x.yaml", "weights": [{"token": _NESTED_SECRET}]}},
        {"registry": {"tags": [{"token": _NESTED_SECRET}]}},
    ],
)
def test_no_schema_error_echoes_a_nested_credential(raw: dict[str, Any]) -> None:
    """The schema's own errors (reached without parse_config's first check) mask nested credentials too."""
    from pydantic import ValidationError

    from d2ops.config import ExperimentConfig, _format_validation_error

    raw = {"data": {"source": "x"}, "model": {"zoo_config": "x.yaml"}, **raw}
    with pytest.raises(ValidationError) as info:
        ExperimentConfig.model_validate(raw)
    message = _format_validation_error(info.value, "test.yaml")
    assert _NESTED_SECRET not in message and _NESTED_SECRET not in str(info.value)
    assert "credentials are not allowed" in message


def test_a_value_error_never_echoes_a_credential_or_a_uri_with_credentials() -> None:
    """Values are shown in errors (to help), but masked: a credential-looking key's value, a URI with
    credentials, at any depth."""
    from d2ops.config import _masked

    shown = repr(_masked({"a": [{"password": _NESTED_SECRET, "ok": 1}], "b": (_CRED_URI, "s3://h:9000/b")}))
    assert _NESTED_SECRET not in shown and "'ok': 1" in shown and "s3://h:9000/b" in shown
    _assert_hidden(shown)
    message = _error({**_minimal(), "solver": {"steps": [f"x {_CRED_URI}"]}})  # a URI where an int belongs
    assert "solver.steps[0]: a URI with credentials" in message
    _assert_hidden(message)


def test_invalid_yaml_does_not_quote_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, f"name: x\ndata: {{source: {_CRED_URI}\nmodel: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "is not valid YAML at line" in str(info.value)
    _assert_hidden(str(info.value))


# --- --set overrides -------------------------------------------------------------------------


def test_set_parses_values_as_yaml() -> None:
    raw = apply_overrides(_minimal(), ["solver.max_iter=500", "solver.base_lr=1e-3", "registry.tags=[a, b]"])
    cfg = parse_config(raw)
    assert cfg.solver.max_iter == 500 and isinstance(cfg.solver.max_iter, int)
    assert cfg.solver.base_lr == pytest.approx(0.001)
    assert cfg.registry.tags == ["a", "b"]


def test_set_keeps_a_detectron2_key_whole() -> None:
    raw = apply_overrides(_minimal(), ["model.overrides.MODEL.RPN.NMS_THRESH=0.6"])
    assert raw["model"]["overrides"] == {"MODEL.RPN.NMS_THRESH": 0.6}
    assert parse_config(raw).model.overrides == {"MODEL.RPN.NMS_THRESH": 0.6}


def test_set_does_not_modify_its_input() -> None:
    raw = _minimal()
    apply_overrides(raw, ["solver.max_iter=500"])
    assert raw == _minimal()


def test_set_through_load_config() -> None:
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["solver.max_iter=7", "runtime.device=cpu"])
    assert (cfg.solver.max_iter, cfg.runtime.device) == (7, "cpu")


@pytest.mark.parametrize("item", ["foo", "=3"])
def test_set_without_key_value_is_rejected(item: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("expected KEY=VALUE, e.g. --set solver.max_iter=500")):
        apply_overrides(_minimal(), [item])


def test_set_into_a_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"--set data\.source\.x: 'source' is a value, not a section"):
        apply_overrides(_minimal(), ["data.source.x=1"])


def test_set_unknown_key_is_named() -> None:
    raw = apply_overrides(_minimal(), ["solver.max_iters=500"])
    assert "solver.max_iters: unknown key" in _error(raw)


# --- files -----------------------------------------------------------------------------------


def test_non_mapping_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "- data\n- model\n")
    with pytest.raises(ConfigError, match="top level must be a mapping of sections"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml not found"):
        load_config(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "data: {source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"experiment\.yaml is not valid YAML"):
        load_config(path)


def test_empty_file_names_the_required_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, ""))
    message = str(info.value)
    assert "data: required key is missing" in message
    assert "model: required key is missing" in message


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "balloon.yaml")
    again = load_config(_write(tmp_path, cfg.to_yaml()))
    assert again == cfg


# --- clearml.conf.example --------------------------------------------------------------------

_SECRET_NAMES = {"key", "secret", "access_key", "secret_key", "password", "token"}
_PLACEHOLDER = re.compile(r"^<[A-Z0-9_]+>$")


def _secret_values(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (dotted key, value) whose key names a credential, anywhere in a parsed HOCON tree."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else str(key)
            if str(key).lower() in _SECRET_NAMES or any(w in str(key).lower() for w in ("secret", "password")):
                found.append((dotted, value))
            found += _secret_values(value, dotted)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _secret_values(item, f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def clearml_conf() -> Any:
    from clearml.utilities.pyhocon import ConfigFactory

    return ConfigFactory.parse_file(str(CLEARML_CONF_EXAMPLE))


def test_clearml_conf_example_s3_credentials(clearml_conf: Any) -> None:
    entries = clearml_conf.get("sdk.aws.s3.credentials")
    assert entries, "sdk.aws.s3.credentials is empty"
    for entry in entries:
        assert re.fullmatch(r"[^:/]+:\d+", entry["host"]), f"host {entry['host']!r} needs its port"
        assert entry["secure"] is False
        assert entry["multipart"] is False
    output_uri = clearml_conf.get("sdk.development.default_output_uri")
    assert output_uri.startswith(f"s3://{entries[0]['host']}/")
    assert clearml_conf.get("sdk.development.report_use_subprocess") is False


def test_clearml_conf_example_holds_only_placeholders(clearml_conf: Any) -> None:
    secrets = _secret_values(clearml_conf)
    names = {dotted for dotted, _ in secrets}
    assert {"api.credentials.access_key", "api.credentials.secret_key"} <= names
    assert "sdk.aws.s3.credentials[0].secret" in names
    for dotted, value in secrets:
        assert isinstance(value, str) and _PLACEHOLDER.match(value), f"{dotted} = {value!r} is not a <PLACEHOLDER>"


def test_clearml_conf_is_not_committed() -> None:
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert "clearml.conf" in gitignore


def test_yaml_dump_of_config_has_no_secrets() -> None:
    """What becomes ClearML hyperparameters holds no credential-looking key."""
    for path in CONFIGS:
        dumped = yaml.safe_load(load_config(path).to_yaml())
        assert not _secret_values(dumped), path.name


# --- null: None, null and ~ ------------------------------------------------------------------


@pytest.mark.parametrize("word", ["None", "none", "null", "~", "NULL", "'null'"])
def test_none_means_null_for_every_nullable_key(word: str) -> None:
    """``--set model.weights=None`` reaches the schema as the string "None": it is null, not a path."""
    keys = [
        "model.weights",
        "inference.source",
        "clearml.output_uri",
        "runtime.resume_from",
        "data.dataset_id",
        "data.val_fraction",
        "clearml.steps.train.time_limit_min",
    ]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"{key}={word}" for key in keys])
    assert cfg.model.weights is None and cfg.inference.source is None and cfg.clearml.output_uri is None
    assert cfg.runtime.resume_from is None and cfg.data.dataset_id is None and cfg.data.val_fraction is None
    assert cfg.clearml.steps["train"].time_limit_min is None


def test_none_string_in_a_yaml_file_is_null(tmp_path: Path) -> None:
    path = _write(tmp_path, yaml.safe_dump(_minimal()) + "inference: {source: None}\n")
    assert load_config(path, ["model.weights=None"]).inference.source is None


def test_a_key_that_cannot_be_null_says_so_with_every_such_key_at_once() -> None:
    overrides = ["solver.max_iter=None", "name=null", "data.source=~", "registry.quality_gate=None"]
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "smoke.yaml", overrides)
    message = str(info.value)
    assert "solver.max_iter: cannot be null: give it a value, or leave the key out for its default (1000)" in message
    assert "name: cannot be null" in message and "registry.quality_gate: cannot be null" in message
    assert "data.source: cannot be null: this key is required" in message


# --- at launch: detectron2's keys, steps, every problem in one message ----------------------------

SMOKE = ROOT / "configs" / "smoke.yaml"
ROBOFLOW = ROOT / "configs" / "roboflow.yaml"


def _launch_error(path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        launch_config(path, overrides, inputs="none")
    return str(info.value)


def test_an_override_typo_is_found_at_launch_with_the_closest_key() -> None:
    message = _launch_error(SMOKE, ["model.overrides.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAG=256"])
    assert "model.overrides.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAG: not a key of detectron2's config" in message
    assert "did you mean MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE" in message


def test_an_override_of_the_wrong_type_or_a_section_is_found_at_launch() -> None:
    message = _launch_error(SMOKE, ["model.overrides.TEST.DETECTIONS_PER_IMAGE=many", "model.overrides.MODEL.RPN=1"])
    assert "model.overrides.TEST.DETECTIONS_PER_IMAGE: Type mismatch" in message
    assert "model.overrides.MODEL.RPN: is a section of detectron2's config, not a key" in message


def test_a_zoo_config_typo_is_found_at_launch_with_the_closest_name() -> None:
    message = _launch_error(SMOKE, ["model.zoo_config=COCO-Detection/faster_rcnn_R50_FPN_3x.yaml"])
    assert "model.zoo_config: 'COCO-Detection/faster_rcnn_R50_FPN_3x.yaml' is not in detectron2's model zoo" in message
    assert "did you mean COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml" in message


def test_without_launch_the_detectron2_keys_are_not_checked() -> None:
    """Steps on agents load the config without importing detectron2 for it (the download step checks)."""
    cfg = load_config(SMOKE, ["model.overrides.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAG=256"])
    assert cfg.model.overrides["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAG"] == 256
    # ... and the download step's check names the key with the same suggestion as the launch check
    from d2ops.engine.d2config import check_model_config

    suggestion = r"BATCH_SIZE_PER_IMAG: not a key .*did you mean MODEL\.ROI_HEADS\.BATCH_SIZE_PER_IMAGE"
    with pytest.raises(ValueError, match=suggestion):
        check_model_config(cfg)


def test_shipped_configs_pass_the_launch_checks() -> None:
    for path in CONFIGS:
        launch_config(path, inputs="none")


def test_steps_past_a_max_iter_shrunk_with_set_name_the_set_line_that_fixes_them() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROBOFLOW, ["solver.max_iter=100"])
    message = str(info.value)
    assert "solver.steps: [2000, 2700] must lie strictly between 0 and solver.max_iter (100)" in message
    assert "--set solver.max_iter=100 leaves the config's solver.steps [2000, 2700] past the end" in message
    assert "add --set solver.steps=[] (no lr drops) or steps below it, e.g. --set solver.steps=[67,90]" in message
    fixed = load_config(ROBOFLOW, ["solver.max_iter=100", "solver.steps=[67,90]"])
    assert fixed.solver.steps == [67, 90]


def test_steps_outside_max_iter_in_a_file_name_the_fix() -> None:
    raw = {**_minimal(), "solver": {"max_iter": 100, "steps": [50, 100]}}
    assert "fix: --set solver.steps=[] (no lr drops) or steps below it" in _error(raw)


def test_a_credential_key_comes_with_the_other_problems_in_one_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, ["clearml.secret_key=abc", "solver.max_iters=3", "data.format=yolo"])
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 3, lines
    assert lines[0].startswith("  - clearml.secret_key: credentials are not allowed")
    assert any(line.startswith("  - solver.max_iters: unknown key") for line in lines)
    assert any(line.startswith("  - data.format:") for line in lines)
    assert "abc" not in str(info.value)


def test_every_config_problem_comes_in_one_message() -> None:
    """The schema's errors, the null check, the steps and detectron2's keys: all at once, one line each."""
    overrides = [
        "solver.max_iter=100",
        "model.overrides.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAG=256",
        "model.overrides.SOLVER.BASE_LRR=0.1",
        "data.format=yolo",
        "eval.f_beta=None",
        "clearml.nope=1",
    ]
    message = _launch_error(ROBOFLOW, overrides)
    assert message.startswith(f"invalid config {ROBOFLOW}:")
    for expected in (
        "data.format: got 'yolo'",
        "eval.f_beta: cannot be null",
        "clearml.nope: unknown key",
        "--set solver.steps=[]",
        "BATCH_SIZE_PER_IMAG: not a key of detectron2's config; did you mean MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "SOLVER.BASE_LRR: not a key of detectron2's config; did you mean SOLVER.BASE_LR",
    ):
        assert expected in message
    assert message.count("\n  - ") == 6


# --- roboflow.yaml: the model is named after the data ------------------------------------------


def test_roboflow_names_the_run_and_model_after_the_dataset() -> None:
    """Another Roboflow export is never registered as the aquarium model."""
    example = load_config(ROBOFLOW)
    assert (example.name, example.registry.model_name) == ("aquarium-faster-rcnn", "aquarium-faster-rcnn")
    assert example.registry.tags == ["roboflow", "aquarium", "faster-rcnn"]
    other = load_config(ROBOFLOW, ["data.source=s3://minio.local:9000/datasets/Hard Hats (v2)/"])
    assert (other.name, other.registry.model_name) == ("Hard-Hats-v2-faster-rcnn", "Hard-Hats-v2-faster-rcnn")
    assert other.registry.tags == ["roboflow", "Hard-Hats-v2", "faster-rcnn"]
    named = load_config(ROBOFLOW, ["name=fish-v3", "registry.model_name=fish", "registry.tags=[fish]"])
    assert (named.name, named.registry.model_name, named.registry.tags) == ("fish-v3", "fish", ["fish"])


def test_a_dataset_name_that_cannot_be_derived_is_asked_for_with_the_other_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROBOFLOW, ["data.source=s3://minio.local:9000/", "solver.max_iter=5"])
    message = str(info.value)
    for key in ("name", "registry.model_name", "registry.tags"):
        assert f"\n  - {key}: {{dataset}} is the last part of data.source, which has none here" in message
    assert "--set name=my-run --set registry.model_name=my-model" in message
    assert "solver.steps: [2000, 2700] must lie" in message


def test_a_quoted_tilde_stays_a_path() -> None:
    assert load_config(SMOKE, ["data.cache_dir='~'"]).data.cache_dir == "~"


def test_overrides_of_a_config_file_on_s3_are_not_called_typos(tmp_path: Path) -> None:
    """A detectron2 config file may add keys of its own: only one read here says which keys exist."""
    remote = {"config_file": "s3://minio:9000/configs/custom.yaml", "overrides": {"MODEL.CUSTOM_HEAD.DEPTH": 3}}
    assert detectron2_problems({"model": remote}) == []
    local = tmp_path / "custom.yaml"
    local.write_text("MODEL:\n  CUSTOM_HEAD:\n    DEPTH: 2\n")
    assert detectron2_problems({"model": {**remote, "config_file": str(local)}}) == []
    typo = {**remote, "config_file": str(local), "overrides": {"MODEL.CUSTOM_HEAD.DEPT": 3}}
    assert "did you mean MODEL.CUSTOM_HEAD.DEPTH" in detectron2_problems({"model": typo})[0]


def test_malformed_set_items_come_with_the_config_errors_in_one_message() -> None:
    overrides = ["foo", "solver.max_iter=[", "data.source.x=1", "solver.warmup_iters=-1"]
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, overrides)
    message = str(info.value)
    assert "\n  - --set 'foo': expected KEY=VALUE" in message
    assert "\n  - --set solver.max_iter: the value is not valid YAML" in message
    assert "\n  - --set data.source.x: 'source' is a value, not a section" in message
    assert "\n  - solver.warmup_iters: " in message
    with pytest.raises(ConfigError) as applied:
        apply_overrides({}, ["foo", "bar"])
    assert str(applied.value).count("expected KEY=VALUE") == 2


def test_a_config_file_that_is_not_a_mapping_says_so_with_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections"):
        load_config(_write(tmp_path, "- a\n"), ["solver.max_iter=5"])


def test_one_split_set_on_a_config_that_names_none_keeps_the_default_others() -> None:
    """The fix the missing-split message prints, ``--set data.splits.val=validation``, works on a config
    that leaves data.splits to the schema's default: train and test stay, val changes."""
    model = {"zoo_config": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"}
    raw: dict[str, Any] = {"data": {"source": "s3://minio:9000/d/cells/"}, "model": model}
    cfg = parse_config(apply_overrides(raw, ["data.splits.val=validation"]))
    assert cfg.data.splits == {"train": "train", "val": "validation", "test": "test"}
    assert raw == {"data": {"source": "s3://minio:9000/d/cells/"}, "model": model}, "the given config is unchanged"
    stated = {"data": {"source": "d", "splits": {"train": "images", "val": "v"}}, "model": model}
    assert parse_config(apply_overrides(stated, ["data.splits.val=w"])).data.splits == {"train": "images", "val": "w"}
    bare = parse_config(apply_overrides({"model": model}, ["data.splits.val=w", "data.source=d"]))
    assert bare.data.splits == {"train": "train", "val": "w", "test": "test"}, "no data section at all"


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", ["smoke.yaml", "balloon.yaml", "roboflow.yaml"])
def test_shipped_experiments_state_only_what_differs_from_their_base(name: str) -> None:
    from d2ops.config import BASE_KEY, read_config_file

    own = yaml.safe_load((ROOT / "configs" / name).read_text())
    bases = [own.pop(BASE_KEY)]
    inherited: dict[str, Any] = {}
    for base in bases:
        inherited.update(_leaves(read_config_file(ROOT / "configs" / base)))
    repeated = {k: v for k, v in _leaves(own).items() if k in inherited and inherited[k] == v}
    assert not repeated, f"{name} repeats its base: {repeated}"
    assert read_config_file(ROOT / "configs" / name)["clearml"]["project"] == own["clearml"]["project"]


def test_base_files_merge_mappings_and_replace_the_rest(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text(
        "name: a\nmodel: {zoo_config: Z, overrides: {X.A: 1, X.B: 2}}\nsolver: {steps: [10, 20], max_iter: 30}\n"
    )
    (tmp_path / "base" / "b.yaml").write_text("_BASE_: a.yaml\nname: b\nclearml: {project: p}\n")
    (tmp_path / "exp.yaml").write_text(
        "_BASE_: [base/b.yaml]\ndata: {source: d}\nmodel: {overrides: {X.B: 3}}\nsolver: {steps: [5]}\n"
    )
    from d2ops.config import read_config_file

    assert read_config_file(tmp_path / "exp.yaml") == {
        "name": "b",
        "model": {"zoo_config": "Z", "overrides": {"X.A": 1, "X.B": 3}},
        "solver": {"steps": [5], "max_iter": 30},
        "clearml": {"project": "p"},
        "data": {"source": "d"},
    }
    cfg = load_config(tmp_path / "exp.yaml", ["solver.max_iter=40"])
    assert cfg.solver.max_iter == 40 and cfg.model.overrides == {"X.A": 1, "X.B": 3}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("_BASE_: missing.yaml\n", r"its _BASE_ missing\.yaml was not found \(looked for .*missing\.yaml\)"),
        ("_BASE_: exp.yaml\n", r"_BASE_ exp\.yaml includes itself \(.*exp\.yaml -> .*exp\.yaml\)"),
        ("_BASE_: [1]\n", r"_BASE_ must name a config file, or a list of them, relative to it"),
        ("_BASE_: list.yaml\n", r"list\.yaml \(a _BASE_ of .*\): the top level must be a mapping"),
    ],
)
def test_a_bad_base_is_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "exp.yaml")
