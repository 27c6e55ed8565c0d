"""``d2ops <command>``: every command and argument parser of d2ops, one module per command group.

- :mod:`~d2ops.cli.demo`: ``d2ops demo`` (``make demo``);
- :mod:`~d2ops.cli.pipeline`: ``d2ops pipeline`` and pipelines/run_pipeline.py;
- :mod:`~d2ops.cli.steps`: ``d2ops step <name>`` and tasks/*.py;
- :mod:`~d2ops.cli.schedule`: ``d2ops schedule cron|on-data``;
- :mod:`~d2ops.cli.serve`: ``d2ops serve``;
- :mod:`~d2ops.cli.export`: ``d2ops export nuclio``;
- :mod:`~d2ops.cli.serving`: ``d2ops serving register``;
- :mod:`~d2ops.cli.common`: the --config/--set arguments and user errors.

Nothing in d2ops imports this package (ruff's banned-api rule, TID251). :func:`main` imports a command's
module only when it runs: ``d2ops serve`` of a local bundle must start without ClearML, S3 transfers or
training code, and ``d2ops --help`` without torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

log = logging.getLogger("d2ops")


#: The pipeline's steps, in order (d2ops.pipeline.steps.STEPS, which tests keep equal; named here so that
#: ``d2ops serve`` does not import the step code, and with it S3 transfers and training).
STEP_NAMES = ("download", "train", "evaluate", "infer", "register")


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
        # lazy: a local `d2ops serve` runs without ClearML
        from d2ops.clearml import install

        install()  # ClearML model references (clearml://, model ids) and clearml.conf's S3 credentials
    if command == "demo":
        # lazy: start-up time
        from d2ops.cli.demo import demo_main

        return demo_main(rest)
    if command == "pipeline":
        # lazy: start-up time (see the module docstring)
        from d2ops.cli.pipeline import pipeline_main

        return pipeline_main(rest)
    if command == "serve":
        # lazy: start-up time
        from d2ops.cli.serve import serve_main

        return serve_main(rest)
    if command == "step" and rest and rest[0] in STEP_NAMES:
        # lazy: start-up time
        from d2ops.cli.steps import step_main

        return step_main(rest[0], rest[1:])
    if command == "export":
        # lazy: start-up time
        from d2ops.cli.export import export_main

        return export_main(rest)
    if command == "schedule":
        # lazy: start-up time
        from d2ops.cli.schedule import schedule_main

        return schedule_main(rest)
    if command == "serving":
        # lazy: start-up time
        from d2ops.cli.serving import serving_main

        return serving_main(rest)
    print(f"unknown command {' '.join(argv[:2])!r}; usage: d2ops {commands}", file=sys.stderr)
    return 2
