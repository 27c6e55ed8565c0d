"""A Triton model repository for an exported bundle, and what ``clearml-serving --engine triton`` needs to serve it.

:func:`write_triton_repository` turns a bundle with ``model.onnx`` (detectron2's ``TracingAdapter`` around
``model.inference(..., do_postprocess=False)``: input ``image`` float32 ``[3, H, W]`` already resized, outputs
``boxes``, ``classes``, ``masks`` (Mask R-CNN), ``scores``, ``image_size``) into::

    OUT/
      <model_name>/config.pbtxt      the complete Triton model configuration (plain ``tritonserver``)
      <model_name>/1/model.onnx      the graph, wrapped for Triton (below)
      clearml_aux_config.pbtxt       what clearml-serving does not generate itself (``--aux-config``)
      preprocess.py                  :mod:`d2ops.serving.triton_preprocess` with this model's settings filled in
      clearml-serving.txt            the two clearml-serving commands that upload and serve it

**Why the graph is wrapped.** Triton's model configuration (``docs/user_guide/model_configuration.md`` in
triton-inference-server/server, "Maximum Batch Size"; ``ModelConfig.max_batch_size`` in
triton-inference-server/common ``protobuf/model_config.proto``) says a model with ``max_batch_size`` > 0 takes
and returns tensors whose first dimension is the batch, which ``dims`` leave out, and the dynamic batcher
(``dynamic_batching``) is only for such models. Its ONNX Runtime backend also checks that a batching model's
first dimension is variable (``-1``; triton-inference-server/backend ``src/backend_common.cc``
``CompareDimsSupported``). Images of different sizes cannot share a batch, so the wrapper takes
``image`` ``[batch, 3, H, W]`` and squeezes the batch (``Squeeze`` fails unless it is 1: ``max_batch_size: 1``).

**Why one output.** clearml-serving 1.3.5 reads Triton's reply by position, not by name
(``clearml_serving/serving/preprocess_service.py``, ``TritonPreprocessRequest.process``: output ``i`` is decoded
with ``output_type[i]`` and the arrays reach ``postprocess`` as an unnamed list), and Triton does not promise the
outputs in the configuration's order (triton-inference-server/server issue #5773). So the wrapper packs every
detection into one float32 output ``detections`` ``[batch, N, C]``: columns ``x1, y1, x2, y2, score, class``
and, for Mask R-CNN, the ``M x M`` mask probabilities row-major (``C = 6 + M*M``). Class indices are exact in
float32 (below 2**24). ``image_size`` is dropped: the preprocess knows the size it resized to.

**clearml-serving's side** (read in clearml-serving 1.3.5): ``clearml-serving model add`` stores the endpoint
(``__main__.py`` ``func_model_endpoint_add``; ``ModelRequestProcessor._validate_model`` refuses an
``--aux-config`` that holds ``input``/``output`` or ``default_model_filename`` and wants all six
``--input-*``/``--output-*``); the Triton container then writes ``config.pbtxt`` itself: the aux file's text
followed by the inputs and outputs from those arguments (``engines/triton/triton_helper.py``
``TritonHelper.create_config_pbtxt``), into ``/models/<endpoint>`` (``/`` of a versioned endpoint becomes
``_``, ``model_service_update_step``), and copies a model *folder* with framework ONNX into version ``1``
(a single ONNX file would land as ``model.bin``, which the ``onnxruntime_onnx`` platform does not look for:
it loads ``model.onnx`` by default). Hence ``model upload --framework onnx --path OUT/<model_name>/1``.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper

from d2ops.model.bundle import ModelBundle
from d2ops.utils.files import atomic_write
from d2ops.utils.folders import OutputFolderError, written_folder

__all__ = [
    "DETECTION_COLUMNS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PREPROCESS_TEMPLATE",
    "TritonExportError",
    "TritonRepository",
    "clearml_serving_commands",
    "default_instances",
    "describe",
    "preprocess_source",
    "triton_config",
    "wrap_for_triton",
    "write_triton_repository",
]

#: The Triton model's input (the exported graph's, with a batch dimension in front).
INPUT_NAME = "image"
#: The Triton model's one output: ``[batch, N, C]``, one row per detection.
OUTPUT_NAME = "detections"
#: The first columns of a row of :data:`OUTPUT_NAME`; Mask R-CNN's ``M*M`` mask probabilities follow.
DETECTION_COLUMNS = ("x1", "y1", "x2", "y2", "score", "class")
#: The exported graph's outputs (``d2ops.model.export``'s contract); ``masks`` only for Mask R-CNN.
EXPORTED_OUTPUTS = ("boxes", "classes", "masks", "scores", "image_size")
#: The preprocess file copied into the repository (runs in clearml-serving's container: no d2ops there).
PREPROCESS_TEMPLATE = Path(__file__).resolve().with_name("triton_preprocess.py")
#: The line of the template that :func:`write_triton_repository` replaces with the model's settings.
SETTINGS_MARKER = "MODEL_SETTINGS: dict[str, Any] = {}  # filled in by d2ops.serving.triton"
AUX_CONFIG = "clearml_aux_config.pbtxt"
PREPROCESS = "preprocess.py"
COMMANDS = "clearml-serving.txt"
_PREFIX = "d2ops_triton/"  # names of the tensors the wrapper adds, apart from the graph's own


class TritonExportError(ValueError):
    """The bundle cannot be made into a Triton model (no ONNX graph, or not the exporter's contract)."""


@dataclass(frozen=True)
class TritonRepository:
    """What :func:`write_triton_repository` wrote, and how to serve it."""

    root: Path
    model_name: str
    config: Path
    model: Path
    aux_config: Path
    preprocess: Path
    output_columns: int
    commands: tuple[list[str], list[str]]


# ------------------------------------------------------------------------------------------ the graph


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every use of ``old`` (in this graph and its subgraphs: If/Loop bodies see outer names) reads ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_input(attr.g, old, new)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_input(sub, old, new)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def wrap_for_triton(model: onnx.ModelProto, mask_size: int | None) -> tuple[onnx.ModelProto, int]:
    """The exported graph with a batch dimension and one packed output (see the module docstring).

    ``mask_size``: ``M`` of the ``masks`` output (``None`` for a box-only model). Returns the new model and
    ``C``, the width of a row of :data:`OUTPUT_NAME`.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:  # Squeeze/Unsqueeze take their axes as an input from opset 13
        raise TritonExportError(f"the ONNX graph uses opset {opset}; export it with opset 13 or later (d2ops uses 17)")
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise TritonExportError(f"the ONNX graph's inputs are {[i.name for i in inputs]}, not [{INPUT_NAME!r}]")
    outputs = {o.name: o for o in graph.output}
    needed = [n for n in EXPORTED_OUTPUTS if n != "masks" or mask_size is not None]
    missing = [n for n in needed if n not in outputs]
    if missing:
        raise TritonExportError(
            f"the ONNX graph has outputs {list(outputs)}, missing {missing}: re-export the bundle with "
            "d2ops export onnx (its outputs are named boxes, classes, [masks,] scores, image_size)"
        )
    if mask_size is None and "masks" in outputs:
        raise TritonExportError("the ONNX graph has a 'masks' output but the model's config is not a Mask R-CNN")
    chw = f"{_PREFIX}image_chw"
    _rename_input(graph, INPUT_NAME, chw)
    image_dims = _dims(inputs[0])
    graph.input.remove(inputs[0])
    graph.input.insert(
        0,
        helper.make_tensor_value_info(
            INPUT_NAME, TensorProto.FLOAT, ["batch", *(d if d != "" else None for d in image_dims)]
        ),
    )
    axes0, axes1 = f"{_PREFIX}axes0", f"{_PREFIX}axes1"
    graph.initializer.extend(
        [helper.make_tensor(axes0, TensorProto.INT64, [1], [0]), helper.make_tensor(axes1, TensorProto.INT64, [1], [1])]
    )
    graph.node.insert(0, helper.make_node("Squeeze", [INPUT_NAME, axes0], [chw], name=f"{_PREFIX}squeeze"))
    p = _PREFIX
    columns = [
        "boxes",
        f"{p}scores_col",
        f"{p}classes_col",
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["scores", axes1], [f"{p}scores_col"], name=f"{p}scores_col"),
        helper.make_node("Cast", ["classes"], [f"{p}classes_f"], to=TensorProto.FLOAT, name=f"{p}classes_f"),
        helper.make_node("Unsqueeze", [f"{p}classes_f", axes1], [f"{p}classes_col"], name=f"{p}classes_col"),
    ]
    width = len(DETECTION_COLUMNS)
    if mask_size is not None:
        nodes.append(helper.make_node("Flatten", ["masks"], [f"{p}masks_flat"], axis=1, name=f"{p}masks_flat"))
        columns.append(f"{p}masks_flat")
        width += mask_size * mask_size
    nodes += [
        helper.make_node("Concat", columns, [f"{p}rows"], axis=1, name=f"{p}rows"),
        helper.make_node("Unsqueeze", [f"{p}rows", axes0], [OUTPUT_NAME], name=f"{p}batch"),
    ]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", "N", width]))
    onnx.checker.check_model(model)
    return model, width


def _probe(model: onnx.ModelProto, width: int) -> None:
    """Run the wrapped graph once on a blank image: it must load and give ``[1, N, width]``."""
    import onnxruntime as ort  # lazy: only writing a repository runs a graph

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((1, 3, 64, 64), np.float32)})
    if out.ndim != 3 or out.shape[0] != 1 or out.shape[2] != width:
        raise TritonExportError(f"the wrapped graph gives {list(out.shape)}, expected [1, N, {width}]")


# ----------------------------------------------------------------------------------- configuration


def _d2_settings(config_yaml: Path) -> dict[str, Any]:
    """What the preprocess needs from detectron2's config.yaml (plain YAML: detectron2 dumps every key)."""
    cfg = yaml.safe_load(config_yaml.read_text()) or {}
    inp, model = cfg.get("INPUT", {}), cfg.get("MODEL", {})
    min_size = inp.get("MIN_SIZE_TEST", 800)
    if isinstance(min_size, list | tuple):  # detectron2 takes an int; tolerate a one-element list
        min_size = min_size[0]
    mask_on = bool(model.get("MASK_ON", False))
    # MaskRCNNConvUpsampleHead upsamples the pooled features 2x (detectron2 roi_heads/mask_head.py)
    mask_size = 2 * int(model.get("ROI_MASK_HEAD", {}).get("POOLER_RESOLUTION", 14)) if mask_on else None
    return {
        "input_format": str(inp.get("FORMAT", "BGR")),
        "min_size_test": int(min_size),
        "max_size_test": int(inp.get("MAX_SIZE_TEST", 1333)),
        "mask_size": mask_size,
    }


def _pbtxt_string(value: str) -> str:
    return json.dumps(value)  # protobuf text format accepts C-style escapes; JSON's are a subset


def triton_config(
    model_name: str | None,
    output_columns: int,
    *,
    instances: int,
    device: Literal["cpu", "gpu"] = "cpu",
    threads: int | None = None,
    with_io: bool = True,
) -> str:
    """Triton's ``config.pbtxt`` text (``ModelConfig`` of triton-inference-server/common ``model_config.proto``).

    ``with_io=False`` leaves out ``name``, ``input`` and ``output``: clearml-serving's ``--aux-config``, to
    which it appends the inputs and outputs it builds from ``--input-*``/``--output-*`` and which must not
    name the model (Triton: a configured name must equal the model's directory, which clearml-serving picks).
    One field per line, ``:`` before every list: clearml-serving reads the aux file as HOCON
    (``create_config_pbtxt`` looks for its ``platform`` with ``ConfigFactory.parse_string``); text it cannot
    parse there (``{ count: 2 kind: KIND_CPU }`` on one line) makes it add a second ``platform``, which Triton
    refuses. ``threads``: ONNX Runtime's ``intra_op_thread_count`` per instance (onnxruntime_backend README,
    "Model Config Options"), so that ``instances`` CPU instances do not each take every core.
    """
    lines = []
    if with_io and model_name:
        lines.append(f"name: {_pbtxt_string(model_name)}")
    lines += ['platform: "onnxruntime_onnx"', "max_batch_size: 1"]
    if with_io:
        for field, name, dims in (("input", INPUT_NAME, "3, -1, -1"), ("output", OUTPUT_NAME, f"-1, {output_columns}")):
            lines += [
                f"{field}: [",
                "  {",
                f"    name: {_pbtxt_string(name)}",
                "    data_type: TYPE_FP32",
                f"    dims: [ {dims} ]",
                "  }",
                "]",
            ]
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    lines += ["dynamic_batching {", "}", "instance_group: [", "  {", f"    count: {instances}", f"    kind: {kind}"]
    lines += ["  }", "]"]
    if threads:
        lines += [
            "parameters {",
            '  key: "intra_op_thread_count"',
            f'  value: {{ string_value: "{threads}" }}',
            "}",
        ]
    return "\n".join(lines) + "\n"


def default_instances(device: str, cores: int | None = None) -> tuple[int, int | None]:
    """``(instances, threads per instance)`` for this machine: on CPU one instance per 4 cores, each with
    its share of them (ONNX Runtime's own threads do the rest); on a GPU one instance."""
    if device == "gpu":
        return 1, None
    cores = cores or os.cpu_count() or 1
    instances = max(1, cores // 4)
    return instances, max(1, cores // instances)


def clearml_serving_commands(
    root: Path,
    model_name: str,
    output_columns: int,
    *,
    endpoint: str | None = None,
    project: str = "d2ops",
    service_id: str = "<SERVING_SERVICE_ID>",
    model_id: str = "<MODEL_ID>",
) -> tuple[list[str], list[str]]:
    """The ``clearml-serving`` commands (argv lists) that register the model folder and serve it.

    The Triton model name clearml-serving uses is the endpoint (``TritonPreprocessRequest.process`` sends
    ``model_name=<endpoint>``), so the endpoint defaults to ``model_name``. ``model_id`` is what the upload prints.
    """
    endpoint = endpoint or model_name
    upload = [
        "clearml-serving", "--yes", "--id", service_id, "model", "upload",
        "--name", model_name, "--project", project, "--framework", "onnx",
        "--path", str(root / model_name / "1"),
    ]  # fmt: skip
    add = [
        "clearml-serving", "--yes", "--id", service_id, "model", "add",
        "--engine", "triton", "--endpoint", endpoint, "--model-id", model_id,
        "--preprocess", str(root / PREPROCESS),
        "--input-name", INPUT_NAME, "--input-type", "float32", "--input-size", "[3, -1, -1]",
        "--output-name", OUTPUT_NAME, "--output-type", "float32", "--output-size", f"[-1, {output_columns}]",
        "--aux-config", str(root / AUX_CONFIG),
    ]  # fmt: skip
    return upload, add


# ------------------------------------------------------------------------------------------ the writer


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def preprocess_source(settings: dict[str, Any]) -> str:
    """The preprocess file's text with ``settings`` in place of the template's empty ``MODEL_SETTINGS``."""
    template = PREPROCESS_TEMPLATE.read_text()
    if template.count(SETTINGS_MARKER) != 1:
        raise RuntimeError(f"{PREPROCESS_TEMPLATE} must hold the line {SETTINGS_MARKER!r} exactly once")
    literal = json.dumps(json.dumps(settings, sort_keys=True))
    line = f"MODEL_SETTINGS: dict[str, Any] = json.loads({literal})  # written by d2ops.serving.triton"
    return template.replace(SETTINGS_MARKER, line)


def write_triton_repository(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    model_name: str,
    instances: int | None = None,
    device: Literal["cpu", "gpu"] = "cpu",
    endpoint: str | None = None,
    project: str = "d2ops",
    force: bool = False,
) -> TritonRepository:
    """Write the Triton model repository of an exported bundle as ``out_dir`` (see the module docstring).

    ``out_dir`` is a new or empty folder, or (with ``force``) exactly an earlier repository d2ops wrote for
    the same model (:mod:`d2ops.utils.folders`); it is built beside itself and renamed into place.

    ``model_name`` is the Triton model (its directory); for clearml-serving it is the endpoint, and for a
    versioned endpoint ``<endpoint>_<version>``. ``instances``: Triton instances of the model; by default
    from this machine's cores (:func:`default_instances`), so write it on (or for) the serving machine.
    """
    bundle_dir, root = Path(bundle_dir), Path(out_dir)
    if not model_name or "/" in model_name or model_name in (".", ".."):
        raise TritonExportError(f"model name {model_name!r}: use one path segment (for a versioned endpoint e/v: e_v)")
    onnx_path = bundle_dir / "model.onnx"
    if not onnx_path.is_file():
        raise TritonExportError(f"{bundle_dir} has no model.onnx: export it first (d2ops export onnx)")
    settings = _d2_settings(bundle_dir / "config.yaml")
    labels = json.loads((bundle_dir / "labels.json").read_text())
    wrapped, width = wrap_for_triton(onnx.load(str(onnx_path)), settings["mask_size"])
    _probe(wrapped, width)
    if instances is None:
        instances, threads = default_instances(device)
    else:
        if instances < 1:
            raise TritonExportError(f"instances must be at least 1, got {instances}")
        threads = max(1, (os.cpu_count() or 1) // instances) if device == "cpu" else None

    model_settings = {
        **settings,
        "labels": labels,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "output_columns": width,
        "triton_model": model_name,
    }
    root = root.absolute()
    commands = clearml_serving_commands(root, model_name, width, endpoint=endpoint, project=project)
    try:
        with written_folder(root, kind="Triton repository", model=ModelBundle(bundle_dir).version(),
                            sources=[bundle_dir], force=force) as staging:  # fmt: skip
            (staging / model_name / "1").mkdir(parents=True)
            with atomic_write(staging / model_name / "1" / "model.onnx", "wb") as handle:
                handle.write(wrapped.SerializeToString())
            sizing: dict[str, Any] = {"instances": instances, "device": device, "threads": threads}
            _write_text(staging / model_name / "config.pbtxt", triton_config(model_name, width, **sizing))
            _write_text(staging / AUX_CONFIG, triton_config(None, width, **sizing, with_io=False))
            _write_text(staging / PREPROCESS, preprocess_source(model_settings))
            _write_text(staging / COMMANDS, "\n".join(shlex.join(c) for c in commands) + "\n")
    except OutputFolderError as err:
        raise TritonExportError(str(err)) from None
    model_dir = root / model_name
    config, aux, preprocess = model_dir / "config.pbtxt", root / AUX_CONFIG, root / PREPROCESS
    return TritonRepository(root, model_name, config, model_dir / "1" / "model.onnx", aux, preprocess, width, commands)


def describe(repo: TritonRepository) -> str:
    """A few lines for a command to print: where the repository is and the clearml-serving commands."""
    return "\n".join(
        [f"Triton model repository: {repo.root} (model {repo.model_name})", *(shlex.join(c) for c in repo.commands)]
    )
