"""Command-line entry points: ``d2ops demo``, ``d2ops pipeline``, ``d2ops step`` and ``d2ops serve``.

tasks/*.py and pipelines/*.py are thin wrappers over :func:`step_main` and :func:`pipeline_main`.
``d2ops export`` and ``d2ops serving`` hand over to :mod:`d2ops.serving.nuclio` and :mod:`d2ops.clearml.serving`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2ops.config import ConfigError, load_config

__all__ = ["main", "pipeline_main", "schedule_main", "step_main"]

log = logging.getLogger("d2ops")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _add_config_args(
    parser: argparse.ArgumentParser, default_config: str | None = None, *, required: bool = True
) -> None:
    parser.add_argument(
        "--config", default=default_config, required=required and default_config is None, help="experiment YAML"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set solver.max_iter=500 (repeatable)",
    )
    parser.add_argument("--dataset-uri", help="shortcut for --set data.source=URI")


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"data.source={args.dataset_uri}"] if args.dataset_uri else [])]


def user_errors_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported as one clear message, not a traceback."""
    from d2ops.pipeline import StepStopped, StepTimeLimitExceeded
    from d2ops.storage import StorageError
    from d2ops.training import TrainingDiverged
    from d2ops.validation import DataValidationError

    return (
        ConfigError,
        DataValidationError,
        StorageError,
        TrainingDiverged,
        StepTimeLimitExceeded,
        StepStopped,
        FileNotFoundError,
        ValueError,
        KeyError,
    )


def fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def step_main(step: str, argv: Sequence[str] | None = None) -> int:
    """Run one pipeline step as a ClearML task (offline, here with a server, or on a queue)."""
    from d2ops.clearml.session import on_agent
    from d2ops.clearml.step import run_step
    from d2ops.pipeline import step_parameters
    from d2ops.steps import STEP_INPUTS

    # On a clearml-agent the script runs without arguments; its parameters come from the task.
    agent = on_agent()
    parser = argparse.ArgumentParser(prog=f"tasks/{step}.py", description=f"d2ops {step} step")
    _add_config_args(parser, required=not agent)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="no ClearML server: keep an offline session")
    mode.add_argument("--remote", action="store_true", help="enqueue on a ClearML queue (execute_remotely)")
    parser.add_argument("--queue", help="queue for --remote (default: clearml.queues.<step> of the config)")
    for name in STEP_INPUTS[step]:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default="", help=f"input: {name} (URI or path)")
    args = parser.parse_args(argv)
    _setup_logging()
    inputs = {name: getattr(args, name) for name in STEP_INPUTS[step]}
    user_errors = user_errors_types()
    try:
        if not agent:
            # Every config mistake in one message, before any ClearML task is created or data moves.
            # Inputs: S3 from here; local paths only when the step runs here (on an agent they are its disk's).
            # The device too when it runs here, but not for download, which never uses it.
            local = not args.remote
            load_config(args.config, _overrides(args), launch=True, inputs="all" if local else "s3",
                        device=local and step != "download")  # fmt: skip
        result = run_step(
            step,
            step_parameters(step, args.config or "", _overrides(args), inputs),
            mode="offline" if args.offline else "remote" if args.remote else "local",
            queue=args.queue,
        )
    except user_errors as err:
        return fail(err)
    print(json.dumps({"step": step, "task_id": result.task_id, "artifacts": result.artifacts}, indent=2))
    return 0


def pipeline_main(argv: Sequence[str] | None = None) -> int:
    """Run the whole pipeline: --offline (no server), --local (server, local steps) or on queues."""
    from d2ops.clearml.cluster import preflight
    from d2ops.clearml.controller import build_controller, controller_experiment, start_controller
    from d2ops.clearml.session import on_agent
    from d2ops.clearml.step import run_offline

    # On the services agent the controller script starts with no arguments: the experiment is read
    # back from the controller task (controller_experiment), never from the default --config.
    agent = on_agent()
    parser = argparse.ArgumentParser(prog="pipelines/run_pipeline.py", description="d2ops training pipeline")
    _add_config_args(parser, "configs/demo.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="no ClearML server, no agents (embedded default)")
    mode.add_argument("--local", action="store_true", help="a ClearML server; steps run as local processes")
    args = parser.parse_args(argv)
    _setup_logging()
    overrides = _overrides(args)
    user_errors = user_errors_types()
    try:
        # Every config mistake (schema, detectron2 keys, inputs) in one message, before any task or transfer.
        # Local paths are checked when the steps run here (--offline, --local), not for agents' disks.
        paths = args.offline or args.local
        launched = None if agent else load_config(args.config, overrides, launch=True, inputs="all" if paths else "s3")
        if args.offline:
            from d2ops.report import format_summary, write_outputs

            assert launched is not None  # --offline never runs on an agent
            tic = time.perf_counter()
            run = run_offline(args.config, overrides)
            out = Path(launched.runtime.output_dir)
            summary, report = write_outputs(run, out, time.perf_counter() - tic,
                                            debug_images=launched.inference.debug_images)  # fmt: skip
            print(format_summary(summary, out / "summary.json", report))
            return 0
        cfg = controller_experiment(launched)
        if not agent:
            preflight(cfg, check_queues=not args.local)
        pipe = build_controller(cfg, "" if agent else args.config)
        # Before start: in remote mode this process hands the controller to the services queue.
        print(json.dumps({"pipeline_task_id": pipe.id, "project": cfg.clearml.project}), flush=True)
        start_controller(pipe, "local" if args.local else "remote", cfg.clearml.queues.controller)
    except user_errors as err:
        return fail(err)
    except RuntimeError as err:  # the controller failed; its task is marked failed with the reason
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def schedule_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops schedule cron|on-data``: retrain by cloning a template pipeline run (see d2ops.clearml.schedules)."""
    from d2ops.clearml import schedules as scheduling

    parser = argparse.ArgumentParser(prog="d2ops schedule", description="scheduled or data-triggered retraining")
    kinds = parser.add_subparsers(dest="kind", required=True)
    cron = kinds.add_parser("cron", help="retrain on a cron schedule (UTC)")
    cron.add_argument("--expr", required=True, help="5-field cron expression in UTC, e.g. '0 3 * * 1'")
    data = kinds.add_parser("on-data", help="retrain when a new version of a ClearML dataset is published")
    data.add_argument("--dataset-project", required=True, help="ClearML dataset project to watch")
    data.add_argument("--dataset-name", help="only datasets of this name")
    data.add_argument("--tags", nargs="*", default=[], help="only versions carrying all these tags")
    data.add_argument("--on-finalize", action="store_true", help="fire on finalized versions, not only published")
    for sub in (cron, data):
        sub.add_argument("--pipeline-id", default="", help="controller task id of a pipeline run to clone")
        sub.add_argument("--config", help="the clone's whole experiment (default: the template's)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="change one key of the clone",
        )
        sub.add_argument("--queue", default="services", help="queue of the scheduler service")
        sub.add_argument("--pipeline-queue", help="queue the cloned pipeline controller goes to (default: --queue)")
        sub.add_argument("--target-project", help="project of the cloned runs (default: the template's)")
        sub.add_argument("--name", help="schedule name (default: derived from the pipeline id)")
        sub.add_argument("--dry-run", action="store_true", help="print what would be scheduled; start nothing")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        # Inputs are not checked: the runs start later (the data of an on-data trigger may not exist yet).
        launched = load_config(args.config, args.overrides, launch=True, inputs="none") if args.config else None
        docker_image = launched.clearml.docker_image if launched else None
        common: dict[str, Any] = {
            "queue": args.pipeline_queue or args.queue,
            "name": args.name,
            "task_parameters": scheduling.pipeline_task_parameters(args.config, args.overrides),
            "target_project": args.target_project,
            "docker_image": docker_image,
        }
        if args.kind == "cron":
            schedule = scheduling.cron_to_schedule(args.expr)
            scheduler = scheduling.build_cron_scheduler(args.pipeline_id, schedule, **common)
        else:
            scheduler = scheduling.build_dataset_trigger(
                args.pipeline_id,
                args.dataset_project,
                dataset_name=args.dataset_name,
                tags=args.tags,
                on_publish=not args.on_finalize,
                **common,
            )
        described = json.dumps(scheduling.describe_scheduler(scheduler), indent=2, default=str)
        if args.dry_run:
            scheduling.close_scheduler(scheduler)  # its offline session; ClearML prints where it went
            print(described)
            return 0
        print(described)
        scheduling.start_scheduler(scheduler, args.queue)
    except user_errors_types() as err:
        return fail(err)
    return 0


#: The pipeline's steps, in order (d2ops.steps.STEPS, which tests keep equal; named here so that
#: ``d2ops serve`` does not import the step code, and with it S3 transfers and training).
STEP_NAMES = ("download", "train", "evaluate", "infer", "register")


def _serves_remote_model(argv: Sequence[str]) -> bool:
    """Whether ``d2ops serve``'s --model needs ClearML (a model id, clearml://, or S3 with clearml.conf keys).

    A local bundle is served without importing ClearML, S3 transfers or training code.
    """
    from d2ops.model.source import parse_model_ref

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default="")
    known, _ = parser.parse_known_args(argv)
    return bool(known.model) and parse_model_ref(known.model).kind != "path"


def main(argv: Sequence[str] | None = None) -> int:
    """``d2ops <command>``: demo | pipeline | step <name> | serve | export nuclio | serving register | schedule."""
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = ",".join(STEP_NAMES)
    commands = (
        f"demo | pipeline | step {{{steps}}} | serve | export nuclio | serving register | schedule {{cron,on-data}}"
    )
    if not argv or argv[0] in {"-h", "--help"}:
        print(f"usage: d2ops {commands} [options]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "serve" or _serves_remote_model(rest):
        from d2ops.clearml import install

        install()  # ClearML model references (clearml://, model ids) and clearml.conf's S3 credentials
    if command == "demo":
        from d2ops.demo import demo_main

        return demo_main(rest)
    if command == "pipeline":
        return pipeline_main(rest)
    if command == "serve":
        from d2ops.serving.http import serve_main

        return serve_main(rest)
    if command == "step" and rest and rest[0] in STEP_NAMES:
        return step_main(rest[0], rest[1:])
    if command == "export":
        from d2ops.serving.nuclio import export_main

        return export_main(rest)
    if command == "schedule":
        return schedule_main(rest)
    if command == "serving":
        from d2ops.clearml.serving import serving_main

        return serving_main(rest)
    print(f"unknown command {' '.join(argv[:2])!r}; usage: d2ops {commands}", file=sys.stderr)
    return 2
