"""``d2ops schedule cron|on-data``: retraining by cloning a template pipeline run."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

from d2ops.clearml import schedules as scheduling
from d2ops.cli.common import fail, user_errors_types
from d2ops.pipeline.preflight import launch_config
from d2ops.utils.logs import setup_logging

log = logging.getLogger("d2ops")

__all__ = ["schedule_main"]


def schedule_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops schedule cron|on-data``: retrain by cloning a template pipeline run (see d2ops.clearml.schedules)."""

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
    setup_logging()
    try:
        # Inputs are not checked: the runs start later (the data of an on-data trigger may not exist yet).
        # --set without --config is checked against the schema in pipeline_task_parameters, before any scheduler
        # task exists: a refused schedule stores and prints nothing.
        launched = launch_config(args.config, args.overrides, inputs="none") if args.config else None
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
