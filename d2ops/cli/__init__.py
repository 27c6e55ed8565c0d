"""``d2ops <command>``: every command and argument parser of d2ops, one module per command group.

- :mod:`~d2ops.cli.demo`: ``d2ops demo`` (``make demo``);
- :mod:`~d2ops.cli.pipeline`: ``d2ops pipeline`` and pipelines/run_pipeline.py;
- :mod:`~d2ops.cli.steps`: ``d2ops step <name>`` and tasks/*.py;
- :mod:`~d2ops.cli.schedule`: ``d2ops schedule cron|on-data``;
- :mod:`~d2ops.cli.serve`: ``d2ops serve``;
- :mod:`~d2ops.cli.export`: ``d2ops export torchscript|onnx|openvino|triton|nuclio``;
- :mod:`~d2ops.cli.serving`: ``d2ops serving register``;
- :mod:`~d2ops.cli.common`: the --config/--set arguments and user errors.

Nothing in d2ops imports this package (ruff's banned-api rule, TID251). :func:`main` imports a command's
module only when it runs: ``d2ops serve`` of a local bundle must start without ClearML, S3 transfers or
training code, and ``d2ops --help`` without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["COMMANDS", "STEP_NAMES", "main"]

log = logging.getLogger("d2ops")

# Deprecation notices of the pinned stack, raised while it is imported, that a user can do nothing about:
# detectron2.model_zoo imports pkg_resources (setuptools < 81 is pinned for it), and detectron2 scripts
# functions with torch.jit.script, which torch 2.14 marks deprecated. Every command imports them.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

#: The pipeline's steps, in order (d2ops.pipeline.steps.STEPS, which tests keep equal; named here so that
#: ``d2ops serve`` does not import the step code, and with it S3 transfers and training).
STEP_NAMES = ("download", "train", "evaluate", "infer", "register")


@dataclass(frozen=True)
class Command:
    """One ``d2ops`` command: its name, what it does, and ``module:function`` that runs it on the remaining args."""

    name: str
    summary: str
    entry: str

    def run(self, argv: Sequence[str]) -> int:
        module, function = self.entry.split(":")
        main: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), function)
        return main(argv)


#: Every command, in the order ``d2ops --help`` lists them. A command's module is imported only when it runs:
#: ``d2ops serve`` of a local bundle must start without ClearML, S3 transfers or training code.
COMMANDS = (
    Command("demo", "the whole pipeline offline on a synthetic dataset (make demo)", "d2ops.cli.demo:demo_main"),
    Command(
        "pipeline",
        "the training pipeline: --offline, --local (ClearML server, local steps), or steps on ClearML queues",
        "d2ops.cli.pipeline:pipeline_main",
    ),
    Command("step", f"one pipeline step as a ClearML task: {', '.join(STEP_NAMES)}", "d2ops.cli.steps:steps_main"),
    Command(
        "serve", "serve a model over HTTP (CVAT, TorchServe-style clients, /metrics)", "d2ops.cli.serve:serve_main"
    ),
    Command(
        "export",
        "export a model: torchscript, onnx, openvino (checked against PyTorch), triton, nuclio (CVAT)",
        "d2ops.cli.export:export_main",
    ),
    Command("serving", "clearml-serving: register an endpoint for a model", "d2ops.cli.serving:serving_main"),
    Command("schedule", "retrain on a cron schedule or when a dataset changes", "d2ops.cli.schedule:schedule_main"),
)


def _serves_remote_model(argv: Sequence[str]) -> bool:
    """Whether ``d2ops serve``'s --model needs ClearML (a model id, clearml://, or S3 with clearml.conf keys).

    A local bundle is served without importing ClearML, S3 transfers or training code.
    """
    # lazy: start-up time
    from d2ops.model.source import parse_model_ref

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default="")
    known, _ = parser.parse_known_args(argv)
    return bool(known.model) and parse_model_ref(known.model).kind != "path"


def build_parser() -> argparse.ArgumentParser:
    """``d2ops``'s own parser: the command; each command parses its own options."""
    # lazy: the package's version only for --version
    from d2ops import __version__

    parser = argparse.ArgumentParser(
        prog="d2ops",
        description="train, evaluate, export and serve detectron2 detectors, offline or on a ClearML cluster",
        epilog="d2ops <command> --help shows a command's options",
    )
    parser.add_argument("--version", action="version", version=f"d2ops {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for command in COMMANDS:
        commands.add_parser(command.name, help=command.summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``d2ops <command> [options]``: one of :data:`COMMANDS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {command.name: command for command in COMMANDS}
    if not argv or argv[0] not in by_name:
        try:
            build_parser().parse_args(argv[:1])
        except SystemExit as exited:  # --help and --version: 0; a missing or unknown command: 2, with the usage
            return int(exited.code or 0)
        return 2
    command, rest = by_name[argv[0]], argv[1:]
    if command.name != "serve" or _serves_remote_model(rest):
        # lazy: a local `d2ops serve` runs without ClearML
        from d2ops.clearml import install

        install()  # ClearML model references (clearml://, model ids) and clearml.conf's S3 credentials
    return command.run(rest)
