"""The pipeline: download+validate -> train -> evaluate -> infer -> register, free of ClearML.

Three modes run the same step functions (:data:`d2ops.pipeline.steps.STEP_FUNCTIONS`) through the same
step runner (:func:`d2ops.clearml.step.run_step`):
- ``offline``: no server; each step is a ClearML offline session, run one after another here
  (:func:`run_in_order`);
- ``local``: a ClearML PipelineController with a server, steps run as local processes;
- ``remote``: the controller goes to the services queue and each step to its own queue,
  in the detectron2 docker image (:mod:`d2ops.clearml.controller`).

This module holds what every mode shares: the step parameters, the step's own time limit,
the errors that end a step, and the in-order runner.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2ops.pipeline.steps import STEP_INPUTS, STEPS, StepContext, StepOutput

__all__ = [
    "PipelineRun",
    "StepResult",
    "StepRunner",
    "StepStopped",
    "StepTimeLimitExceeded",
    "join_overrides",
    "parse_overrides",
    "raise_on_signal",
    "run_in_order",
    "step_parameters",
    "step_time_limit",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_overrides(text: str | list[str] | None) -> list[str]:
    """Overrides travel as one string (editable in the ClearML UI): ``key=value`` items, shell-quoted."""
    if not text:
        return []
    if isinstance(text, list):
        return list(text)
    return shlex.split(text)


def join_overrides(items: list[str]) -> str:
    return " ".join(shlex.quote(item) for item in items)


def step_parameters(
    step: str, config: str, overrides: list[str], inputs: dict[str, str] | None = None
) -> dict[str, Any]:
    """The flat parameters a step connects under ``General/`` (no credentials, ever)."""
    params: dict[str, Any] = {"config": config, "overrides": join_overrides(overrides)}
    for name in STEP_INPUTS[step]:
        params[name] = (inputs or {}).get(name, "")
    if step == "download":
        # Filled by the controller at launch (download_cache_key): the step's cache key.
        params["dataset_identity"] = (inputs or {}).get("dataset_identity", "")
    return params


@dataclass
class StepResult:
    step: str
    task_id: str
    artifacts: dict[str, str]
    values: dict[str, Any]
    #: the step's offline ClearML session: its zip (the folder only when ClearML wrote no complete zip)
    session: str | None = None


class StepTimeLimitExceeded(TimeoutError):
    """A step ran past ``clearml.steps.<step>.time_limit_min``; it fails, is not retried, and so does the pipeline."""


class StepStopped(Exception):
    """A step was told to stop (SIGTERM: an agent's abort or a pre-empted worker) and stopped cleanly.

    Not a ``KeyboardInterrupt``: ``except Exception`` blocks of libraries still unwind through it,
    and training saves a checkpoint on the way out (:class:`d2ops.engine.checkpoints.CheckpointOnStop`).
    """

    #: Read by :class:`d2ops.engine.checkpoints.CheckpointOnStop`: a stop, not an error, so its state is worth resuming.
    checkpoint_on_stop = True


@contextmanager
def raise_on_signal(signum: int, error: Callable[[], BaseException]) -> Iterator[bool]:
    """Raise ``error()`` in this (main) thread when ``signum`` arrives, for the length of the block.

    Yields whether the handler is installed: signals reach only the main thread, so elsewhere the
    block runs unguarded. The previous handler comes back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def handler(received: int, frame: Any) -> None:
        raise error()

    previous = signal.signal(signum, handler)
    try:
        yield True
    finally:
        signal.signal(signum, previous)


@contextmanager
def step_time_limit(step: str, minutes: float | None) -> Iterator[None]:
    """Raise :class:`StepTimeLimitExceeded` in this (main) thread once ``minutes`` have passed.

    The step process enforces its own limit so the task fails with that reason, here, offline
    and on an agent alike; a watchdog (:mod:`d2ops.clearml.step`) ends a process too stuck to raise.
    """
    if not minutes or not hasattr(signal, "setitimer"):
        yield
        return

    def expired() -> StepTimeLimitExceeded:
        return StepTimeLimitExceeded(
            f"step {step} ran past its time limit of {minutes:g} min: raise clearml.steps.{step}.time_limit_min "
            "or make the step cheaper (e.g. fewer solver.max_iter)"
        )

    with raise_on_signal(signal.SIGALRM, expired) as installed:
        if installed:
            signal.setitimer(signal.ITIMER_REAL, minutes * 60.0)
        try:
            yield
        finally:
            if installed:
                signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass
class PipelineRun:
    """What an offline pipeline run produced, step by step."""

    steps: dict[str, StepResult] = field(default_factory=dict)

    @property
    def sessions(self) -> dict[str, str | None]:
        return {name: result.session for name, result in self.steps.items()}

    def to_dict(self) -> dict[str, Any]:
        return {name: asdict(result) for name, result in self.steps.items()}


#: Runs one step: ``(step, params, function) -> StepResult`` (the offline runner passes ClearML's).
StepRunner = Callable[[str, dict[str, Any], Callable[[StepContext], StepOutput] | None], StepResult]


def run_in_order(
    config: str,
    overrides: list[str],
    runner: StepRunner,
    *,
    functions: Mapping[str, Callable[[StepContext], StepOutput]] | None = None,
) -> PipelineRun:
    """Run every step in order, here: the offline pipeline (``runner`` opens each step's session).

    Step outputs are handed on as the PipelineController hands them on, through the next step's input
    parameters: a ClearML artifact URL with a server; offline, the path of the one copy of the file the
    previous step wrote (its session holds the artifact inside its zip, for import, not for reading).
    ``functions`` replaces step bodies by name (the hand-off benchmark runs near-empty steps).
    """
    result = PipelineRun()
    for step in STEPS:
        inputs = {name: result.steps[src].artifacts[art] for name, (src, art) in STEP_INPUTS[step].items()}
        log.info("=== step %s ===", step)
        params = step_parameters(step, config, overrides, inputs)
        result.steps[step] = runner(step, params, (functions or {}).get(step))
    return result
