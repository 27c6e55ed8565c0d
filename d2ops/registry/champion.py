"""Where the current champion lives: the ChampionStore protocol and the local folder store."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from d2ops.model.bundle import ModelBundle
from d2ops.registry.gate import GateDecision
from d2ops.utils.jsonio import write_json

if TYPE_CHECKING:
    pass
log = logging.getLogger(__name__)

__all__ = ["Champion", "ChampionConflictError", "ChampionStore", "LocalChampionStore", "Promotion", "retired_tags"]


def retired_tags(retired_tag: str, when: datetime) -> list[str]:
    """The tags a replaced champion gets: ``retired_tag`` and a dated one (``production-retired-2025-01-31``)."""
    return [retired_tag, f"{retired_tag}-{when:%Y-%m-%d}"]


@dataclass(frozen=True)
class Champion:
    """The current production model: its registry id, a local copy of its bundle, its tags."""

    id: str
    bundle: Path
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Promotion:
    """What a promotion changed: the new champion, and the old one's id and new tags."""

    champion_id: str
    retired_id: str | None
    retired_tags: list[str]
    store: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChampionConflictError(RuntimeError):
    """The champion changed while this step was evaluating; the decision is stale. Rerun the step."""


class ChampionStore(Protocol):
    """Where the production model is found and replaced (a ClearML registry, or a local folder)."""

    #: Whether the registered model carries the production tag from the start (an offline record of
    #: the verdict), or gets it from :meth:`promote` once the old champion is retired (a registry).
    tag_on_register: bool

    def current(self) -> Champion | None:
        """The champion with a local bundle to evaluate, or ``None`` when nothing is in production."""
        ...

    def promote(
        self, bundle: Path, *, registration: dict[str, Any], decision: GateDecision, previous: Champion | None
    ) -> Promotion:
        """Make ``bundle`` the champion; ``previous`` keeps its record under the retired tags."""
        ...


class LocalChampionStore:
    """A model registry in a folder, for offline runs: ``<root>/<model_name>/``.

    - ``models/<id>/``: each promoted bundle, with ``record.json`` (its tags, when promoted and
      retired, the gate decision); records are never deleted;
    - ``<tag>.json`` (``production.json``): the pointer to the champion, replaced atomically;
    - ``history.json``: every promotion and retirement, oldest first.

    Promotions take an exclusive lock on the folder, and fail with :class:`ChampionConflictError`
    when the champion changed since the caller read it.
    """

    tag_on_register = True

    def __init__(
        self, root: Path | str, model_name: str, tag: str = "production", retired_tag: str = "production-retired"
    ):
        self.folder = Path(root) / model_name
        self.tag = tag
        self.retired_tag = retired_tag

    @property
    def pointer(self) -> Path:
        return self.folder / f"{self.tag}.json"

    @property
    def history_file(self) -> Path:
        return self.folder / "history.json"

    def history(self) -> list[dict[str, Any]]:
        """Every promotion and retirement so far, oldest first."""
        return json.loads(self.history_file.read_text()) if self.history_file.is_file() else []

    def record(self, model_id: str) -> dict[str, Any]:
        """The record of a promoted (possibly since retired) model."""
        return json.loads((self.folder / "models" / model_id / "record.json").read_text())

    def current(self) -> Champion | None:
        if not self.pointer.is_file():
            return None
        model_id = json.loads(self.pointer.read_text())["id"]
        bundle = self.folder / "models" / model_id
        if not (bundle / ModelBundle.WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{self.pointer} names model {model_id}, but {bundle} holds no bundle: restore the folder, "
                f"or delete {self.pointer} to start without a champion"
            )
        metadata = ModelBundle(bundle).metadata()
        return Champion(model_id, bundle, tuple(self.record(model_id)["tags"]), metadata)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def promote(
        self, bundle: Path, *, registration: dict[str, Any], decision: GateDecision, previous: Champion | None
    ) -> Promotion:
        now = datetime.now(timezone.utc)
        model_id = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}"
        with self._locked():
            current = self.current()
            if (current.id if current else None) != (previous.id if previous else None):
                raise ChampionConflictError(
                    f"the {self.tag} model of {self.folder} changed to {current.id if current else None} while this "
                    f"step compared against {previous.id if previous else None}; rerun the register step"
                )
            self._add_bundle(bundle, model_id, now, registration, decision)
            write_json(
                self.pointer, {"id": model_id, "bundle": f"models/{model_id}", "since": now.isoformat()}, default=str
            )
            events: list[dict[str, Any]] = [
                {
                    "at": now.isoformat(),
                    "event": "promoted",
                    "id": model_id,
                    "tags": [self.tag],
                    "replaced": previous.id if previous else None,
                    "decision": decision.to_dict(),
                }
            ]
            retired: list[str] = []
            if previous is not None:
                retired = self._retire(previous.id, now, replaced_by=model_id)
                events.append(
                    {
                        "at": now.isoformat(),
                        "event": "retired",
                        "id": previous.id,
                        "tags": retired,
                        "replaced_by": model_id,
                    }
                )
            write_json(self.history_file, [*self.history(), *events], default=str)
        log.info("%s is now the %s model in %s", model_id, self.tag, self.folder)
        return Promotion(model_id, previous.id if previous else None, retired, "local")

    def _add_bundle(
        self, bundle: Path, model_id: str, now: datetime, registration: dict[str, Any], decision: GateDecision
    ) -> None:
        models = self.folder / "models"
        models.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=models))
        try:
            shutil.copytree(bundle, staging, dirs_exist_ok=True)
            record = {
                "id": model_id,
                "tags": [self.tag],
                "promoted_at": now.isoformat(),
                "retired_at": None,
                "registration_id": registration.get("id"),
                "decision": decision.to_dict(),
            }
            write_json(staging / "record.json", record, default=str)
            os.replace(staging, models / model_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _retire(self, model_id: str, now: datetime, replaced_by: str) -> list[str]:
        record = self.record(model_id)
        tags = [t for t in record["tags"] if t != self.tag]
        tags += [t for t in retired_tags(self.retired_tag, now) if t not in tags]
        record.update(tags=tags, retired_at=now.isoformat(), replaced_by=replaced_by)
        write_json(self.folder / "models" / model_id / "record.json", record, default=str)
        return tags
