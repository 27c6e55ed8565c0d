"""``make demo``: the whole pipeline on one machine, with no ClearML server and no GPU.

It generates a synthetic COCO dataset, serves it from a local S3 endpoint (moto, on 127.0.0.1),
runs the offline pipeline through every step, stops the endpoint, prints a summary and writes
``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2ops.clearml.session import enable_offline
from d2ops.config import load_config
from d2ops.utils.jsonio import write_json

__all__ = ["demo_main", "run_demo", "summarize"]

log = logging.getLogger(__name__)


def summarize(run: Any, seconds: float) -> dict[str, Any]:
    """The demo's summary.json: headline metrics, the bundle and the offline sessions."""
    metrics = run.steps["evaluate"].values
    register = run.steps["register"].values
    return {
        "bbox": {**metrics["bbox"], "per_class": metrics["per_class_ap"]},
        "f2": metrics.get("f2", metrics["f_beta"]),
        "precision": metrics["precision"],
        "recall": metrics["recall"],
        "score_threshold": metrics["score_threshold"],
        "quality_gate": register["gate"],
        "champion_gate": register.get("champion_gate"),
        "model_bundle": register["bundle"],
        "model_registration": register["registration"],
        "predictions": run.steps["infer"].artifacts.get("predictions"),
        "clearml_sessions": run.sessions,
        "train_seconds": run.steps["train"].values.get("seconds"),
        "device": run.steps["train"].values.get("device"),
        "total_seconds": round(seconds, 1),
    }


def run_demo(out_dir: Path, config: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Generate data, serve it over local S3, run the offline pipeline; returns the summary."""
    from d2ops import storage
    from d2ops.clearml.step import run_offline
    from d2ops.datasets import generate_shapes_dataset
    from d2ops.s3server import local_s3_endpoint

    tic = time.perf_counter()
    out_dir = out_dir.resolve()
    for stale in ("run", "cache", "clearml", "registry"):
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    enable_offline(out_dir / "clearml")
    dataset = generate_shapes_dataset(out_dir / "dataset", seed=0)
    with local_s3_endpoint() as s3:
        uri = s3.uri("d2ops-demo", "datasets/shapes/")
        storage.upload(dataset, uri, create_bucket=True, progress=False)
        log.info("dataset uploaded to %s", uri)
        cfg = load_config(config, [*overrides, f"data.source={uri}"])
        all_overrides = [
            f"inference.source={uri}{cfg.data.splits[cfg.eval.split]}/",  # batch inference straight from S3
            *overrides,
            f"data.source={uri}",
            f"data.cache_dir={out_dir / 'cache'}",
            f"runtime.output_dir={out_dir / 'run'}",
            f"registry.local_dir={out_dir / 'registry'}",  # the offline model registry (champion)
        ]
        load_config(config, all_overrides)  # fail fast on a bad config, before any work
        run = run_offline(config, all_overrides)
    summary = summarize(run, time.perf_counter() - tic)
    write_json(out_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any], path: Path) -> str:
    bbox = summary["bbox"]
    per_class = ", ".join(f"{k} {v:.1f}" for k, v in bbox["per_class"].items())
    gate = summary["quality_gate"]
    lines = [
        "",
        "d2ops demo: offline pipeline finished",
        f"  bbox AP {bbox['AP']:.1f}  AP50 {bbox['AP50']:.1f}  AP75 {bbox['AP75']:.1f}   per class: {per_class}",
        f"  precision {summary['precision']:.3f}  recall {summary['recall']:.3f}  F2 {summary['f2']:.3f}"
        f"  (score >= {summary['score_threshold']})",
        f"  quality gate {gate['metric']} >= {gate['min_value']}: {'PASSED' if gate['passed'] else 'FAILED'}",
        *_champion_line(summary.get("champion_gate")),
        f"  model bundle      {summary['model_bundle']}",
        f"  predictions       {summary['predictions']}",
        "  ClearML offline sessions (import with Task.import_offline_session(<folder>.zip)):",
        *(f"    {step:<9} {folder}" for step, folder in summary["clearml_sessions"].items()),
        f"  trained on {summary['device']} in {summary['train_seconds']:.0f} s; total {summary['total_seconds']:.0f} s",
        f"  summary written to {path}",
    ]
    return "\n".join(lines)


def _champion_line(decision: dict[str, Any] | None) -> list[str]:
    if not decision:
        return []
    verdict = "PROMOTED to production" if decision.get("promote") else "not promoted"
    return [f"  champion/challenger: {verdict} ({decision.get('reason', '')})"]


def demo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2ops demo", description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/demo", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from d2ops.cli import fail, user_errors_types

    try:
        summary = run_demo(args.out, args.config, args.overrides)
    except user_errors_types() as err:
        return fail(err)
    print(format_summary(summary, args.out / "summary.json"))
    return 0
