"""The one place that talks to ClearML: step sessions, the reporter, artifacts and the model registry.

Every step runs inside :func:`open_step`, in one of three modes:
- ``offline``: no server; the session is written to ``<CLEARML_CACHE_DIR>/offline/<task id>/`` (and a zip)
  that ``Task.import_offline_session`` can later replay into a server;
- ``local``: a server, the step runs in this process;
- ``remote``: the step is enqueued with ``execute_remotely`` and continues on a clearml-agent.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from d2ops.registry import (
    Champion,
    ChampionConflictError,
    ChampionStore,
    GateDecision,
    LocalChampionStore,
    Promotion,
    retired_tags,
)
from d2ops.reporting import Reporter

if TYPE_CHECKING:
    from d2ops.config import ExperimentConfig

__all__ = [
    "TASK_TYPES",
    "ClearMLChampionStore",
    "ClearMLReporter",
    "Mode",
    "StepRun",
    "enable_offline",
    "launch_multi_node",
    "on_agent",
    "open_champion_store",
    "open_step",
    "pipeline_run_id",
    "register_model",
    "scrub_recorded_diff",
    "step_lineage",
    "task_output_uri",
]

log = logging.getLogger(__name__)

Mode = Literal["offline", "local", "remote"]

#: The ClearML task type of each step (how the UI files and filters them).
TASK_TYPES = {
    "download": "data_processing",
    "train": "training",
    "evaluate": "testing",
    "infer": "inference",
    "register": "custom",
}


def on_agent() -> bool:
    """True when this process was started by a clearml-agent (or a pipeline) for an existing task."""
    from clearml.config import running_remotely

    return running_remotely()


def enable_offline(cache_dir: Path | None = None) -> None:
    """Switch ClearML to offline mode (optionally moving its cache, where sessions are stored).

    Also turns off ClearML's reporter subprocess (the ``sdk.development.report_use_subprocess``
    setting): in offline mode its shutdown handshake makes every ``Task.close`` wait 10 s, and
    a second session in the same process wait minutes. Reports are then written by a thread.
    """
    if cache_dir is not None:
        os.environ["CLEARML_CACHE_DIR"] = str(Path(cache_dir).resolve())
    from clearml import Task

    Task.set_offline(True)
    Task._report_subprocess_enabled = False  # type: ignore[assignment]


class ClearMLReporter(Reporter):
    """A :class:`Reporter` writing to a ClearML task's logger, artifacts and configuration."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.logger = task.get_logger()

    def scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self.logger.report_scalar(title, series, value=float(value), iteration=int(iteration))

    def single_value(self, name: str, value: float) -> None:
        self.logger.report_single_value(name, float(value))

    def curve(
        self,
        title: str,
        series: str,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        xlabel: str = "",
        ylabel: str = "",
    ) -> None:
        points = np.column_stack([np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)])
        self.logger.report_scatter2d(
            title, series, scatter=points, iteration=0, xaxis=xlabel, yaxis=ylabel, mode="lines"
        )

    def confusion_matrix(self, title: str, matrix: np.ndarray, labels: Sequence[str]) -> None:
        self.logger.report_confusion_matrix(
            title,
            "counts",
            matrix=np.asarray(matrix),
            iteration=0,
            xaxis="predicted",
            yaxis="ground truth",
            xlabels=list(labels),
            ylabels=list(labels),
        )

    def image(self, title: str, series: str, image: np.ndarray, iteration: int = 0) -> None:
        self.logger.report_image(title, series, iteration=iteration, image=image)

    def artifact(self, name: str, obj: Path | dict[str, Any]) -> None:
        payload = str(obj) if isinstance(obj, Path) else obj
        self.task.upload_artifact(name, artifact_object=payload, wait_on_upload=True)

    def configuration(self, name: str, text: str, description: str = "") -> None:
        self.task.set_configuration_object(name=name, config_text=text, config_type="yaml", description=description)


@dataclass
class StepRun:
    """A running step: its ClearML task, reporter and (possibly UI-overridden) parameters."""

    name: str
    task: Any
    reporter: ClearMLReporter
    params: dict[str, Any]
    mode: Mode
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def session_folder(self) -> str | None:
        """The offline session folder (``None`` when connected to a server)."""
        if self.mode != "offline":
            return None
        return str(self.task.get_offline_mode_folder())

    def publish(self, files: dict[str, Path]) -> dict[str, str]:
        """Upload output files as artifacts; returns name -> URL (a local path in offline mode)."""
        for name, path in files.items():
            self.reporter.artifact(name, Path(path))
            self.artifacts[name] = str(self.task.artifacts[name].url)
        return self.artifacts


@contextmanager
def open_step(
    step: str,
    params: dict[str, Any],
    *,
    mode: Mode,
    project: str | None = None,
    queue: str | None = None,
    docker_image: str | None = None,
    docker_args: str = "",
    output_uri: str | None = None,
    tags: Sequence[str] = (),
) -> Iterator[StepRun]:
    """Open a ClearML task for a step: init, connect parameters, optionally go remote, close.

    In ``remote`` mode this process enqueues the task and exits; the same script then runs on
    the agent, where ``Task.init`` attaches to the enqueued task and ``connect`` returns the
    parameters as edited in the UI or overridden by the pipeline.
    """
    from clearml import Task

    if mode == "offline":
        enable_offline()
    task: Any = Task.init(
        project_name=project,
        task_name=step,
        task_type=TASK_TYPES.get(step, "custom"),
        tags=list(tags),
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        auto_resource_monitoring=mode != "offline",
        output_uri=output_uri,
    )
    if Task.running_locally():
        scrub_recorded_diff(task)
    connected = task.connect(dict(params), name="General")
    if mode == "remote" and Task.running_locally():
        if not queue:
            raise ValueError(f"--remote needs a queue for step {step!r} (--queue or clearml.queues.{step})")
        if docker_image:
            task.set_base_docker(docker_image=docker_image, docker_arguments=docker_args or None)
        task.execute_remotely(queue_name=queue, exit_process=True)
    run = StepRun(step, task, ClearMLReporter(task), dict(connected), mode)
    try:
        yield run
    except BaseException as err:
        log.error("step %s failed: %s", step, err)
        _mark_failed(task, err)
        raise
    finally:
        task.close()


def scrub_recorded_diff(task: Any, timeout_s: float = 30.0) -> int:
    """Remove credential values from the uncommitted ``git diff`` ClearML records with a task.

    ClearML detects the repository in a background thread; this waits for it (bounded), then
    rewrites the diff if any line holds a credential the process can see. Returns the number of
    lines removed. An agent cannot apply such a diff: commit or stash the file instead.
    """
    from d2ops.secrets import known_secret_values, redact

    try:
        task._wait_for_repo_detection(timeout=timeout_s)
        diff = str(getattr(task.data.script, "diff", "") or "")
    except Exception:  # no repository detected: nothing recorded, nothing to scrub
        log.debug("no script diff to check", exc_info=True)
        return 0
    clean, removed = redact(diff, known_secret_values())
    if removed:
        task.set_script(diff=clean)
        log.warning(
            "removed %d line(s) holding credentials from the uncommitted git diff recorded with task %s; "
            "commit or stash the file that holds them, and keep credentials in the environment or clearml.conf",
            removed,
            task.id,
        )
    return removed


def _mark_failed(task: Any, err: BaseException) -> None:
    try:
        task.mark_failed(status_reason=f"{type(err).__name__}: {err}"[:250], force=True)
    except Exception:  # offline sessions cannot always change status; the error is re-raised anyway
        log.debug("could not mark task failed", exc_info=True)


def register_model(
    run: StepRun,
    bundle_zip: Path,
    *,
    name: str,
    tags: Sequence[str],
    labels: Sequence[str],
    metadata: dict[str, Any],
    publish: bool,
    config: dict[str, Any] | None = None,
    headline: str | None = None,
) -> dict[str, Any]:
    """Register a bundle as a ClearML OutputModel with label enumeration, tags and metadata.

    ``publish`` is the gate's verdict: with a server the model is published (and its ``tags``
    carry the production tag when the caller added it); offline it is only recorded. ``headline``
    opens the model's comment (default: the verdict).

    The model's configuration is the detectron2 config (``config.yaml`` as a dict); its comment carries the
    metadata as JSON too, because offline sessions cannot hold model metadata (ClearML's
    offline API has no metadata call, and only the model's init fields are replayed on import).
    Online each metadata key is also a model metadata entry (nested values as JSON).

    Offline workaround: ClearML (1.18 to 2.1.12) raises ``AttributeError: 'DummyModel' object has
    no attribute 'locked'`` from ``OutputModel.update_weights`` in offline mode, because its
    published-check reads a field the offline stand-in model lacks. We give the stand-in that
    field (unlocked) so ClearML's own offline path runs: the weights are copied into the session
    and the model is listed in its ``offline_output_models``, which ``Task.import_offline_session``
    registers on a server later. Publishing needs a server, so offline it is recorded, not done.
    """
    from clearml import OutputModel

    model = OutputModel(
        task=run.task,
        name=name,
        tags=list(tags),
        label_enumeration={label: i + 1 for i, label in enumerate(labels)},
        framework="PyTorch",
        config_dict=config or None,
        comment=(headline or f"d2ops detectron2 bundle; quality gate {'passed' if publish else 'failed'}")
        + "\n"
        + json.dumps(metadata, sort_keys=True, default=str),
    )
    if run.mode == "offline":
        base: Any = model._get_base_model()
        if not hasattr(base, "locked"):
            base.locked = False
    model.update_weights(weights_filename=str(bundle_zip), auto_delete_file=False, is_package=True, async_enable=False)
    if run.mode != "offline":
        for key, value in metadata.items():
            text = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
            model.set_metadata(key, text, v_type="str")
        if publish:
            model.publish()
    record = {
        "name": name,
        "id": model.id,
        "tags": list(tags),
        "labels": list(labels),
        "metadata": metadata,
        "published": bool(publish and run.mode != "offline"),
        "publish_requested": publish,
        "mode": run.mode,
    }
    run.reporter.artifact("model_registration", record)
    return record


def _live_task() -> Any:
    """The ClearML task this process runs in, when one is open and connected to a server (else ``None``)."""
    from clearml import Task

    task: Any = Task.current_task()
    if task is None or Task.is_offline():
        return None
    return task


def pipeline_run_id(machine_rank: int = 0) -> str | None:
    """The ClearML pipeline run (controller task) of this step: its task's parent; None offline or outside one.

    The extra machines of a multi-machine run are clones whose parent is the first machine's
    task; their pipeline run is that task's parent.
    """
    from clearml import Task

    task: Any = Task.current_task()
    if task is None or Task.is_offline():
        return None
    parent = task.parent
    if parent and machine_rank > 0:
        parent = Task.get_task(task_id=parent).parent
    return str(parent) if parent else None


def task_output_uri() -> str | None:
    """The output URI of this process's ClearML task (an agent's ``default_output_uri``); None offline."""
    from clearml import Task

    task: Any = Task.current_task()
    if task is None or Task.is_offline():
        return None
    uri = task.output_uri
    return str(uri) if uri else None


def step_lineage() -> dict[str, str | None]:
    """Which ClearML run produced this: the step task and its pipeline (the controller, the step's parent).

    Offline sessions have no pipeline controller (``pipeline_run`` is ``None``); outside ClearML both are ``None``.
    """
    from clearml import Task

    task: Any = Task.current_task()
    if task is None:
        return {"step_task": None, "pipeline_run": None}
    return {"step_task": str(task.id), "pipeline_run": pipeline_run_id()}


def launch_multi_node(num_machines: int, num_gpus: int, port: int) -> dict[str, Any] | None:
    """ClearML's multi-node launch (rank, master address and port) when training spans machines.

    On the first machine this enqueues the other machines' tasks and waits for them to start.
    None with one machine, or where there is no agent to start the others on.
    """
    from clearml import Task

    task: Any = Task.current_task() if num_machines > 1 else None
    if task is None or not on_agent():
        return None
    return dict(task.launch_multi_node(num_machines, port=port, wait=True, devices=num_gpus))


class ClearMLChampionStore:
    """The champion in the ClearML model registry: the newest *published* model named ``model_name``
    in ``project`` tagged ``tag`` (exactly what ``clearml://<project>/<model_name>@<tag>`` serves).

    Promotion: the candidate was registered published (without ``tag``) by :func:`register_model`.
    If the production models are still the ones this step compared against, the old champion is
    re-tagged (``tag`` removed, ``retired_tag`` and a dated tag added, metadata ``retired_at``/
    ``retired_by`` set; it stays published and is never deleted), and only then does the candidate
    get ``tag``: a failure in between leaves no production model rather than two.
    """

    #: The candidate is tagged by :meth:`promote`, after the old champion is retired.
    tag_on_register = False

    def __init__(
        self, project: str, model_name: str, tag: str, retired_tag: str, cache_dir: Path | str = "outputs/cache/models"
    ) -> None:
        self.project = project
        self.model_name = model_name
        self.tag = tag
        self.retired_tag = retired_tag
        self.cache_dir = Path(cache_dir)

    def _query_all(self, max_results: int | None = None) -> list[Any]:
        from clearml import Model

        try:
            return list(
                Model.query_models(
                    project_name=self.project,
                    model_name=self.model_name,
                    tags=[self.tag],
                    only_published=True,
                    include_archived=False,
                    max_results=max_results,
                )
            )
        except ValueError:  # ClearML raises ValueError for a project that does not exist yet
            log.info("ClearML project %r does not exist yet: no champion", self.project)
            return []

    def _query(self) -> Any:
        found = self._query_all(max_results=1)
        return found[0] if found else None

    def current(self) -> Champion | None:
        from d2ops.model_source import resolve_model

        model = self._query()
        if model is None:
            return None
        bundle = resolve_model(str(model.id), self.cache_dir)
        meta_file = bundle / "metadata.json"
        metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        return Champion(str(model.id), bundle, tuple(model.tags or ()), metadata)

    def promote(
        self, bundle: Path, *, registration: dict[str, Any], decision: GateDecision, previous: Champion | None
    ) -> Promotion:
        from clearml import Model

        new_id = str(registration.get("id"))
        if not registration.get("published"):
            raise RuntimeError(
                f"model {new_id} was not published, so it cannot become the {self.tag} model; "
                "register it through d2ops.clearml_adapter.register_model with publish=True"
            )
        current = {str(m.id) for m in self._query_all() if str(m.id) != new_id}
        expected = {previous.id} if previous else set()
        if current != expected:
            raise ChampionConflictError(
                f"the {self.tag} model changed while this step was evaluating (compared against "
                f"{sorted(expected) or 'none'}, now {sorted(current) or 'none'}): model {new_id} stays "
                "registered and published but not promoted; rerun the register step to compare it with the new champion"
            )
        now = datetime.now(timezone.utc)
        retired: list[str] = []
        if previous is not None:
            old: Any = Model(model_id=previous.id)
            retired = [t for t in (old.tags or []) if t != self.tag]
            retired += [t for t in retired_tags(self.retired_tag, now) if t not in retired]
            old.tags = retired  # models.edit: allowed on published models; the record and its weights stay
            old.set_metadata("retired_at", now.isoformat(), v_type="str")
            old.set_metadata("retired_by", new_id, v_type="str")
        new: Any = Model(model_id=new_id)
        new.tags = [*(t for t in (new.tags or []) if t != self.tag), self.tag]
        log.info("ClearML model %s is now %s; retired: %s", new_id, self.tag, previous.id if previous else "none")
        return Promotion(new_id, previous.id if previous else None, retired, "clearml")


def open_champion_store(cfg: ExperimentConfig) -> ChampionStore:
    """The champion store for this process: the ClearML registry inside a server-connected task,
    else the local folder ``registry.local_dir`` (offline sessions, plain library use, tests)."""
    gate = cfg.registry.champion
    if _live_task() is not None:
        return ClearMLChampionStore(cfg.clearml.project, cfg.registry.model_name, gate.tag, gate.retired_tag)
    return LocalChampionStore(cfg.registry.local_dir, cfg.registry.model_name, gate.tag, gate.retired_tag)
