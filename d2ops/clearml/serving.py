"""``d2ops serving register``: add a clearml-serving endpoint that serves a d2ops model with the custom engine.

:func:`build_register_command` builds the ``clearml-serving`` command line (an argument list, never a
shell string): ``model add`` for one model (by id, or the newest matching project/name/tags),
``model auto-update`` to follow new versions of a model name. The engine it registers is
:mod:`d2ops.serving.clearml_engine`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from d2ops.serving.clearml_engine import PREPROCESS_FILE

__all__ = ["EndpointRegistration", "RegistrationError", "build_register_command", "serving_main"]

_ENDPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)*$")
_MODEL_ID = re.compile(r"^[0-9a-f]{32}$")


class RegistrationError(ValueError):
    """The endpoint cannot be registered as asked; the message names the flags to fix."""


class EndpointRegistration(NamedTuple):
    """What to serve where: exactly one of ``model_id`` or (``project`` and ``name``).

    A NamedTuple, not a dataclass: clearml-serving executes this file without registering it in
    ``sys.modules``, where ``@dataclass`` fails on string annotations.
    """

    endpoint: str
    model_id: str | None = None
    project: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()
    published: bool | None = None
    version: str | None = None
    auto_update: bool = False
    max_versions: int = 1
    serving_service: str | None = None

    def validate(self) -> None:
        """Raise :class:`RegistrationError` for any combination clearml-serving would reject or misread."""
        if not _ENDPOINT.match(self.endpoint):
            raise RegistrationError(
                f"--endpoint {self.endpoint!r}: use letters, digits, '_', '-', '.' and '/' (e.g. 'detector/shapes')"
            )
        by_query = self.project is not None or self.name is not None
        if (self.model_id is None) == (not by_query):
            raise RegistrationError("give exactly one of --model-id ID or --project P --name N")
        if by_query and not (self.project and self.name):
            raise RegistrationError("--project and --name go together: give both")
        if self.model_id is not None:
            if not _MODEL_ID.match(self.model_id):
                raise RegistrationError(f"--model-id {self.model_id!r} is not a ClearML model id (32 hex characters)")
            if self.tags or self.published is not None:
                raise RegistrationError(
                    "--tags and --published/--no-published select by name: drop them with --model-id"
                )
            if self.auto_update:
                raise RegistrationError("--auto-update follows new versions of a name: use --project P --name N")
        if self.auto_update and self.version is not None:
            raise RegistrationError("--version is for a single model; --auto-update numbers versions itself")
        if self.max_versions < 1:
            raise RegistrationError(f"--max-versions must be at least 1, got {self.max_versions}")
        if not self.auto_update and self.max_versions != 1:
            raise RegistrationError("--max-versions only applies with --auto-update")


def clearml_serving_program() -> list[str]:
    """How to run the clearml-serving CLI here: its script, else ``python -m clearml_serving``."""
    script = shutil.which("clearml-serving")
    if script:
        return [script]
    import importlib.util

    if importlib.util.find_spec("clearml_serving") is not None:
        return [sys.executable, "-m", "clearml_serving"]
    return ["clearml-serving"]


def build_register_command(
    reg: EndpointRegistration, *, preprocess: Path = PREPROCESS_FILE, program: Sequence[str] = ("clearml-serving",)
) -> list[str]:
    """The clearml-serving command (an argument list) that registers ``reg`` with the custom engine."""
    reg.validate()
    cmd = [*program]
    if reg.serving_service:
        cmd += ["--id", reg.serving_service]
    cmd += ["model", "auto-update" if reg.auto_update else "add"]
    cmd += ["--engine", "custom", "--endpoint", reg.endpoint, "--preprocess", str(preprocess)]
    if reg.version is not None:
        cmd += ["--version", reg.version]
    if reg.model_id is not None:
        return [*cmd, "--model-id", reg.model_id]
    assert reg.project is not None and reg.name is not None  # validate() guarantees it
    cmd += ["--project", reg.project, "--name", reg.name]
    if reg.tags:
        cmd += ["--tags", *reg.tags]
    if reg.published is not False:  # default: serve only published (quality-gated) models
        cmd.append("--published")
    if reg.auto_update:
        cmd += ["--max-versions", str(reg.max_versions)]
    return cmd


def _register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2ops serving register",
        description="add a clearml-serving endpoint that serves a d2ops model with the custom engine",
    )
    parser.add_argument("--endpoint", required=True, help="endpoint name, served at /serve/<endpoint>")
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
    parser.add_argument("--version", help="endpoint version (model add only)")
    parser.add_argument("--auto-update", action="store_true", help="follow new versions of --project/--name")
    parser.add_argument("--max-versions", type=int, default=1, help="versions kept with --auto-update (default 1)")
    parser.add_argument("--serving-service", help="clearml-serving service (control plane task) id")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    return parser


def register_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops serving register ...``: print the clearml-serving command, then run it (unless --dry-run)."""
    from d2ops.cli import fail

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
    )
    program = clearml_serving_program()
    try:
        cmd = build_register_command(reg, program=program)
    except RegistrationError as err:
        return fail(err)
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    if program == ["clearml-serving"]:
        return fail(RegistrationError("clearml-serving is not installed here: pip install clearml-serving"))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        return fail(RegistrationError(f"clearml-serving exited with status {result.returncode}"))
    return 0


def serving_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops serving <command>``: only ``register`` for now."""
    argv = list(argv or [])
    if argv[:1] == ["register"]:
        return register_main(argv[1:])
    usage = "usage: d2ops serving register --endpoint NAME (--model-id ID | --project P --name N) [options]"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    print(usage, file=sys.stderr)
    return 2
