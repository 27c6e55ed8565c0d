"""Multi-GPU and multi-machine training: the launch plan for detectron2's ``launch``.

One machine runs ``runtime.num_gpus`` processes (one per GPU; with ``runtime.device: cpu``, that
many CPU processes over gloo, which is how the tests run DDP without a GPU). Several machines
(``runtime.num_machines``) get their rank and the master's address from ClearML's
``Task.launch_multi_node``; the adapter hands its dict to :func:`launch_plan`, which is pure
and validated before any GPU time is spent.

Spawned workers cannot share the parent's ClearML task, so rank 0 writes its scalars to a
JSON-lines file (:class:`FileReporter`) and the parent relays them to the real reporter as
they appear (:class:`EventRelay`).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2ops.reporting import Reporter

__all__ = ["EventRelay", "FileReporter", "LaunchPlan", "check_gpus", "launch_plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlan:
    """The arguments of ``detectron2.engine.launch`` for this machine."""

    num_gpus_per_machine: int
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str | None = None

    @property
    def world_size(self) -> int:
        return self.num_gpus_per_machine * self.num_machines

    @property
    def is_master(self) -> bool:
        """The machine whose first process reports and writes the outputs."""
        return self.machine_rank == 0


def check_gpus(num_gpus: int, *, device: str, visible_gpus: int) -> None:
    """Fail early when this machine cannot run ``num_gpus`` training processes on ``device``."""
    if num_gpus < 1:
        raise ValueError(f"runtime.num_gpus ({num_gpus}) must be >= 1")
    if device != "cpu" and num_gpus > 1 and num_gpus > visible_gpus:
        raise ValueError(
            f"runtime.num_gpus is {num_gpus} but this machine sees {visible_gpus} CUDA device(s); "
            f"lower runtime.num_gpus to {max(visible_gpus, 1)}, run on an agent with {num_gpus} GPUs "
            "(check the queue and the docker --gpus argument), or set runtime.device=cpu for CPU processes"
        )


def launch_plan(
    num_gpus: int,
    num_machines: int,
    *,
    device: str,
    visible_gpus: int,
    multi_node: dict[str, Any] | None = None,
) -> LaunchPlan:
    """How to launch training here, from the runtime config and ``Task.launch_multi_node``'s dict.

    ``device`` is ``runtime.device`` (``auto``, ``cuda`` or ``cpu``); ``visible_gpus`` the CUDA
    devices this machine sees. Raises ``ValueError`` with the fix for a plan that cannot run.
    """
    if num_machines < 1:
        raise ValueError(f"runtime.num_machines ({num_machines}) must be >= 1")
    check_gpus(num_gpus, device=device, visible_gpus=visible_gpus)
    if num_machines == 1:
        return LaunchPlan(num_gpus, 1, 0, "auto" if num_gpus > 1 else None)
    if not multi_node:
        raise ValueError(
            f"runtime.num_machines is {num_machines}: the train step must run on clearml-agents "
            "(--remote, or in a remote pipeline) so that ClearML can start the other machines; "
            "set runtime.num_machines=1 to train here"
        )
    return _multi_machine_plan(num_gpus, num_machines, multi_node)


def _multi_machine_plan(num_gpus: int, num_machines: int, multi_node: dict[str, Any]) -> LaunchPlan:
    total = int(multi_node.get("total_num_nodes") or num_machines)
    if total != num_machines:
        raise ValueError(
            f"ClearML started {total} nodes (multi_node_instance/total_num_nodes) but runtime.num_machines "
            f"is {num_machines}; make them equal"
        )
    rank = int(multi_node.get("node_rank") or 0)
    if not 0 <= rank < num_machines:
        raise ValueError(f"node rank {rank} from ClearML is outside 0..{num_machines - 1}")
    addr, port = multi_node.get("master_addr"), multi_node.get("master_port")
    if not addr or not port:
        raise ValueError(
            f"ClearML gave no master address/port ({addr!r}:{port!r}); set CLEARML_MULTI_NODE_MASTER_DEF_ADDR "
            "on the agents (see Task.launch_multi_node)"
        )
    return LaunchPlan(num_gpus, num_machines, rank, f"tcp://{addr}:{int(port)}")


class FileReporter(Reporter):
    """Appends scalars as JSON lines to a file: picklable, so a spawned worker can report."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        line = json.dumps({"title": title, "series": series, "value": float(value), "iteration": int(iteration)})
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


class EventRelay:
    """Forwards the scalars a :class:`FileReporter` writes to ``reporter``, while training runs.

    A context manager: a thread polls the file every ``interval`` seconds; leaving the block
    stops it and forwards whatever is left, so every scalar arrives exactly once.
    """

    def __init__(self, path: Path, reporter: Reporter, interval: float = 2.0) -> None:
        self.path = Path(path)
        self.reporter = reporter
        self.interval = interval
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2ops-event-relay", daemon=True)

    def __enter__(self) -> EventRelay:
        self.path.unlink(missing_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.drain()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.drain()

    def drain(self) -> None:
        """Forward every complete line not forwarded yet."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            event = json.loads(line)
            self.reporter.scalar(event["title"], event["series"], event["value"], event["iteration"])
