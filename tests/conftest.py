"""Shared fixtures: one real offline pipeline run (slow, session-scoped) that many tests inspect."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Generate a dataset, serve it from a real local S3 endpoint and run the offline pipeline.

    This is the code path of ``make demo`` with the smoke config: moto's S3 server on 127.0.0.1,
    real detectron2 training on the CPU, one ClearML offline session per step.
    """
    from d2ops.demo import run_demo

    out = tmp_path_factory.mktemp("pipeline")
    previous = os.environ.get("CLEARML_CACHE_DIR")
    summary = run_demo(out, SMOKE_CONFIG)
    yield {"out": out, "summary": summary, "summary_file": json.loads((out / "summary.json").read_text())}
    if previous is None:
        os.environ.pop("CLEARML_CACHE_DIR", None)
    else:
        os.environ["CLEARML_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, loadable model bundle in a second: the smoke architecture, seeded random weights.

    Its predictions are meaningless but deterministic (score threshold 0), which is what
    serving tests need: the same boxes in-process and over HTTP.
    """
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2ops.config import load_config
    from d2ops.datasets import SHAPE_CLASSES, RegisteredDataset
    from d2ops.registry import build_bundle
    from d2ops.training import build_d2_config

    work = tmp_path_factory.mktemp("tiny_bundle")
    cfg = load_config(SMOKE_CONFIG, ["runtime.device=cpu"])
    dataset = RegisteredDataset(
        names={"train": "unused", "val": "unused"}, class_names=list(SHAPE_CLASSES), json_files={}
    )
    d2 = build_d2_config(cfg, dataset, work / "train")
    d2.defrost()
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    d2.freeze()
    torch.manual_seed(0)
    model = build_model(d2)
    (work / "train").mkdir()
    DetectionCheckpointer(model, save_dir=str(work / "train")).save("model_final")
    (work / "train" / "config.yaml").write_text(d2.dump())
    return build_bundle(
        work / "bundle",
        weights=work / "train" / "model_final.pth",
        d2_config=work / "train" / "config.yaml",
        labels=list(SHAPE_CLASSES),
        metrics={"bbox": {"AP50": 0.0}},
        metadata={"experiment": "tiny", "dataset_identity": "none"},
    )
