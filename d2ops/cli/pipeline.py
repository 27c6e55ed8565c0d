"""``d2ops pipeline`` and pipelines/run_pipeline.py: the whole pipeline, offline, local or on queues."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from d2ops.clearml.cluster import preflight
from d2ops.clearml.controller import build_controller, controller_experiment, recorded_launch_config, start_controller
from d2ops.clearml.session import on_agent
from d2ops.clearml.step import run_offline
from d2ops.cli.common import add_config_args, config_overrides, fail, user_errors_types
from d2ops.pipeline.preflight import launch_config
from d2ops.pipeline.report import format_summary, write_outputs
from d2ops.utils.logs import setup_logging

log = logging.getLogger("d2ops")

__all__ = ["pipeline_main"]


def pipeline_main(argv: Sequence[str] | None = None, *, prog: str = "d2ops pipeline") -> int:
    """Run the whole pipeline: --offline (no server), --local (server, local steps) or on queues."""

    # On the services agent the controller script starts with no arguments: the experiment is read
    # back from the controller task (controller_experiment), never from the default --config.
    agent = on_agent()
    parser = argparse.ArgumentParser(prog=prog, description="d2ops training pipeline")
    add_config_args(parser, "configs/demo.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="no ClearML server, no agents (embedded default)")
    mode.add_argument("--local", action="store_true", help="a ClearML server; steps run as local processes")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = config_overrides(args)
    user_errors = user_errors_types()
    try:
        # Every config mistake (schema, detectron2 keys, inputs) in one message, before any task or transfer.
        # Local paths are checked when the steps run here (--offline, --local), not for agents' disks.
        paths = args.offline or args.local
        launched = None if agent else launch_config(args.config, overrides, inputs="all" if paths else "s3")
        if args.offline:
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
        # On the agent the launch config's name is the one the laptop recorded, not the default --config.
        pipe = build_controller(cfg, recorded_launch_config() if agent else args.config)
        # Before start: in remote mode this process hands the controller to the services queue.
        print(json.dumps({"pipeline_task_id": pipe.id, "project": cfg.clearml.project}), flush=True)
        start_controller(pipe, "local" if args.local else "remote", cfg.clearml.queues.controller)
    except user_errors as err:
        return fail(err)
    except RuntimeError as err:  # the controller failed; its task is marked failed with the reason
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
