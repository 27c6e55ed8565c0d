"""train_overhead_ratio: the project's train step vs a plain detectron2 DefaultTrainer.

Same config, same data, same number of iterations, in the same process, alternating A/B rounds.
The project's side is ``d2ops.engine.trainer.train`` reporting to a real ClearML (offline) task through
its EventWriter; the baseline is detectron2's ``DefaultTrainer`` on the identical frozen config.
Ratio = (project iterations/s) / (baseline iterations/s); target >= 0.97.

    .venv/bin/python bench/bench_train.py [--iters 40] [--rounds 3] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import merge_into

REPO = Path(__file__).resolve().parent.parent


def _baseline(d2cfg) -> float:  # type: ignore[no-untyped-def]
    from detectron2.engine import DefaultTrainer

    trainer = DefaultTrainer(d2cfg)
    trainer.resume_or_load(resume=False)
    tic = time.perf_counter()
    trainer.train()
    return time.perf_counter() - tic


def _project(cfg, dataset, out: Path) -> float:  # type: ignore[no-untyped-def]
    from clearml import Task

    from d2ops.clearml.step import ClearMLReporter
    from d2ops.engine.trainer import train

    task = Task.init(
        project_name="d2ops/bench",
        task_name="train-overhead",
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
        auto_resource_monitoring=False,
        auto_connect_arg_parser=False,
    )
    try:
        result = train(cfg, dataset, out, reporter=ClearMLReporter(task), resume=False)
    finally:
        task.close()
    return result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args()

    from d2ops.clearml.session import enable_offline
    from d2ops.config import load_config
    from d2ops.data.registration import register_splits
    from d2ops.data.synthetic import generate_shapes_dataset
    from d2ops.engine.d2config import build_d2_config

    work = Path(tempfile.mkdtemp(prefix="d2ops-bench-train-"))
    enable_offline(work / "clearml")
    data = generate_shapes_dataset(work / "data", counts={"train": 60, "valid": 4, "test": 4})
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.source={data}",
            f"solver.max_iter={args.iters}",
            "solver.eval_period=0",
            "solver.checkpoint_period=100000",
        ],
    )
    dataset = register_splits(data, cfg.data)
    baseline_s, project_s = [], []
    for r in range(args.rounds):
        baseline_s.append(_baseline(build_d2_config(cfg, dataset, work / f"base{r}")))
        project_s.append(_project(cfg, dataset, work / f"proj{r}"))
        print(f"round {r}: baseline {baseline_s[-1]:.2f} s, project {project_s[-1]:.2f} s")
    ratio = statistics.median(baseline_s) / statistics.median(project_s)
    figures = {
        "train_overhead_ratio": round(ratio, 4),
        "iterations": args.iters,
        "rounds": args.rounds,
        "baseline_s_per_iter": round(statistics.median(baseline_s) / args.iters, 4),
        "project_s_per_iter": round(statistics.median(project_s) / args.iters, 4),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": f"{platform.platform()}, {torch.get_num_threads()} torch threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    merge_into(args.json, "train", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
