"""Champion/challenger gate: the register step compares a candidate with the production model.

Two real detectors are trained here on the synthetic shapes (the smoke architecture): a good one
(80 iterations) and a bad one (10). The register step then runs for real, as the offline
pipeline runs it (``d2ops.clearml.step.run_step``: a ClearML offline session, the local registry
folder), and every assertion reads what it left on disk. Fast unit tests of the decision
function, the local store and the config schema come first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from d2ops.config import ConfigError, load_config, parse_config
from d2ops.model.bundle import code_version
from d2ops.registry.champion import Champion, ChampionConflictError, LocalChampionStore, retired_tags
from d2ops.registry.gate import GateResult, decide, labels_mismatch
from d2ops.utils.offline_session import session_file

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")

# --------------------------------------------------------------------------- decision function


def _floor(passed: bool = True) -> GateResult:
    return GateResult("bbox.AP50", 95.0 if passed else 10.0, 50.0, passed)


def _decide(candidate: float, champion: float | None, min_improvement: float = 0.5, **kw: Any) -> Any:
    return decide(
        kw.pop("floor", _floor()),
        metric="bbox.AP",
        candidate_score=candidate,
        champion_id=None if champion is None and not kw.get("not_comparable") else "champ-1",
        champion_score=champion,
        min_improvement=min_improvement,
        **kw,
    )


def test_decide_no_champion_the_floor_decides() -> None:
    assert _decide(40.0, None).promote is True
    assert "no champion yet" in _decide(40.0, None).reason
    failed = _decide(40.0, None, floor=_floor(False))
    assert failed.promote is False and "below the quality floor" in failed.reason


def test_decide_needs_the_margin_and_a_strict_improvement() -> None:
    assert _decide(60.5, 60.0).promote is True, "exactly the margin is enough"
    assert _decide(60.4, 60.0).promote is False
    assert _decide(60.0, 60.0, min_improvement=0.0).promote is False, "a tie never wins"
    assert _decide(60.01, 60.0, min_improvement=0.0).promote is True
    worse = _decide(50.0, 60.0)
    assert worse.promote is False and worse.margin == pytest.approx(-10.0)
    assert "does not beat the champion by 0.5" in worse.reason and "champ-1" in worse.reason
    assert worse.to_dict()["margin"] == pytest.approx(-10.0)
    assert worse.to_dict()["floor"]["passed"] is True


def test_decide_floor_beats_a_better_score() -> None:
    below = _decide(90.0, 10.0, floor=_floor(False))
    assert below.promote is False and "below the quality floor" in below.reason


def test_decide_incomparable_or_disabled_champion_falls_back_to_the_floor() -> None:
    why = labels_mismatch(["cat"], ["square", "circle"])
    assert why and "differ" in why
    assert labels_mismatch(["a", "b"], ["a", "b"]) is None
    odd = _decide(30.0, None, not_comparable=why)
    assert odd.promote is True and "not comparable" in odd.reason and odd.margin is None
    assert _decide(30.0, float("nan")).promote is True
    assert _decide(float("nan"), 30.0).promote is False
    off = decide(
        _floor(),
        metric="bbox.AP50",
        candidate_score=95.0,
        champion_id=None,
        champion_score=None,
        min_improvement=0.0,
        compare=False,
    )
    assert off.promote is True and "enabled: false" in off.reason


def test_retired_tags_are_dated() -> None:
    assert retired_tags("production-retired", datetime(2025, 1, 31, tzinfo=timezone.utc)) == [
        "production-retired",
        "production-retired-2025-01-31",
    ]


# --------------------------------------------------------------------------- config


def _raw(**registry: Any) -> dict[str, Any]:
    return {
        "data": {"source": "outputs/datasets/shapes"},
        "model": {"zoo_config": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"},
        "registry": registry,
    }


def test_champion_config_defaults_and_values() -> None:
    cfg = parse_config(_raw(champion={"metric": "bbox.AP", "min_improvement": 0.5, "retired_tag": "old"}))
    gate = cfg.registry.champion
    assert (gate.enabled, gate.metric, gate.min_improvement, gate.tag, gate.retired_tag) == (
        True,
        "bbox.AP",
        0.5,
        "production",
        "old",
    )
    assert cfg.registry.local_dir == "outputs/registry"
    assert load_config(SMOKE).registry.champion.tag == "production"


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ({"champion": {"min_improvement": -1}}, r"registry\.champion\.min_improvement: .*greater than or equal to 0"),
        ({"champion": {"tag": "prod", "retired_tag": "prod"}}, r"retired_tag must differ .*'prod'"),
        ({"champion": {"tag": "in production"}}, r"registry\.champion\.tag: must be a tag .*no spaces"),
        ({"champion": {"metric": "bbox AP"}}, r"registry\.champion\.metric: must be a dotted metric name"),
        ({"champion": {"threshold": 1}}, r"registry\.champion\.threshold: unknown key"),
        ({"tags": ["smoke", "production"]}, r"registry\.tags must not contain \['production'\]"),
    ],
)
def test_champion_config_errors_name_the_key(registry: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(_raw(**registry), "test.yaml")


# --------------------------------------------------------------------------- local store


def test_local_store_refuses_a_stale_decision(tmp_path: Path, tiny_bundle: Path) -> None:
    store = LocalChampionStore(tmp_path, "m")
    assert store.current() is None
    decision = _decide(40.0, None)
    first = store.promote(tiny_bundle, registration={}, decision=decision, previous=None)
    champion = store.current()
    assert champion is not None and champion.id == first.champion_id
    assert (champion.bundle / "model_final.pth").is_file() and champion.tags == ("production",)
    with pytest.raises(ChampionConflictError, match="rerun the register step"):
        store.promote(tiny_bundle, registration={}, decision=decision, previous=None)
    stale = Champion("someone-else", tiny_bundle)
    with pytest.raises(ChampionConflictError):
        store.promote(tiny_bundle, registration={}, decision=decision, previous=stale)
    assert store.current() == champion and len(store.history()) == 1


def test_local_store_names_a_broken_pointer(tmp_path: Path) -> None:
    store = LocalChampionStore(tmp_path, "m")
    store.folder.mkdir(parents=True)
    store.pointer.write_text(json.dumps({"id": "gone"}))
    with pytest.raises(FileNotFoundError, match=r"delete .*production\.json"):
        store.current()


# --------------------------------------------------------------------------- store selection, ClearML store


def test_offline_sessions_and_plain_library_use_the_local_store(tmp_path: Path) -> None:
    from d2ops.clearml.models import open_champion_store
    from d2ops.clearml.session import enable_offline, step_lineage
    from d2ops.clearml.step import open_step

    cfg = load_config(SMOKE, [f"registry.local_dir={tmp_path}"])
    store = open_champion_store(cfg)
    assert isinstance(store, LocalChampionStore) and store.folder == tmp_path / cfg.registry.model_name
    previous = os.environ.get("CLEARML_CACHE_DIR")
    enable_offline(tmp_path / "clearml")
    try:
        with open_step("register", cfg, {"config": SMOKE}, mode="offline") as run:
            assert isinstance(open_champion_store(cfg), LocalChampionStore)
            assert step_lineage() == {"step_task": str(run.task.id), "pipeline_run": None}
    finally:
        if previous is None:
            os.environ.pop("CLEARML_CACHE_DIR", None)
        else:
            os.environ["CLEARML_CACHE_DIR"] = previous


def test_clearml_store_calls_the_sdk_with_its_real_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server here: the query is checked against ``Model.query_models``' real signature, and a
    promotion of a model the gate did not publish is refused before any server call."""
    import inspect

    from clearml import Model

    from d2ops.clearml.models import ClearMLChampionStore

    real = inspect.signature(Model.query_models)
    calls: list[dict[str, Any]] = []

    def query_models(*args: Any, **kwargs: Any) -> list[Any]:
        calls.append(real.bind(*args, **kwargs).arguments)
        return []

    monkeypatch.setattr(Model, "query_models", query_models)
    store = ClearMLChampionStore("d2ops/smoke", "d2ops-shapes-smoke", "production", "production-retired")
    assert store.current() is None
    (call,) = calls
    assert call["project_name"] == "d2ops/smoke" and call["model_name"] == "d2ops-shapes-smoke"
    assert call["tags"] == ["production"] and call["only_published"] is True and call["max_results"] == 1
    with pytest.raises(RuntimeError, match="was not published"):
        store.promote(
            Path("."), registration={"id": "x", "published": False}, decision=_decide(1.0, None), previous=None
        )


def test_clearml_store_refuses_a_stale_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run promoted a model while this one evaluated: nothing is re-tagged, the step says why."""
    import inspect
    from types import SimpleNamespace

    from clearml import Model

    from d2ops.clearml.models import ClearMLChampionStore
    from d2ops.registry.champion import ChampionConflictError

    real = inspect.signature(Model.query_models)

    def query_models(*args: Any, **kwargs: Any) -> list[Any]:
        real.bind(*args, **kwargs)
        return [SimpleNamespace(id="model-new"), SimpleNamespace(id="model-from-another-run")]

    monkeypatch.setattr(Model, "query_models", query_models)
    store = ClearMLChampionStore("d2ops/smoke", "d2ops-shapes-smoke", "production", "production-retired")
    assert store.tag_on_register is False  # the tag is added only after the old champion is retired
    with pytest.raises(ChampionConflictError, match=r"now \['model-from-another-run'\].*rerun the register step"):
        store.promote(
            Path("."), registration={"id": "model-new", "published": True}, decision=_decide(1.0, None), previous=None
        )


# --------------------------------------------------------------------------- real models, real step


def _train(cfg_overrides: list[str], workdir: Path) -> dict[str, str]:
    from d2ops.pipeline.steps import StepContext, run_evaluate, run_train

    cfg = load_config(SMOKE, cfg_overrides)
    ctx = StepContext(cfg=cfg, workdir=workdir)
    train = run_train(ctx)
    inputs = {"weights": str(train.files["weights"]), "d2_config": str(train.files["d2_config"])}
    evaluate = run_evaluate(StepContext(cfg=cfg, workdir=workdir, inputs=inputs))
    return {**inputs, "labels": str(train.files["labels"]), "metrics": str(evaluate.files["metrics"])}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A dataset, its download manifest, and two real detectors: good (80 iterations) and bad (10)."""
    from d2ops.clearml.session import enable_offline
    from d2ops.data.synthetic import generate_shapes_dataset
    from d2ops.pipeline.steps import StepContext, run_download

    root = tmp_path_factory.mktemp("gate")
    previous = os.environ.get("CLEARML_CACHE_DIR")
    enable_offline(root / "clearml")
    dataset = generate_shapes_dataset(root / "data", counts={"train": 40, "valid": 4, "test": 8}, seed=1)
    base = [
        f"data.source={dataset}",
        f"data.cache_dir={root / 'cache'}",
        "runtime.device=cpu",
        "solver.eval_period=0",
        "solver.checkpoint_period=1000",
        "registry.quality_gate.min_value=0",
    ]
    manifest = run_download(StepContext(cfg=load_config(SMOKE, base), workdir=root / "download"))
    common = {"dataset_manifest": str(manifest.files["dataset_manifest"])}
    good = _train([*base, "solver.max_iter=80", "solver.warmup_iters=30"], root / "good")
    bad = _train([*base, "solver.max_iter=10", "solver.warmup_iters=10"], root / "bad")
    ap = {name: json.loads(Path(m["metrics"]).read_text())["bbox"]["AP"] for name, m in (("good", good), ("bad", bad))}
    assert ap["good"] > ap["bad"] + 5, f"the two detectors are not clearly apart: {ap}"
    yield {"root": root, "base": base, "good": {**good, **common}, "bad": {**bad, **common}, "ap": ap}
    if previous is None:
        os.environ.pop("CLEARML_CACHE_DIR", None)
    else:
        os.environ["CLEARML_CACHE_DIR"] = previous


def _register(models: dict[str, Any], which: str, registry: Path, *extra: str) -> Any:
    """Run the real register step, offline, as the pipeline does; returns its StepResult."""
    from d2ops.clearml.step import run_step
    from d2ops.pipeline.runner import step_parameters

    workdir = registry.parent / f"run-{which}-{len(list(registry.parent.glob('run-*')))}"
    overrides = [*models["base"], f"runtime.output_dir={workdir}", f"registry.local_dir={registry}", *extra]
    return run_step("register", step_parameters("register", SMOKE, overrides, models[which]), mode="offline")


def _store(registry: Path) -> LocalChampionStore:
    return LocalChampionStore(registry, load_config(SMOKE).registry.model_name)


def _offline_model(result: Any) -> dict[str, Any]:
    task = json.loads(session_file(result.session, "task.json") or b"{}")
    (model,) = task["offline_output_models"]
    return model["init"]


def _comment_metadata(init: dict[str, Any]) -> dict[str, Any]:
    """The model comment: ClearML's own first line, then d2ops' headline, then the metadata JSON."""
    *_, headline, body = init["comment"].splitlines()
    return {"headline": headline, **json.loads(body)}


@pytest.fixture(scope="module")
def good_champion(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An empty registry, then the good model through the real register step."""
    registry = tmp_path_factory.mktemp("good_champion") / "registry"
    return {"registry": registry, "result": _register(models, "good", registry)}


def _copy_registry(good_champion: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the registry holding the good champion (each test changes its own)."""
    registry = tmp_path / "registry"
    shutil.copytree(good_champion["registry"], registry)
    return registry


@pytest.mark.slow
def test_first_model_becomes_production(good_champion: dict[str, Any]) -> None:
    result = good_champion["result"]
    gate = result.values["champion_gate"]
    assert gate["promote"] is True and "no champion yet" in gate["reason"]
    assert gate["champion_id"] is None and gate["scored_in"] == "evaluate step"
    store = _store(good_champion["registry"])
    champion = store.current()
    assert champion is not None and champion.id == result.values["promotion"]["champion_id"]
    assert champion.tags == ("production",) and champion.metadata["champion_gate"]["promote"] is True
    assert [e["event"] for e in store.history()] == ["promoted"]
    init = _offline_model(result)
    assert "production" in init["tags"] and "smoke" in init["tags"]
    assert "promoted to production" in init["comment"] and "quality gate passed" in init["comment"]
    assert _summary_values(result)["gate/promoted"] == 1.0


@pytest.mark.slow
def test_worse_challenger_is_not_promoted(
    models: dict[str, Any], good_champion: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = _copy_registry(good_champion, tmp_path)
    champion_id = good_champion["result"].values["promotion"]["champion_id"]
    with caplog.at_level(logging.INFO, logger="d2ops.pipeline.steps"):
        result = _register(models, "bad", registry)
    gate = result.values["champion_gate"]
    assert gate["promote"] is False and result.values["promotion"] is None
    assert gate["champion_id"] == champion_id and gate["scored_in"] == "register step"
    assert gate["champion_score"] == pytest.approx(models["ap"]["good"], abs=1e-6)
    assert gate["candidate_score"] == pytest.approx(models["ap"]["bad"], abs=1e-6)
    assert gate["margin"] < 0
    assert "not promoted to production: does not beat the champion" in caplog.text
    store = _store(registry)
    current = store.current()
    assert current is not None and current.id == champion_id
    assert store.record(champion_id)["tags"] == ["production"]
    assert len(store.history()) == 1
    init = _offline_model(result)
    assert "production" not in init["tags"] and "not promoted to production" in init["comment"]
    meta = json.loads((Path(result.values["bundle"]) / "metadata.json").read_text())
    assert meta["champion_gate"]["champion_score"] == gate["champion_score"]
    assert meta["champion_gate"]["candidate_score"] == gate["candidate_score"]
    assert result.values["registration"]["publish_requested"] is False
    summary = _summary_values(result)
    assert summary["gate/promoted"] == 0.0
    assert summary["gate/champion bbox.AP"] == pytest.approx(gate["champion_score"])
    assert summary["gate/candidate bbox.AP"] == pytest.approx(gate["candidate_score"])
    assert summary["gate/margin bbox.AP"] == pytest.approx(gate["margin"])


@pytest.mark.slow
def test_equal_challenger_does_not_win_with_a_margin(
    models: dict[str, Any], good_champion: dict[str, Any], tmp_path: Path
) -> None:
    registry = _copy_registry(good_champion, tmp_path)
    result = _register(models, "good", registry, "registry.champion.min_improvement=0.5")
    gate = result.values["champion_gate"]
    assert gate["promote"] is False and gate["margin"] == pytest.approx(0.0, abs=1e-9)
    assert gate["candidate_score"] == pytest.approx(models["ap"]["good"], abs=1e-6), "re-scored like the evaluate step"
    assert "does not beat the champion by 0.5" in gate["reason"]
    current = _store(registry).current()
    assert current is not None and current.id == good_champion["result"].values["promotion"]["champion_id"]


def _summary_values(result: Any) -> dict[str, float]:
    """The single values (ClearML's Summary table) the step reported in its offline session."""
    values: dict[str, float] = {}
    for line in (session_file(result.session, "metrics.jsonl") or b"").decode().splitlines():
        for event in json.loads(line):
            if event.get("metric") == "Summary":
                values[event["variant"]] = event["value"]
    return values


@pytest.fixture(scope="module")
def replacement(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bad champion, then a good challenger (margin 0.5) through the real register step."""
    registry = tmp_path_factory.mktemp("replacement") / "registry"
    first = _register(models, "bad", registry)
    second = _register(models, "good", registry, "registry.champion.min_improvement=0.5")
    return {"registry": registry, "first": first, "second": second}


@pytest.mark.slow
def test_better_challenger_replaces_and_retires_the_champion(replacement: dict[str, Any]) -> None:
    old_id = replacement["first"].values["promotion"]["champion_id"]
    result = replacement["second"]
    gate = result.values["champion_gate"]
    assert gate["promote"] is True and gate["champion_id"] == old_id and gate["margin"] >= 0.5
    promotion = result.values["promotion"]
    store = _store(replacement["registry"])
    current = store.current()
    assert current is not None and current.id == promotion["champion_id"] != old_id
    today = f"production-retired-{datetime.now(timezone.utc):%Y-%m-%d}"
    assert promotion["retired_id"] == old_id and promotion["retired_tags"] == ["production-retired", today]
    old = store.record(old_id)
    assert old["tags"] == ["production-retired", today] and old["replaced_by"] == current.id and old["retired_at"]
    assert (store.folder / "models" / old_id / "model_final.pth").is_file(), "the old champion's bundle is kept"
    events = [(e["event"], e["id"]) for e in store.history()]
    assert events == [("promoted", old_id), ("promoted", current.id), ("retired", old_id)]
    assert "production" in _offline_model(result)["tags"]


@pytest.mark.slow
def test_lineage_metadata_in_bundle_model_record_and_step_values(
    models: dict[str, Any], replacement: dict[str, Any]
) -> None:
    from d2ops.config import config_hash

    result = replacement["second"]
    manifest = json.loads(Path(models["good"]["dataset_manifest"]).read_text())
    meta = json.loads((Path(result.values["bundle"]) / "metadata.json").read_text())
    expected = {
        "dataset_source": str(load_config(SMOKE, models["base"]).data.source),
        "dataset_identity": manifest["identity"],
        "dataset_clearml_id": None,
        "pipeline_run": None,  # offline: no pipeline controller
        "step_task": result.task_id,
        "code_version": code_version(),
    }
    assert manifest["identity"]
    for key, value in expected.items():
        assert meta[key] == value, key
        assert result.values["lineage"][key] == value, key
    assert len(meta["config_hash"]) == 16 and meta["config_hash"] == result.values["lineage"]["config_hash"]
    override_cfg = load_config(
        SMOKE,
        [
            *models["base"],
            f"runtime.output_dir={Path(result.values['bundle']).parents[1]}",
            f"registry.local_dir={replacement['registry']}",
            "registry.champion.min_improvement=0.5",
        ],
    )
    assert meta["config_hash"] == config_hash(override_cfg)
    gate = meta["champion_gate"]
    assert gate["champion_id"] == replacement["first"].values["promotion"]["champion_id"]
    assert {"candidate_score", "champion_score", "margin", "min_improvement", "reason"} <= set(gate)
    assert gate["min_improvement"] == 0.5 and gate["promote"] is True
    assert meta["quality_gate"]["passed"] is True

    record = _comment_metadata(_offline_model(result))
    assert "promoted to production" in record["headline"]
    for key, value in expected.items():
        assert record[key] == value, key
    assert record["champion_gate"] == gate and record["config_hash"] == meta["config_hash"]


@pytest.mark.slow
def test_unknown_champion_metric_fails_before_any_evaluation(
    models: dict[str, Any], good_champion: dict[str, Any], tmp_path: Path
) -> None:
    registry = _copy_registry(good_champion, tmp_path)
    with pytest.raises(KeyError, match=r"registry\.champion\.metric 'bbox\.APX' is not in the evaluation metrics"):
        _register(models, "bad", registry, "registry.champion.metric=bbox.APX")
    assert not list(tmp_path.glob("run-*/register")), "no model was evaluated"
    assert len(_store(registry).history()) == 1
