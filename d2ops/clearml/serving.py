"""``d2ops serving register``: add a clearml-serving endpoint that serves a d2ops model with the custom engine.

:func:`build_register_commands` builds the ``clearml-serving`` command lines (argument lists, never
shell strings):

- ``model add`` for one model (by id, or the newest matching project/name/tags), served at
  ``/serve/<endpoint>`` (``/serve/<endpoint>/<version>`` with ``--version``);
- ``model auto-update`` to follow new versions of a model name. clearml-serving serves those at
  ``/serve/<endpoint>/<N>`` (``ModelRequestProcessor._sync_monitored_models``), so a second command,
  ``model canary --endpoint <endpoint> --weights 1 --input-endpoint-prefix <endpoint>/``, routes the
  plain ``/serve/<endpoint>`` to the newest ``N`` (``ModelRequestProcessor._update_canary_lookup``
  sorts the prefix's endpoints by version, newest first, and keeps one per weight).

Every command carries clearml-serving's global ``--yes``: ``verify_session_version`` in
``clearml_serving/__main__.py`` otherwise asks y/n on stdin when the serving session was made by
another clearml-serving version, which stalls or aborts an unattended run.

Endpoint names and versions are single path segments: clearml-serving's route is
``/serve/{model_id}/{version}`` (``serving/main.py``), so ``a/b`` with a version is unreachable, and
``_sync_monitored_models`` parses ``int(url.split("/", 1)[1])``, which fails on ``a/b/1`` while it
holds the update lock and every request waits on it.

The engine it registers is :mod:`d2ops.serving.clearml_engine`, as ``custom_async`` by default.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from d2ops.serving.clearml_engine import PREPROCESS_FILE

__all__ = ["ENGINES", "EndpointRegistration", "RegistrationError", "build_register_commands"]

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: clearml-serving engine types that load d2ops/serving/clearml_engine.py (``preprocess_service.py``).
ENGINES = ("custom_async", "custom")
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
    engine: str = "custom_async"

    def validate(self) -> None:
        """Raise :class:`RegistrationError` for any combination clearml-serving would reject or misread."""
        if "/" in self.endpoint:
            raise RegistrationError(
                f"--endpoint {self.endpoint!r}: '/' is not allowed. clearml-serving routes /serve/<endpoint>/<version> "
                "by path segment, so such an endpoint is unreachable with a version and breaks --auto-update; "
                f"use one segment, e.g. {self.endpoint.replace('/', '-')!r}"
            )
        if not _SEGMENT.match(self.endpoint):
            raise RegistrationError(
                f"--endpoint {self.endpoint!r}: use letters, digits, '_', '-' and '.' (e.g. 'detector-shapes')"
            )
        if self.version is not None and not _SEGMENT.match(self.version):
            raise RegistrationError(
                f"--version {self.version!r}: use one path segment of letters, digits, '_', '-' and '.' (e.g. '2')"
            )
        if self.engine not in ENGINES:
            raise RegistrationError(f"--engine {self.engine!r}: use one of {', '.join(ENGINES)}")
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


def build_register_commands(
    reg: EndpointRegistration, *, preprocess: Path = PREPROCESS_FILE, program: Sequence[str] = ("clearml-serving",)
) -> list[list[str]]:
    """The clearml-serving commands (argument lists, run in order) that register ``reg``.

    One ``model add``; or, with ``auto_update``, ``model auto-update`` and the ``model canary`` that
    routes ``/serve/<endpoint>`` to the newest version.
    """
    reg.validate()
    base = [*program, "--yes"]
    if reg.serving_service:
        base += ["--id", reg.serving_service]
    cmd = [*base, "model", "auto-update" if reg.auto_update else "add"]
    cmd += ["--engine", reg.engine, "--endpoint", reg.endpoint, "--preprocess", str(preprocess)]
    if reg.version is not None:
        cmd += ["--version", reg.version]
    if reg.model_id is not None:
        return [[*cmd, "--model-id", reg.model_id]]
    assert reg.project is not None and reg.name is not None  # validate() guarantees it
    cmd += ["--project", reg.project, "--name", reg.name]
    if reg.tags:
        cmd += ["--tags", *reg.tags]
    if reg.published is not False:  # default: serve only published (quality-gated) models
        cmd.append("--published")
    if not reg.auto_update:
        return [cmd]
    cmd += ["--max-versions", str(reg.max_versions)]
    canary = [*base, "model", "canary", "--endpoint", reg.endpoint, "--weights", "1"]
    canary += ["--input-endpoint-prefix", f"{reg.endpoint}/"]
    return [cmd, canary]
