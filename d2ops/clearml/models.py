"""ClearML's model registry: registering bundles, and the champion (production) model.

:func:`register_model` registers a bundle as an ``OutputModel`` (offline too, through ClearML's
own offline path); :class:`ClearMLChampionStore` finds, and promotes to, the production model.
:func:`resolve_clearml_model` downloads a registered bundle by id or by ``clearml://`` query.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clearml import InputModel, Model, OutputModel

from d2ops.clearml.session import live_task
from d2ops.model.bundle import ModelBundle
from d2ops.model.source import ModelNotFoundError, ModelRef, resolve_model
from d2ops.registry.champion import (
    Champion,
    ChampionConflictError,
    ChampionStore,
    LocalChampionStore,
    Promotion,
    retired_tags,
)
from d2ops.registry.gate import GateDecision
from d2ops.utils import jsonio

if TYPE_CHECKING:
    from d2ops.clearml.step import StepRun
    from d2ops.config import ExperimentConfig

__all__ = ["ClearMLChampionStore", "ClearMLModelRegistry", "open_champion_store", "register_model"]

log = logging.getLogger(__name__)


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
    field (unlocked) so ClearML's own offline path runs: the model is listed in the session's
    ``offline_output_models``, which ``Task.import_offline_session`` registers on a server later,
    referring to the bundle zip rather than a copy (:func:`_fix_offline_record`). Publishing needs a
    server, so offline it is recorded, not done.
    """
    model = OutputModel(
        task=run.task,
        name=name,
        tags=list(tags),
        label_enumeration={label: i + 1 for i, label in enumerate(labels)},
        framework="PyTorch",
        config_dict=config or None,
        comment=(headline or f"d2ops detectron2 bundle; quality gate {'passed' if publish else 'failed'}")
        + "\n"
        + jsonio.dumps(metadata, sort_keys=True, default=str),
    )
    if run.mode != "offline" and run.cfg.clearml.output_uri:
        # A step task an agent runs has no output destination of its own (the pipeline creates it with
        # Task.create, which records none), so without this the weights stay where the step wrote them and the
        # registry points at a file inside the agent's checkout (the cluster rehearsal found a file:// URL).
        # The experiment's clearml.output_uri, as launched or as edited in the UI, is where they belong.
        model.set_upload_destination(run.cfg.clearml.output_uri)
    if run.mode == "offline":
        # clearml 1.18 to 2.1.12: the offline stand-in model is reachable only through this private call.
        base: Any = model._get_base_model()
        if not hasattr(base, "locked"):
            base.locked = False
    model.update_weights(weights_filename=str(bundle_zip), auto_delete_file=False, is_package=True, async_enable=False)
    if run.mode == "offline":
        _fix_offline_record(run.task, Path(bundle_zip), run.cfg.clearml.output_uri)
    if run.mode != "offline":
        for key, value in metadata.items():
            text = jsonio.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
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


def _fix_offline_record(task: Any, bundle_zip: Path, output_uri: str | None) -> None:
    """Make the offline model record importable, referring to the bundle zip instead of a copy of it.

    ClearML to 2.1.12 (``OutputModel._update_weights_offline`` in clearml/model.py; no public accessor):
    - it records both ``config_text`` and ``config_dict``, and ``Task.import_offline_session`` passes
      both to ``OutputModel``, which refuses them together ("Only one of (config_text, config_dict)
      is allowed"): the model never reached a server. The dict is kept; ClearML renders the text.
    - it copies the weights into ``<session>/models/`` and records that copy's absolute path, which
      the import uploads from. A session kept as its zip only has no such path, so the record names
      the bundle zip itself, the one copy (d2ops keeps it in ``runtime.output_dir``), and ClearML's
      copy is removed. Import the session where that zip is.
    - an offline task keeps no output destination (``Task.init(output_uri=...)`` records none), so the
      model would be registered on import as a local file even with ``clearml.output_uri`` set; the
      record names it, and the import uploads the bundle there (``OutputModel.set_upload_destination``).
    """
    entry = task._offline_output_models[-1]
    if output_uri and not entry.get("output_uri"):
        entry["output_uri"] = output_uri
    if entry["init"].get("config_dict") is not None:
        entry["init"]["config_text"] = None
    record = entry["weights"]
    copy = Path(record["weights_filename"])
    record["weights_filename"] = str(bundle_zip.resolve())
    if copy.resolve() != bundle_zip.resolve():
        copy.unlink(missing_ok=True)


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
        model = self._query()
        if model is None:
            return None
        bundle = resolve_model(str(model.id), self.cache_dir)
        return Champion(str(model.id), bundle, tuple(model.tags or ()), ModelBundle(bundle).metadata())

    def promote(
        self, bundle: Path, *, registration: dict[str, Any], decision: GateDecision, previous: Champion | None
    ) -> Promotion:
        new_id = str(registration.get("id"))
        if not registration.get("published"):
            raise RuntimeError(
                f"model {new_id} was not published, so it cannot become the {self.tag} model; "
                "register it through d2ops.clearml.models.register_model with publish=True"
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
    if live_task() is not None:
        return ClearMLChampionStore(cfg.clearml.project, cfg.registry.model_name, gate.tag, gate.retired_tag)
    return LocalChampionStore(cfg.registry.local_dir, cfg.registry.model_name, gate.tag, gate.retired_tag)


class ClearMLModelRegistry:
    """Resolves ``clearml://<project>/<name>[@<tag>]`` and model ids for :mod:`d2ops.model.source`."""

    @staticmethod
    def _newest(ref: ModelRef) -> Any:
        found = Model.query_models(
            project_name=ref.project,
            model_name=ref.name,
            tags=[ref.tag] if ref.tag else None,
            only_published=True,
            include_archived=False,
            max_results=1,
        )
        return found[0] if found else None

    def newest_id(self, ref: ModelRef) -> str | None:
        model = self._newest(ref)
        return str(model.id) if model is not None else None

    def local_copy(self, ref: ModelRef) -> Path:
        model: Any
        if ref.kind == "clearml_id":
            model = InputModel(model_id=ref.value)
        else:
            model = self._newest(ref)
            if model is None:
                tag = f" tagged {ref.tag!r}" if ref.tag else ""
                raise ModelNotFoundError(f"no published ClearML model {ref.name!r}{tag} in project {ref.project!r}")
        local = model.get_local_copy(extract_archive=True)
        if not local:
            raise ModelNotFoundError(f"ClearML model {ref.value} has no downloadable weights")
        return Path(local)
