"""``d2ops step <name>`` and tasks/*.py: one pipeline step as a ClearML task (offline, here, or on a queue)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from d2ops.clearml.session import on_agent
from d2ops.clearml.step import run_step
from d2ops.cli.common import add_config_args, config_overrides, fail, user_errors_types
from d2ops.pipeline.preflight import launch_config
from d2ops.pipeline.runner import step_parameters
from d2ops.pipeline.steps import STEP_INPUTS
from d2ops.utils.logs import setup_logging

log = logging.getLogger("d2ops")

__all__ = ["step_main", "steps_main"]


def steps_main(argv: Sequence[str]) -> int:
    """``d2ops step <name> [options]``: :func:`step_main` for the step named first."""
    argv = list(argv)
    if not argv or argv[0] not in STEP_INPUTS:
        parser = argparse.ArgumentParser(prog="d2ops step", description="run one pipeline step as a ClearML task")
        parser.add_argument(
            "step", choices=list(STEP_INPUTS), help="the step; d2ops step <step> --help for its options"
        )
        parser.parse_args(argv[:1])  # --help exits 0; a missing or unknown step exits 2 naming the steps
        return 2
    return step_main(argv[0], argv[1:], prog=f"d2ops step {argv[0]}")


def step_main(step: str, argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run one pipeline step as a ClearML task (offline, here with a server, or on a queue).

    ``prog``: the program name help shows (``d2ops step <step>``; tasks/<step>.py by default).
    """

    # On a clearml-agent the script runs without arguments; its parameters come from the task.
    agent = on_agent()
    parser = argparse.ArgumentParser(prog=prog or f"tasks/{step}.py", description=f"d2ops {step} step")
    add_config_args(parser, required=not agent)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="no ClearML server: keep an offline session")
    mode.add_argument("--remote", action="store_true", help="enqueue on a ClearML queue (execute_remotely)")
    parser.add_argument("--queue", help="queue for --remote (default: clearml.queues.<step> of the config)")
    for name in STEP_INPUTS[step]:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default="", help=f"input: {name} (URI or path)")
    args = parser.parse_args(argv)
    setup_logging()
    inputs = {name: getattr(args, name) for name in STEP_INPUTS[step]}
    user_errors = user_errors_types()
    try:
        if not agent:
            # Every config mistake in one message, before any ClearML task is created or data moves.
            # Inputs: S3 from here; local paths only when the step runs here (on an agent they are its disk's).
            # The device too when it runs here, but not for download, which never uses it.
            local = not args.remote
            launch_config(args.config, config_overrides(args), inputs="all" if local else "s3",
                        device=local and step != "download")  # fmt: skip
        result = run_step(
            step,
            step_parameters(step, args.config or "", config_overrides(args), inputs),
            mode="offline" if args.offline else "remote" if args.remote else "local",
            queue=args.queue,
        )
    except user_errors as err:
        return fail(err)
    print(json.dumps({"step": step, "task_id": result.task_id, "artifacts": result.artifacts}, indent=2))
    return 0
