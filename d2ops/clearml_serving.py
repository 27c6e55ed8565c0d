"""Serve d2ops bundles with clearml-serving: a custom engine, and ``d2ops serving register``.

**The engine.** ``clearml-serving model add --engine custom --preprocess d2ops/clearml_serving.py``
uploads this file; every inference container loads it with ``importlib`` (as a standalone module, so
it imports d2ops absolutely: the container needs d2ops and detectron2 installed, e.g. an inference
image built from ``d2ops/detectron2``), creates one :class:`Preprocess` per process and calls, as
``clearml_serving/serving/preprocess_service.py`` (``CustomPreprocessRequest``) and
``model_request_processor.py`` (``_process_request``) do:

1. ``load(local_file_name)`` once, with ``Model(model_id).get_local_copy()``: the bundle folder
   (d2ops registers bundles as packages, so ClearML extracts them) or the bundle zip;
2. per request ``preprocess(body, state, fn)``, ``process(data, state, fn)``, ``postprocess(data, state, fn)``,
   synchronously, with a fresh ``state`` dict and ``fn`` either ``None`` or a callable that takes a dict
   of custom statistics.

``body`` is what clearml-serving's FastAPI route ``serve_model(..., request: Union[bytes, Dict])`` gets:
a dict for ``application/json`` requests, ``{"image": <base64>, "threshold": 0.5}`` as CVAT sends it,
and the raw bytes for any other content type, which may be the image file itself
(``curl --data-binary @img.jpg -H 'Content-Type: image/jpeg'``). The reply is
``{"detections": [...]}`` in CVAT's detector format (:func:`d2ops.formats.to_cvat`, the same as the
CVAT nuclio function's reply): a dict rather than a bare list because clearml-serving's metric logging
reads ``return_value.keys()``. Bad input raises ``ValueError``, which clearml-serving answers with 422
and the message.

Environment of the inference container: ``D2OPS_DEVICE`` (``auto``, ``cpu``, ``cuda``; default
``auto``), ``D2OPS_SCORE_THRESHOLD`` (default 0.5), ``D2OPS_MODEL_CACHE`` (where bundle zips are extracted).

**Registration.** :func:`build_register_command` builds the ``clearml-serving`` command line (an
argument list, never a shell string) that adds the endpoint: ``model add`` for one model (by id, or
the newest matching project/name/tags), ``model auto-update`` to follow new versions of a model name.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np

    from d2ops.predictor import Detection, Detector

__all__ = [
    "PREPROCESS_FILE",
    "EndpointRegistration",
    "Preprocess",
    "RegistrationError",
    "build_register_command",
    "find_bundle",
    "serving_main",
]

log = logging.getLogger(__name__)

#: The file clearml-serving uploads as the endpoint's pre/post-processing code: this module.
PREPROCESS_FILE = Path(__file__).resolve()
_ENDPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)*$")
_MODEL_ID = re.compile(r"^[0-9a-f]{32}$")

StatsFn = Callable[[dict[str, Any]], None] | None


# ---------------------------------------------------------------------------------------- the engine


def find_bundle(local: Path, cache_dir: Path) -> Path:
    """The bundle folder in what ClearML downloaded: the folder itself, one folder down, or a zip."""
    from d2ops.model_source import ModelNotFoundError, resolve_model

    if local.is_dir() and not (local / "model_final.pth").is_file():
        inner = [p for p in local.iterdir() if p.is_dir() and (p / "model_final.pth").is_file()]
        if len(inner) == 1:
            local = inner[0]
    try:
        return resolve_model(str(local), cache_dir)
    except ModelNotFoundError as err:
        raise ValueError(f"the endpoint's model is not a d2ops bundle: {err}") from None


class Preprocess:
    """clearml-serving's custom-engine class for d2ops bundles (see the module docstring for the call order).

    One instance per serving process; requests carry their own ``state``, so it keeps no per-request data.
    """

    def __init__(self) -> None:
        from d2ops.payloads import parse_threshold

        self.detector: Detector | None = None
        self.device = os.environ.get("D2OPS_DEVICE", "auto")
        self.default_threshold = parse_threshold(os.environ.get("D2OPS_SCORE_THRESHOLD"), 0.5)
        self.cache_dir = Path(os.environ.get("D2OPS_MODEL_CACHE", Path(tempfile.gettempdir()) / "d2ops-models"))

    def load(self, local_file_name: str | None) -> Detector:
        """Load the endpoint's model (its local copy: a bundle folder or zip) onto ``D2OPS_DEVICE``."""
        from d2ops.predictor import Detector

        if not local_file_name:
            raise ValueError("the endpoint has no model: register it with --model-id or --project/--name")
        bundle = find_bundle(Path(local_file_name), self.cache_dir)
        self.detector = Detector.from_bundle(bundle, device=self.device)
        log.info("d2ops model loaded from %s (%d labels)", bundle, len(self.detector.labels))
        return self.detector

    def preprocess(self, body: Any, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None) -> np.ndarray:
        """Decode the request (JSON dict, or raw bytes) into a BGR image; the threshold goes into ``state``."""
        from d2ops.payloads import parse_detection_request

        request = parse_detection_request(body, self.default_threshold, allow_raw_image=True)
        state["threshold"] = request.threshold
        return request.image

    def process(
        self, data: np.ndarray, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> list[Detection]:
        """Run the detector on one image."""
        if self.detector is None:
            raise RuntimeError("Preprocess.process called before load(): clearml-serving found no model to load")
        return self.detector.predict([data], state["threshold"])[0]

    def postprocess(
        self, data: list[Detection], state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> dict[str, Any]:
        """``{"detections": [...]}`` in CVAT's format; the count is offered to clearml-serving's statistics."""
        from d2ops.formats import to_cvat

        if collect_custom_statistics_fn is not None:
            collect_custom_statistics_fn({"detections": len(data)})
        return {"detections": to_cvat(data)}


# ------------------------------------------------------------------------------------- registration


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
