"""``d2ops serving register``: a clearml-serving endpoint for a d2ops model (the custom engine)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from collections.abc import Sequence

from d2ops.clearml.serving import (
    ENGINES,
    EndpointRegistration,
    RegistrationError,
    build_register_commands,
    clearml_serving_program,
)
from d2ops.cli.common import fail

__all__ = ["register_main", "serving_main"]


def _register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2ops serving register",
        description="add a clearml-serving endpoint that serves a d2ops model with the custom engine",
    )
    parser.add_argument(
        "--endpoint",
        required=True,
        help="endpoint name, one path segment (no '/'): served at /serve/<endpoint> (with --version at "
        "/serve/<endpoint>/<version>; with --auto-update each model version at /serve/<endpoint>/<N> and "
        "the newest at /serve/<endpoint>)",
    )
    parser.add_argument("--model-id", help="serve this ClearML model")
    parser.add_argument("--project", help="select the model by project and name (newest match)")
    parser.add_argument("--name", help="model name (exact)")
    parser.add_argument("--tags", nargs="+", default=[], help="select models by these tags (ClearML's tag filter)")
    parser.add_argument(
        "--published",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only published models, i.e. those that passed the quality gate (default: on with --project/--name)",
    )
    parser.add_argument("--version", help="endpoint version, served at /serve/<endpoint>/<version> (model add only)")
    parser.add_argument(
        "--auto-update",
        action="store_true",
        help="follow new versions of --project/--name: version N at /serve/<endpoint>/<N>, plus a canary "
        "route from /serve/<endpoint> to the newest",
    )
    parser.add_argument("--max-versions", type=int, default=1, help="versions kept with --auto-update (default 1)")
    parser.add_argument("--serving-service", help="clearml-serving service (control plane task) id")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="custom_async",
        help="clearml-serving engine: custom_async (default) decodes and runs the model off the event loop, so "
        "one slow image does not hold the worker's other requests; custom runs them on it",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser


def register_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops serving register ...``: print each clearml-serving command, then run it (unless --dry-run)."""

    args = _register_parser().parse_args(argv)
    reg = EndpointRegistration(
        endpoint=args.endpoint,
        model_id=args.model_id,
        project=args.project,
        name=args.name,
        tags=tuple(args.tags),
        published=args.published,
        version=args.version,
        auto_update=args.auto_update,
        max_versions=args.max_versions,
        serving_service=args.serving_service,
        engine=args.engine,
    )
    program = clearml_serving_program()
    try:
        commands = build_register_commands(reg, program=program)
    except RegistrationError as err:
        return fail(err)
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    if program == ["clearml-serving"]:
        return fail(
            RegistrationError("clearml-serving is not installed here: pip install 'clearml-serving>=1.3.5,<1.4'")
        )
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        result = subprocess.run(cmd, check=False)
        if result.returncode != 0:
            return fail(RegistrationError(f"clearml-serving exited with status {result.returncode}: {shlex.join(cmd)}"))
    return 0


def serving_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops serving <command>``: only ``register`` for now."""
    argv = list(argv or [])
    if argv[:1] == ["register"]:
        return register_main(argv[1:])
    parser = argparse.ArgumentParser(prog="d2ops serving", description="clearml-serving endpoints for d2ops models")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("register", help="add a clearml-serving endpoint that serves a model with the custom engine")
    parser.parse_args(argv[:1])  # --help exits 0; a missing or unknown command exits 2
    return 2
