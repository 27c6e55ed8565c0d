"""Export a model bundle as a CVAT serverless function (nuclio), and run it inside nuclio.

``d2ops export nuclio --model M --out DIR`` writes two deployable function folders::

    DIR/d2ops-export.json      what was exported (model, labels, d2ops version); marks DIR as an export
    DIR/cpu/  DIR/gpu/         nuctl deploy --project-name cvat --path DIR/cpu  (or DIR/gpu)
        function.yaml          CVAT's function spec, shaped like CVAT's own detectron2 functions
        main.py                nuclio's entry points: init_context(context), handler(context, event)
        model/                 the bundle (weights, config.yaml, labels.json, metrics, metadata)
        d2ops/                 a copy of this package's source, put first on sys.path by main.py

The package is *copied* into the function rather than pip-installed by a build directive because
d2ops is not on a package index the nuclio builder can reach, the function folder is only copied into
the image after the ``preCopy`` directives run, and installing d2ops would pull in its training and
S3 dependencies. The copy makes the function run exactly the code that exported it (the same
:class:`~d2ops.model.detector.Detector` and :mod:`~d2ops.serving.formats`), whatever d2ops the base image holds.

The second half of this module is what main.py calls at run time: :func:`init_context` loads the
bundle once per nuclio worker, :func:`handle_event` answers one request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import d2ops
from d2ops.model.bundle import ModelBundle, ModelNotFoundError
from d2ops.utils.folders import MANIFEST, OutputFolderError, written_folder

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "DEFAULT_RUNTIME",
    "EXPORT_MANIFEST",
    "MAX_REQUEST_BODY_BYTES",
    "ExportError",
    "NuclioExport",
    "build_function_config",
    "bundle_shape_type",
    "check_nuclio_runtime",
    "cvat_label_spec",
    "export_nuclio",
    "function_name",
    "handle_event",
    "init_context",
]

log = logging.getLogger(__name__)

#: The image docker/Dockerfile builds: CUDA PyTorch, detectron2 and d2ops's dependencies (Python 3.11).
DEFAULT_BASE_IMAGE = "d2ops/detectron2:latest"
#: nuclio's Python runtime; it must match the base image's ``python3``.
DEFAULT_RUNTIME = "python:3.11"
_NUCLIO_RUNTIME = re.compile(r"^python:3\.\d{1,2}$")
#: CVAT sends whole frames base64-encoded: 32 MiB, as in CVAT's own functions.
MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024
EXPORT_MANIFEST = MANIFEST
VARIANTS = ("cpu", "gpu")
#: What d2ops.model.detector and d2ops.serving.formats import beyond torch and detectron2. Already in the default
#: base image (a no-op there); installed when --base-image names a plain detectron2 image.
RUNTIME_REQUIREMENTS = (
    "Pillow>=10",
    "opencv-python-headless<4.11",
    "pyyaml>=6",
    "pydantic>=2.6,<3",
    "boto3>=1.34",
    "tqdm>=4.66",
)
_FUNCTION_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

_MAIN_PY = '''\
"""CVAT serverless function for the d2ops model {name!r} (written by `d2ops export nuclio`).

nuclio calls init_context once per worker and handler once per request. The model bundle is in
model/ and the d2ops code that exported it in d2ops/, both beside this file; the copy is put first on
sys.path so the function runs that code, not whichever d2ops the base image may hold.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from d2ops.serving import nuclio as d2ops_nuclio  # noqa: E402

MODEL_DIR = os.path.join(HERE, "model")


def init_context(context):
    d2ops_nuclio.init_context(
        context,
        MODEL_DIR,
        device=os.environ.get("D2OPS_DEVICE", "cpu"),
        default_threshold=float(os.environ.get("D2OPS_SCORE_THRESHOLD", "{threshold}")),
        shape=os.environ.get("D2OPS_CVAT_SHAPE", "{shape}"),
        runtime=os.environ.get("D2OPS_RUNTIME", "auto"),
    )


def handler(context, event):
    return d2ops_nuclio.handle_event(context, event)
'''


class ExportError(ValueError):
    """The export cannot be written as asked (bad name, occupied folder); the message says what to do."""


@dataclass(frozen=True)
class NuclioExport:
    """Where an export was written and what it holds."""

    out_dir: Path
    name: str
    labels: list[str]
    shape_type: str

    def function_dir(self, variant: str) -> Path:
        return self.out_dir / variant

    def deploy_commands(self) -> list[str]:
        return [f"nuctl deploy --project-name cvat --path {self.function_dir(v)} --platform local" for v in VARIANTS]


# --------------------------------------------------------------------------------------------- export


def cvat_label_spec(labels: Sequence[str], shape_type: str) -> list[dict[str, Any]]:
    """CVAT's label list for ``metadata.annotations.spec``; ids are the model's class indices."""
    return [{"id": index, "name": name, "type": shape_type} for index, name in enumerate(labels)]


def bundle_shape_type(bundle_dir: Path, shape: str = "mask") -> str:
    """The CVAT label type: ``shape`` (``mask`` or ``polygon``) for segmenting bundles, else ``rectangle``."""
    # lazy: torch, for the nuclio runtime only (`d2ops export` never loads it)
    from d2ops.serving.replies import cvat_label_type

    return cvat_label_type(ModelBundle(bundle_dir).segments(), shape)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:63].rstrip("-") or "model"


def function_name(name: str | None, bundle_dir: Path) -> str:
    """The nuclio function name: ``name`` if given (validated), else ``d2ops-<model>`` from the bundle."""
    if name is not None:
        if not _FUNCTION_NAME.match(name):
            raise ExportError(
                f"--name {name!r} is not a valid nuclio function name (lowercase letters, digits and '-', "
                f"at most 63 characters, starting and ending with a letter or digit); e.g. {_slug(name)!r}"
            )
        return name
    metadata = ModelBundle(bundle_dir).metadata()
    model = metadata.get("model_name") or metadata.get("experiment") or bundle_dir.name
    return _slug(f"d2ops-{model}")


def _labels_json(labels: Sequence[str], shape_type: str) -> str:
    """The spec annotation as CVAT writes it: a JSON list, one label per line."""
    lines = [json.dumps(item) for item in cvat_label_spec(labels, shape_type)]
    return "[\n" + ",\n".join(f"  {line}" for line in lines) + "\n]\n"


def check_nuclio_runtime(runtime: str) -> str:
    """``runtime`` if it names nuclio's Python runtime (``python:3.<minor>``); else ExportError saying what to pass."""
    if not _NUCLIO_RUNTIME.match(runtime):
        raise ExportError(
            f"--runtime {runtime!r} is not a nuclio runtime: d2ops functions run on nuclio's Python runtime, named "
            f"python:3.<minor> after the base image's python3 (default {DEFAULT_RUNTIME}). The model's own runtime "
            "(pytorch, onnx, openvino) is picked in the function by D2OPS_RUNTIME (default auto: the fastest exported)"
        )
    return runtime


def build_function_config(
    *,
    name: str,
    labels: Sequence[str],
    shape_type: str,
    variant: str,
    base_image: str = DEFAULT_BASE_IMAGE,
    runtime: str = DEFAULT_RUNTIME,
    threshold: float = 0.5,
    description: str = "",
) -> dict[str, Any]:
    """The function.yaml document for one variant (``cpu`` or ``gpu``) of a CVAT detector function.

    It follows CVAT's own detectron2 functions (serverless/pytorch/facebookresearch/detectron2/):
    same annotations, trigger and platform attributes. The GPU variant asks for one GPU and runs one
    worker per replica, as CVAT's GPU functions do, so that the GPU holds one copy of the model.
    """
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    check_nuclio_runtime(runtime)
    gpu = variant == "gpu"
    pip = "python3 -m pip install --no-cache-dir " + " ".join(f"'{req}'" for req in RUNTIME_REQUIREMENTS)
    spec: dict[str, Any] = {
        "description": description or f"d2ops detectron2 detector {name} ({variant.upper()})",
        "runtime": runtime,
        "handler": "main:handler",
        "eventTimeout": "30s",
        "env": [
            {"name": "D2OPS_DEVICE", "value": "cuda" if gpu else "cpu"},
            {"name": "D2OPS_SCORE_THRESHOLD", "value": str(threshold)},
            {"name": "D2OPS_CVAT_SHAPE", "value": "polygon" if shape_type == "polygon" else "mask"},
        ],
        "build": {
            "image": f"cvat.{name}" + (":latest-gpu" if gpu else ""),
            "baseImage": base_image,
            "directives": {
                "preCopy": [
                    {"kind": "ENV", "value": "PYTHONUNBUFFERED=1"},
                    {"kind": "WORKDIR", "value": "/opt/nuclio"},
                    {"kind": "RUN", "value": pip},
                ]
            },
        },
        "triggers": {
            "myHttpTrigger": {
                "maxWorkers": 1 if gpu else 2,
                "kind": "http",
                "workerAvailabilityTimeoutMilliseconds": 10000,
                "attributes": {"maxRequestBodySize": MAX_REQUEST_BODY_BYTES},
            }
        },
        "platform": {
            "attributes": {
                "restartPolicy": {"name": "always", "maximumRetryCount": 3},
                "mountMode": "volume",
            }
        },
    }
    if gpu:
        spec["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    return {
        "metadata": {
            "name": name,
            "namespace": "cvat",
            "annotations": {
                "name": name,
                "type": "detector",
                "framework": "pytorch",
                "spec": _labels_json(labels, shape_type),
            },
        },
        "spec": spec,
    }


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the label spec) as YAML block literals, like CVAT's files."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def _write_function_yaml(path: Path, config: dict[str, Any], header: str) -> None:
    body = yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=4096)
    path.write_text(header + body)


def _copy_package(dest: Path) -> None:
    """Copy this d2ops package's source (not its caches) to ``dest``."""
    source = Path(d2ops.__file__).resolve().parent
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _copy_bundle(bundle_dir: Path, dest: Path, link_from: Path | None = None) -> None:
    """Copy the bundle files; the second variant hard-links the first's copy where it can."""
    dest.mkdir(parents=True)
    for path in ModelBundle(link_from or bundle_dir).files():
        src, name = path, path.name
        if link_from is not None:
            try:
                os.link(src, dest / name)
                continue
            except OSError:
                pass
        shutil.copy2(src, dest / name)


def _write_variant(
    staging: Path, variant: str, bundle_dir: Path, config: dict[str, Any], header: str, main_py: str
) -> None:
    folder = staging / variant
    folder.mkdir()
    _write_function_yaml(folder / "function.yaml", config, header)
    (folder / "main.py").write_text(main_py)
    _copy_package(folder / "d2ops")
    link_from = staging / VARIANTS[0] / "model" if variant != VARIANTS[0] else None
    _copy_bundle(bundle_dir, folder / "model", link_from)


def export_nuclio(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    threshold: float = 0.5,
    shape: str = "mask",
    base_image: str = DEFAULT_BASE_IMAGE,
    runtime: str = DEFAULT_RUNTIME,
    force: bool = False,
    model_ref: str | None = None,
) -> NuclioExport:
    """Write the CPU and GPU nuclio functions for a bundle folder into ``out_dir``, atomically.

    Everything is built in a temporary folder beside ``out_dir`` and renamed into place, so a
    failed export leaves nothing half-written. An existing ``out_dir`` is written only when it is
    empty, or replaced when it is exactly an earlier export of the same model and ``force`` is given
    (:mod:`d2ops.utils.folders`).
    """
    # lazy: torch, for the nuclio runtime only (`d2ops export` never loads it)
    from d2ops.serving.payloads import parse_threshold

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir).absolute()
    try:
        bundle = ModelBundle.open(bundle_dir)
    except ModelNotFoundError as err:
        raise ExportError(str(err)) from None
    threshold = parse_threshold(threshold, 0.5)
    fname = function_name(name, bundle_dir)
    labels = bundle.labels()
    try:
        shape_type = bundle_shape_type(bundle_dir, shape)
    except ValueError as err:
        raise ExportError(f"--shape: {err}") from None
    metadata = bundle.metadata()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    header = f"# CVAT serverless function for d2ops model {fname}; written by `d2ops export nuclio` at {created}.\n"
    main_py = _MAIN_PY.format(name=fname, threshold=threshold, shape=shape)

    extra = {
        "format": "cvat-nuclio",
        "name": fname,
        "model_ref": model_ref or str(bundle_dir),
        "labels": labels,
        "shape_type": shape_type,
        "threshold": threshold,
        "base_image": base_image,
        "runtime": runtime,
        "variants": list(VARIANTS),
        "created": created,
        "d2ops_version": d2ops.__version__,
        "bundle_metadata": metadata,
    }
    try:
        with written_folder(out_dir, kind="nuclio function", model=bundle.version(), sources=[bundle_dir], force=force,
                            manifest=extra) as staging:  # fmt: skip
            for variant in VARIANTS:
                config = build_function_config(
                    name=fname,
                    labels=labels,
                    shape_type=shape_type,
                    variant=variant,
                    base_image=base_image,
                    runtime=runtime,
                    threshold=threshold,
                )
                _write_variant(staging, variant, bundle_dir, config, header, main_py)
    except OutputFolderError as err:
        raise ExportError(str(err)) from None
    log.info("nuclio function %s written to %s", fname, out_dir)
    return NuclioExport(out_dir, fname, labels, shape_type)


# -------------------------------------------------------------------------------------- nuclio runtime


def init_context(
    context: Any,
    model_dir: str | Path,
    *,
    device: str = "cpu",
    default_threshold: float = 0.5,
    shape: str = "mask",
    runtime: str = "auto",
) -> None:
    """Load the bundle once per nuclio worker into ``context.user_data.model``, on ``runtime``
    (``D2OPS_RUNTIME``; ``auto``: the fastest the exported bundle has, :mod:`d2ops.model.runtimes`).

    ``shape`` (``D2OPS_CVAT_SHAPE``): how a segmenting model's objects are sent, ``mask`` or ``polygon``;
    anything else fails the function's start rather than silently sending another shape.
    """
    # lazy: torch, for the nuclio runtime only (`d2ops export` never loads it)
    from d2ops.serving.replies import cvat_label_type
    from d2ops.serving.service import load_detector

    try:
        cvat_label_type(True, shape)
    except ValueError as err:
        raise ValueError(f"D2OPS_CVAT_SHAPE: {err}") from None
    context.logger.info(f"d2ops: loading model from {model_dir} on {device}")
    detector = load_detector(model_dir, device=device, runtime=runtime)
    context.user_data.model = detector
    context.user_data.default_threshold = default_threshold
    context.user_data.shape = shape
    labels = ", ".join(detector.labels)
    context.logger.info(f"d2ops: model ready on {detector.runtime_name} ({len(detector.labels)} labels: {labels})")


def _reply(context: Any, body: Any, status_code: int) -> Any:
    return context.Response(body=json.dumps(body), headers={}, content_type="application/json", status_code=status_code)


def handle_event(context: Any, event: Any) -> Any:
    """Answer one CVAT request: detections in CVAT's format; 400 with the reason for any input the shared
    validation refuses (:mod:`d2ops.serving.service`); 500 without a traceback for anything else."""
    # lazy: torch, for the nuclio runtime only (`d2ops export` never loads it)
    from d2ops.serving.formats import BadInputError
    from d2ops.serving.replies import to_cvat
    from d2ops.serving.service import decode_request

    try:
        model = context.user_data.model
        request = decode_request(model, event.body, context.user_data.default_threshold, allow_raw_image=False)
        detections = model.predict([request.image], request.threshold)[0]
    except BadInputError as err:
        context.logger.info(f"d2ops: bad request: {err}")
        return _reply(context, {"error": str(err)}, 400)
    except Exception:  # the serving boundary: log everything, show the client nothing internal
        context.logger.error(f"d2ops: prediction failed\n{traceback.format_exc()}")
        return _reply(context, {"error": "internal error while running the model; see the function's logs"}, 500)
    return _reply(context, to_cvat(detections, context.user_data.shape), 200)
