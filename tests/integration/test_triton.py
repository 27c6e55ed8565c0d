"""The Triton model repository (d2ops.serving.triton) and its clearml-serving preprocess file.

What runs here: Triton's own configuration schema (``tritonclient``'s ``model_config_pb2``, the
``ModelConfig`` of triton-inference-server/common ``protobuf/model_config.proto``), clearml-serving 1.3.5's own
CLI parsing, endpoint validation and ``config.pbtxt`` generation, and its ``TritonPreprocessRequest``
(loading the preprocess file, ``preprocess``, ``process``, ``postprocess``) with the Triton-wrapped ONNX graph
run by ONNX Runtime — Triton's ``onnxruntime_onnx`` backend is ONNX Runtime too.

What is replaced, at its outermost boundary: the gRPC call to Triton (``GRPCInferenceServiceStub.ModelInfer``,
which ``TritonPreprocessRequest.process`` awaits) answers from ONNX Runtime after the checks Triton makes on a
request's tensors; ClearML's artifact store (``task.artifacts[...]``) hands over the preprocess file; the
control plane (``safe_ModelRequestProcessor``) records the endpoint ``model add`` builds. What this cannot show:
``tritonserver`` loading the repository (its backend's own checks, beyond the documented rules tested here),
Triton's output order and GPU execution, clearml-serving's download of the model folder.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image, ImageDraw

from d2ops.data.synthetic import generate_shapes_dataset
from d2ops.model.detector import Detector, load_d2_config, mask_polygon
from d2ops.serving.formats import decode_frame
from d2ops.serving.replies import to_cvat
from d2ops.serving.triton import (
    INPUT_NAME,
    OUTPUT_NAME,
    TritonExportError,
    TritonRepository,
    write_triton_repository,
)
from d2ops.testing import build_tiny_bundle

pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]' (the dev extra)")
import clearml_serving.__main__ as cs_cli
from clearml_serving.engines.triton.triton_helper import TritonHelper
from clearml_serving.serving.endpoints import ModelEndpoint
from clearml_serving.serving.model_request_processor import ModelRequestProcessor
from clearml_serving.serving.preprocess_service import TritonPreprocessRequest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc.aio import service_pb2

pytestmark = pytest.mark.slow

THRESHOLD = 0.05  # the tiny bundle's random weights score low; 0.05 still drops most of its detections
BOX_ATOL = 0.05  # pixels: ONNX Runtime's and PyTorch's float32 arithmetic on the same graph
SCORE_ATOL = 1e-3  # the reply carries 4 decimals
MASK_IOU = 0.97  # masks pasted from ONNX Runtime's probabilities (float32 rounding at 0.5) vs PyTorch's
# the numpy outline traces the same border pixels as OpenCV's findContours (tested exactly); Douglas-Peucker may
# keep other vertices, so each polygon is held to OpenCV's fit of the mask, within this margin of IoU
POLYGON_MARGIN = 0.1

_NP_TO_TRITON = {np.dtype(np.float32): ("FP32", model_config_pb2.TYPE_FP32)}
_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
}


# ------------------------------------------------------------------------------------------ fixtures


def export_onnx(bundle: Path, image: np.ndarray) -> Path:
    """``bundle/model.onnx`` by d2ops's export contract (the recipe of ``d2ops.model.export``).

    Swap for ``d2ops.model.export.export_bundle(bundle, "onnx", out, images=[("img", image)])`` (and use
    ``out``) once that is stable; this builds the graph from detectron2 alone, so it follows no d2ops API.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import transforms as T
    from detectron2.export import TracingAdapter
    from detectron2.modeling import build_model

    cfg = load_d2_config(bundle / "config.yaml")
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(bundle / "model_final.pth"))
    model.eval()
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    x = torch.as_tensor(aug.get_transform(image).apply_image(image).astype("float32").transpose(2, 0, 1))

    def inference(m: Any, inputs: Any) -> list[dict[str, Any]]:
        return [{"instances": m.inference(inputs, do_postprocess=False)[0]}]

    adapter = TracingAdapter(model, [{"image": x}], inference)
    with torch.no_grad():
        adapter(*adapter.flattened_inputs)
    names = {"pred_boxes": "boxes", "pred_classes": "classes", "pred_masks": "masks", "scores": "scores"}
    outputs = [*(names[f] for f in adapter.outputs_schema.schemas[0].schemas[0].keys), "image_size"]
    dynamic = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in outputs[:-1]}}
    with torch.no_grad():
        torch.onnx.export(
            adapter, adapter.flattened_inputs, str(bundle / "model.onnx"), dynamo=False, opset_version=17,
            input_names=["image"], output_names=outputs, dynamic_axes=dynamic,
        )  # fmt: skip
    return bundle / "model.onnx"


@dataclass
class Served:
    bundle: Path  # the bundle (weights): the PyTorch reference
    exported: Path  # the bundle plus model.onnx
    repo: TritonRepository
    images: list[bytes]
    masks: bool


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """JPEG files of d2ops's synthetic shapes (sizes that resize up and down), plus a non-square crop."""
    root = generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), counts={"test": 2}, image_size=160)
    files = [p.read_bytes() for p in sorted((root / "test").glob("*.jpg"))]
    wide = Image.open(io.BytesIO(files[0])).convert("RGB").resize((300, 170))
    buf = io.BytesIO()
    wide.save(buf, "JPEG", quality=92)
    return [*files, buf.getvalue()]


@pytest.fixture(scope="module", params=[False, True], ids=["faster-rcnn", "mask-rcnn"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, images: list[bytes]) -> Served:
    work = tmp_path_factory.mktemp("mask" if request.param else "box")
    bundle = build_tiny_bundle(work, masks=request.param)
    exported = work / "exported"  # the graph goes in a copy: the reference Detector stays eager PyTorch
    shutil.copytree(bundle, exported)
    export_onnx(exported, decode_frame(images[0]).pixels)
    repo = write_triton_repository(exported, work / "repository", model_name="shapes", instances=2)
    return Served(bundle, exported, repo, images, request.param)


# ------------------------------------------------------------------ Triton's configuration rules


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def triton_problems(config: model_config_pb2.ModelConfig, model_dir: Path, model: onnx.ModelProto) -> list[str]:
    """Triton's documented rules for this configuration (server docs/user_guide/model_configuration.md)."""
    problems = []
    if config.platform != "onnxruntime_onnx" and config.backend != "onnxruntime":
        problems.append(f"platform {config.platform!r}: an ONNX model needs onnxruntime_onnx")
    # "Model Files": the default file name of the onnxruntime_onnx platform is model.onnx, in version folder 1
    filename = config.default_model_filename or "model.onnx"
    if not (model_dir / "1" / filename).is_file():
        problems.append(f"no {model_dir.name}/1/{filename}")
    if config.name and config.name != model_dir.name:
        problems.append(f"name {config.name!r} is not the model directory {model_dir.name!r}")
    # "Maximum Batch Size": >= 1 means dims leave out the batch, which the model's tensors lead with;
    # dynamic batching needs a model that batches (max_batch_size > 0)
    if config.HasField("dynamic_batching") and config.max_batch_size < 1:
        problems.append("dynamic_batching with max_batch_size 0")
    batch = 1 if config.max_batch_size > 0 else 0
    graph_io = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for tensor in [*config.input, *config.output]:
        value = graph_io.get(tensor.name)
        if value is None:
            problems.append(f"{tensor.name!r} is not an input or output of the ONNX graph")
            continue
        tt = value.type.tensor_type
        if _ONNX_TO_TRITON.get(tt.elem_type) != tensor.data_type:
            problems.append(f"{tensor.name!r}: data_type {tensor.data_type} is not the graph's {tt.elem_type}")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if len(dims) != len(tensor.dims) + batch:
            problems.append(f"{tensor.name!r}: rank {len(dims)} in the graph, {len(tensor.dims)}+{batch} configured")
            continue
        if batch and dims[0] != -1:  # onnxruntime backend: a batching model's first dimension must be variable
            problems.append(f"{tensor.name!r}: the graph's batch dimension is {dims[0]}, not variable")
        for got, want in zip(dims[batch:], tensor.dims, strict=True):
            if want != -1 and got not in (-1, want):
                problems.append(f"{tensor.name!r}: dims {list(tensor.dims)} do not fit the graph's {dims}")
    for group in config.instance_group:
        if group.count < 1:
            problems.append(f"instance_group count {group.count}")
    return problems


def test_config_pbtxt_follows_tritons_schema_and_rules(served: Served) -> None:
    config = _config(served.repo.config)  # text_format.Parse rejects any field ModelConfig does not have
    model = onnx.load(str(served.repo.model))
    onnx.checker.check_model(model, full_check=True)
    assert triton_problems(config, served.repo.config.parent, model) == []
    assert config.max_batch_size == 1 and config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == [INPUT_NAME] and list(config.input[0].dims) == [3, -1, -1]
    width = 6 + (28 * 28 if served.masks else 0)
    assert [o.name for o in config.output] == [OUTPUT_NAME] and list(config.output[0].dims) == [-1, width]
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]


def test_a_wrong_graph_is_refused(served: Served, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(served.exported, bundle)
    model = onnx.load(str(bundle / "model.onnx"))
    model.graph.output[0].name = "renamed"
    onnx.save(model, str(bundle / "model.onnx"))
    with pytest.raises(TritonExportError, match="missing"):
        write_triton_repository(bundle, tmp_path / "repo", model_name="x")
    (bundle / "model.onnx").unlink()
    with pytest.raises(TritonExportError, match=r"no model\.onnx"):
        write_triton_repository(bundle, tmp_path / "repo", model_name="x")


# ------------------------------------------------------------------------ clearml-serving's side


@pytest.fixture
def endpoint(served: Served, monkeypatch: pytest.MonkeyPatch) -> ModelEndpoint:
    """The endpoint clearml-serving's own ``model add`` builds from the printed command line."""
    recorded: list[ModelEndpoint] = []

    class ControlPlane:  # stands in for the serving service task (the ClearML server behind it)
        def __init__(self, task_id: str | None = None) -> None: ...

        def get_id(self) -> str:
            return "service"

        def deserialize(self, **_: Any) -> None: ...

        def serialize(self) -> None: ...

        def add_endpoint(self, endpoint: ModelEndpoint, **kwargs: Any) -> str:
            ModelRequestProcessor._validate_model(endpoint)  # clearml-serving's own check of a Triton endpoint
            assert Path(kwargs["preprocess_code"]) == served.repo.preprocess
            recorded.append(endpoint)
            return endpoint.serving_url

    monkeypatch.setattr(cs_cli, "safe_ModelRequestProcessor", ControlPlane)
    monkeypatch.setattr(sys, "argv", served.repo.commands[1])
    cs_cli.cli()
    assert len(recorded) == 1
    return recorded[0]


def test_command_line_is_what_clearml_serving_takes(served: Served, endpoint: ModelEndpoint) -> None:
    assert endpoint.engine_type == "triton" and endpoint.serving_url == served.repo.model_name
    printed = (served.repo.root / "clearml-serving.txt").read_text().splitlines()
    assert [shlex.split(line) for line in printed] == [list(c) for c in served.repo.commands]
    upload = served.repo.commands[0]
    assert upload[upload.index("--framework") + 1] == "onnx"  # a folder of framework ONNX lands in version 1
    assert sorted(p.name for p in Path(upload[upload.index("--path") + 1]).iterdir()) == ["model.onnx"]


def test_clearml_serving_writes_the_same_config(served: Served, endpoint: ModelEndpoint, tmp_path: Path) -> None:
    """``TritonHelper.create_config_pbtxt`` (clearml-serving's Triton container) from the endpoint ``model add``
    stored: aux config + generated inputs/outputs, with the framework ``model upload --framework onnx`` sets."""
    from clearml.utilities.pyhocon import ConfigFactory

    # create_config_pbtxt keeps the aux file's platform only if it parses as HOCON (else it adds a second one)
    assert ConfigFactory.parse_string(served.repo.aux_config.read_text()).get("platform") == "onnxruntime_onnx"
    target = tmp_path / "config.pbtxt"
    TritonHelper.create_config_pbtxt(endpoint, target_pbtxt_file=str(target), platform="ONNX")
    generated = _config(target)
    ours = _config(served.repo.config)
    ours.ClearField("name")  # clearml-serving names the directory after the endpoint and writes no name
    assert generated == ours
    model_dir = tmp_path / endpoint.serving_url.replace("/", "_")
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(served.repo.model, model_dir / "1" / "model.onnx")
    assert triton_problems(generated, model_dir, onnx.load(str(served.repo.model))) == []


# ------------------------------------------------------------------------- the request, end to end


class OnnxRuntimeTriton:
    """``GRPCInferenceServiceStub`` answering ``ModelInfer`` with ONNX Runtime on the repository's model,
    after the checks Triton makes on a request's inputs against config.pbtxt (name, datatype, shape)."""

    def __init__(self, repo: TritonRepository) -> None:
        self.config = _config(repo.config)
        self.session = ort.InferenceSession(str(repo.model), providers=["CPUExecutionProvider"])
        self.requests: list[Any] = []

    async def ModelInfer(self, request: Any, compression: Any = None, timeout: Any = None) -> Any:
        self.requests.append(request)
        assert request.model_name == "shapes" and request.model_version == "1"
        (tensor,) = request.inputs
        (spec,) = self.config.input
        assert tensor.name == spec.name and tensor.datatype == "FP32"
        shape = list(tensor.shape)
        assert len(shape) == len(spec.dims) + 1 and 1 <= shape[0] <= self.config.max_batch_size
        assert all(d in (-1, s) for d, s in zip(spec.dims, shape[1:], strict=True))
        data = np.asarray(tensor.contents.fp32_contents, dtype=np.float32).reshape(shape)
        names = [o.name for o in request.outputs]
        response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1")
        for name, value in zip(names, self.session.run(names, {tensor.name: data}), strict=True):
            out = response.outputs.add(name=name, datatype=_NP_TO_TRITON[value.dtype][0])
            out.shape.extend(value.shape)
            response.raw_output_contents.append(value.tobytes())
        return response


class Artifact:
    """ClearML's artifact of the uploaded preprocess file, as ``_instantiate_custom_preprocess_cls`` reads it."""

    def __init__(self, path: Path) -> None:
        from clearml.binding.artifacts import Artifacts
        from clearml.storage.util import sha256sum

        self.path = path
        self.hash = sha256sum(str(path), block_size=Artifacts._hash_block_size)[0]

    def get_local_copy(self, extract_archive: bool = True, force_download: bool = False) -> str:
        return str(self.path)


@pytest.fixture
def processor(served: Served, endpoint: ModelEndpoint) -> Iterator[tuple[TritonPreprocessRequest, OnnxRuntimeTriton]]:
    endpoint.preprocess_artifact = "py_code_shapes"
    task = type("Task", (), {"id": "service", "artifacts": {"py_code_shapes": Artifact(served.repo.preprocess)}})()
    request = TritonPreprocessRequest(model_endpoint=endpoint, task=task)
    triton = OnnxRuntimeTriton(served.repo)
    yield request, triton


def _serve(processor: tuple[TritonPreprocessRequest, OnnxRuntimeTriton], body: Any) -> tuple[dict[str, Any], list]:
    """One request through clearml-serving's Triton path: preprocess, process (gRPC -> ONNX Runtime), postprocess."""
    request, triton = processor
    stats: list[dict[str, Any]] = []

    async def run() -> dict[str, Any]:
        request._grpc_stub[threading.get_ident()] = triton  # the stub process() would create for this thread
        state: dict[str, Any] = {}
        data = request.preprocess(body, state, stats.append)
        out = await request.process(data, state, stats.append)
        return request.postprocess(out, state, stats.append)

    return asyncio.run(run()), stats


def _poly_mask(points: list[float], size: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("1", size)
    ImageDraw.Draw(canvas).polygon([(points[i], points[i + 1]) for i in range(0, len(points), 2)], fill=1)
    return np.asarray(canvas)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _is_box_outline(p: list[float]) -> bool:
    """The outline a mask too small to trace gets: its box's corners (``replies._box_polygon``)."""
    return len(p) == 8 and p[1] == p[3] and p[2] == p[4] and p[5] == p[7] and p[0] == p[6]


def _shape_mask(shape: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """A CVAT mask shape painted into the frame (``mask`` = crop values, then the inclusive box)."""
    xtl, ytl, xbr, ybr = shape["mask"][-4:]
    crop = np.asarray(shape["mask"][:-4], dtype=np.uint8).reshape(ybr - ytl + 1, xbr - xtl + 1) > 0
    full = np.zeros(size[::-1], bool)
    full[ytl : ybr + 1, xtl : xbr + 1] = crop
    return full


def test_replies_match_the_pytorch_predictor(served: Served, processor: Any) -> None:
    detector = Detector.from_bundle(served.bundle, device="cpu")
    compared = 0
    for data in served.images:
        body = {"image": base64.b64encode(data).decode(), "threshold": THRESHOLD}
        reply, stats = _serve(processor, body)
        frame = decode_frame(data)
        expected = to_cvat(detector.predict([frame], score_threshold=THRESHOLD)[0])
        got = reply["detections"]
        assert stats == [{"detection_count": len(got), "image_count": 1}]
        assert len(got) == len(expected) > 0
        size = (frame.width, frame.height)
        for g, e in zip(
            sorted(got, key=lambda s: -float(s["confidence"])),
            sorted(expected, key=lambda s: -float(s["confidence"])),
            strict=True,
        ):
            assert g["label"] == e["label"] and g["type"] == e["type"] == ("mask" if served.masks else "rectangle")
            assert abs(float(g["confidence"]) - float(e["confidence"])) <= SCORE_ATOL
            if not served.masks:
                np.testing.assert_allclose(g["points"], e["points"], atol=BOX_ATOL)
                continue
            assert abs(np.asarray(g["mask"][-4:]) - np.asarray(e["mask"][-4:])).max() <= 1
            assert _iou(_shape_mask(g, size), _shape_mask(e, size)) >= MASK_IOU
            if not (_is_box_outline(e["points"]) or _is_box_outline(g["points"])):
                mask = _shape_mask(g, size)
                fit = _iou(_poly_mask(g["points"], size), mask)
                assert fit >= _iou(_poly_mask(e["points"], size), _shape_mask(e, size)) - POLYGON_MARGIN
        compared += len(got)
    assert compared > 0
    request = processor[1].requests[0]
    assert [o.name for o in request.outputs] == [OUTPUT_NAME]


def test_raw_image_and_one_image_list(served: Served, processor: Any) -> None:
    raw, _ = _serve(processor, served.images[0])  # clearml-serving hands non-JSON bodies over as bytes
    listed, _ = _serve(processor, {"images": [base64.b64encode(served.images[0]).decode()], "threshold": 0.5})
    assert isinstance(raw["detections"], list) and listed["detections"] == [raw["detections"]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"this is not an image", "not an image Pillow can identify"),
        ({"image": "%%%"}, "not valid base64"),
        ({"picture": "x"}, "exactly one of 'image' or 'images'"),
        ({"images": ["a", "b"]}, "one image per request"),
        ({"image": base64.b64encode(b"GIF89a").decode(), "threshold": 2}, "between 0 and 1"),
        (b"{not json", "not valid JSON"),
    ],
)
def test_bad_input_is_a_clear_value_error(served: Served, processor: Any, body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):  # clearml-serving answers ValueError with 422
        _serve(processor, body)
    assert processor[1].requests == []  # refused before Triton


# ------------------------------------------------------------------- the file, away from d2ops


ALLOWED_IMPORTS = {
    "__future__", "base64", "binascii", "collections", "email", "io", "json", "math", "os", "warnings", "typing",
    "numpy", "PIL",
}  # fmt: skip


def test_preprocess_imports_only_numpy_pillow_and_the_standard_library(served: Served) -> None:
    tree = ast.parse(served.repo.preprocess.read_text())
    modules = {
        (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert modules <= ALLOWED_IMPORTS, modules - ALLOWED_IMPORTS


_STANDALONE = r"""
import importlib.abc, json, sys, numpy as np
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"d2ops", "torch", "detectron2", "cv2", "clearml", "clearml_serving"}:
            raise ImportError("not in clearml-serving's container: " + name)
sys.meta_path.insert(0, Block())
import importlib.util
spec = importlib.util.spec_from_file_location("Preprocess", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
p = module.Preprocess()
state = {}
x = p.preprocess(open(sys.argv[2], "rb").read(), state, None)
cols = module.MODEL_SETTINGS["output_columns"]
rows = np.zeros((1, 2, cols), np.float32)
rows[0, :, :6] = [[2, 3, 40, 50, 0.9, 0], [5, 5, 5, 9, 0.8, 0]]  # the second box is empty: dropped
rows[0, 0, 6:] = 1.0
print(json.dumps({"shape": list(x.shape), "dtype": str(x.dtype), "reply": p.postprocess(rows, state, None)}))
"""


def test_preprocess_runs_without_d2ops_torch_or_opencv(served: Served, tmp_path: Path) -> None:
    copy = tmp_path / "preprocess.py"
    shutil.copy(served.repo.preprocess, copy)
    image = tmp_path / "img.jpg"
    image.write_bytes(served.images[0])
    result = subprocess.run(
        [sys.executable, "-I", "-c", _STANDALONE, str(copy), str(image)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dtype"] == "float32" and out["shape"][:2] == [1, 3]
    (shape,) = out["reply"]["detections"]
    assert shape["type"] == ("mask" if served.masks else "rectangle") and shape["confidence"] == "0.9000"


# ---------------------------------------------------------------- detectron2's steps, in numpy


@pytest.fixture(scope="module")
def preprocess_module(served: Served) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("d2ops_triton_preprocess_copy", served.repo.preprocess)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exif_rotated_jpeg() -> bytes:
    image = Image.fromarray((np.random.RandomState(1).rand(90, 200, 3) * 255).astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: the upright frame is 90 wide, 200 high
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(2).rand(70, 50) * 65535).astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def test_decode_and_resize_are_d2ops_and_detectron2s(served: Served, preprocess_module: Any) -> None:
    from detectron2.data import transforms as T

    cfg = load_d2_config(served.bundle / "config.yaml")
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    pre = preprocess_module.Preprocess()
    for data in [*served.images, _exif_rotated_jpeg(), _png16()]:
        frame = decode_frame(data)
        state: dict[str, Any] = {}
        tensor = pre.preprocess(data, state)
        bgr = frame.pixels
        expected = aug.get_transform(bgr).apply_image(bgr).astype("float32").transpose(2, 0, 1)[None]
        np.testing.assert_array_equal(tensor, expected)  # exact: same decode, same PIL bilinear resize
        assert state["frame"] == (frame.height, frame.width)


def test_mask_pasting_and_outline_match_detectron2_and_opencv(preprocess_module: Any) -> None:
    from detectron2.layers.mask_ops import paste_masks_in_image

    rng = np.random.RandomState(3)
    height, width = 120, 160
    for _ in range(20):
        smooth = np.asarray(Image.fromarray((rng.rand(6, 6) * 255).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
        probs = (smooth / 255.0).astype(np.float32)
        x0, y0 = rng.uniform(-5, 100), rng.uniform(-5, 70)
        box = np.asarray([x0, y0, x0 + rng.uniform(3, 80), y0 + rng.uniform(3, 60)], np.float32)
        box = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        full = paste_masks_in_image(torch.from_numpy(probs)[None], torch.from_numpy(box)[None], (height, width))[0]
        full = full.numpy()
        xtl, ytl, xbr, ybr = preprocess_module.inclusive_box(box.tolist(), height, width)
        crop = preprocess_module.paste_mask(probs, box, np.arange(ytl, ybr + 1), np.arange(xtl, xbr + 1))
        ours = np.zeros_like(full)
        ours[ytl : ybr + 1, xtl : xbr + 1] = crop
        assert (ours != full).sum() <= 2  # only values within float32 rounding of 0.5 may differ
        if crop.sum() >= 10:
            region = preprocess_module._largest_region(crop)
            border = {tuple(p) for p in preprocess_module._outer_contour(region)}
            contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            assert border == {tuple(p) for p in max(contours, key=cv2.contourArea).reshape(-1, 2)}
            poly = preprocess_module.mask_polygon(crop, (xtl, ytl))
            assert {(x - xtl, y - ytl) for x, y in zip(poly[0::2], poly[1::2], strict=True)} <= border
            cv = mask_polygon(crop, (xtl, ytl))
            fit = _iou(_poly_mask(poly, (width, height)), ours)
            assert fit >= _iou(_poly_mask(cv, (width, height)), ours) - POLYGON_MARGIN
