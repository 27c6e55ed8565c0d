"""pipeline_handoff_s: the time from one step's work ending to the next step's work starting.

The offline pipeline (``d2ops.clearml.step.run_offline``, the embedded default) runs five near-empty
steps: each body only writes the small files its step publishes. Everything else is the real
orchestration every step pays: loading and validating the config, ``Task.init`` of an offline
ClearML session, connecting parameters and configuration, uploading the artifacts, writing the
session zip and closing the task. Target: mean hand-off <= 2 s.

Side by side, in the same run: the floor ClearML itself sets, a bare offline ``Task.init`` +
``close`` per step with nothing else. ``handoff_over_floor`` = hand-off / floor.
Also measured: the hand-off when every step is a fresh Python process, as on agents (imports,
ClearML start-up and close included).

    .venv/bin/python bench/bench_pipeline.py [--rounds 3] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from results_io import merge_into

REPO = Path(__file__).resolve().parent.parent

#: The files each step publishes (the artifacts later steps read).
OUTPUTS = {
    "download": ("dataset_manifest",),
    "train": ("weights", "d2_config", "labels", "train_run"),
    "evaluate": ("metrics",),
    "infer": ("predictions", "coco_results"),
    "register": ("model_bundle",),
}


def _near_empty(step: str, marks: list[tuple[str, float, float]]) -> Callable:  # type: ignore[type-arg]
    from d2ops.pipeline.steps import StepContext, StepOutput

    def body(ctx: StepContext) -> StepOutput:
        start = time.time()
        folder = ctx.workdir / step
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in OUTPUTS[step]:
            files[name] = folder / f"{name}.json"
            files[name].write_text(json.dumps({"step": step}))
        marks.append((step, start, time.time()))
        return StepOutput(files=files, values={"step": step})

    return body


def _pipeline_round(work: Path) -> list[float]:
    from d2ops.clearml.step import run_offline
    from d2ops.pipeline.steps import STEPS

    marks: list[tuple[str, float, float]] = []
    functions = {step: _near_empty(step, marks) for step in STEPS}
    overrides = [f"data.source={work / 'data'}", f"runtime.output_dir={work / 'run'}"]
    run_offline(str(REPO / "configs" / "smoke.yaml"), overrides, functions=functions)
    assert [m[0] for m in marks] == list(STEPS)
    return [marks[i + 1][1] - marks[i][2] for i in range(len(marks) - 1)]


def _child(step: str, work: Path, inputs_json: str) -> None:
    """One near-empty step in its own process, as on an agent: prints its marks and artifacts."""
    from d2ops.clearml.session import enable_offline
    from d2ops.clearml.step import run_step
    from d2ops.pipeline.runner import step_parameters

    enable_offline(work / "clearml")
    marks: list[tuple[str, float, float]] = []
    overrides = [f"data.source={work / 'data'}", f"runtime.output_dir={work / 'run'}"]
    params = step_parameters(step, str(REPO / "configs" / "smoke.yaml"), overrides, json.loads(inputs_json))
    result = run_step(step, params, mode="offline", function=_near_empty(step, marks))
    print(json.dumps({"marks": marks[0], "artifacts": result.artifacts}))


def _process_round(work: Path) -> list[float]:
    """Each step a fresh Python process (imports, Task.init, close): the hand-off an agent adds."""
    import os
    import subprocess
    import sys

    from d2ops.pipeline.steps import STEP_INPUTS, STEPS

    env = {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}
    artifacts: dict[str, dict[str, str]] = {}
    marks = []
    for step in STEPS:
        inputs = {name: artifacts[src][art] for name, (src, art) in STEP_INPUTS[step].items()}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", step, "--work", str(work), "--inputs", json.dumps(inputs)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        artifacts[step] = out["artifacts"]
        marks.append(out["marks"])
    return [marks[i + 1][1] - marks[i][2] for i in range(len(marks) - 1)]


def _floor_round() -> list[float]:
    """Bare offline tasks back to back: the previous task's close plus the next one's init."""
    from clearml import Task

    gaps: list[float] = []
    previous = None
    for step in ("download", "train", "evaluate", "infer", "register"):
        if previous is not None:
            work_end = time.perf_counter()
            previous.close()
        task = Task.init(project_name="bench", task_name=step, reuse_last_task_id=False, auto_connect_frameworks=False)
        if previous is not None:
            gaps.append(time.perf_counter() - work_end)
        previous = task
    if previous is not None:
        previous.close()
    return gaps


def _fmt(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.work, args.inputs)
        return

    from d2ops.clearml.session import enable_offline

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        enable_offline(work / "clearml")
        (work / "data").mkdir()
        handoffs: list[float] = []
        floors: list[float] = []
        per_process: list[float] = []
        for round_ in range(args.rounds):
            gaps = _pipeline_round(work / f"round{round_}")
            floor = _floor_round()
            spawned = _process_round(work / f"process{round_}")
            handoffs += gaps
            floors += floor
            per_process += spawned
            print(
                f"round {round_ + 1}: hand-offs {_fmt(gaps)} s; bare-task floor {_fmt(floor)} s; "
                f"one process per step {_fmt(spawned)} s"
            )

    figures = {
        "pipeline_handoff_s": round(statistics.mean(handoffs), 3),
        "pipeline_handoff_max_s": round(max(handoffs), 3),
        "bare_task_handoff_s": round(statistics.mean(floors), 3),
        "handoff_over_floor": round(statistics.mean(handoffs) / statistics.mean(floors), 2),
        "pipeline_handoff_process_per_step_s": round(statistics.mean(per_process), 3),
        "target_pipeline_handoff_s": 2.0,
        "rounds": args.rounds,
        "handoffs_per_round": 4,
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}, python {platform.python_version()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        merge_into(args.json, "pipeline", figures)


if __name__ == "__main__":
    main()
