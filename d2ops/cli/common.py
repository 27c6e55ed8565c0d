"""What every command shares: the --config/--set arguments, and user errors said in one line, not a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from d2ops.config import ConfigError

log = logging.getLogger("d2ops")

__all__ = ["add_config_args", "config_overrides", "fail", "user_errors_types"]


def add_config_args(
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


def config_overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"data.source={args.dataset_uri}"] if args.dataset_uri else [])]


def user_errors_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported as one clear message, not a traceback."""
    # lazy: engine.trainer loads torch; `d2ops export` and `d2ops serving` never need it
    from d2ops.data.validation import DataValidationError
    from d2ops.engine.trainer import TrainingDiverged
    from d2ops.pipeline.runner import StepStopped, StepTimeLimitExceeded
    from d2ops.storage.s3 import StorageError

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
