"""The runtimes a :class:`~d2ops.model.detector.Detector` runs its model on: eager PyTorch, or a graph exported by
:mod:`d2ops.model.export` (TorchScript, ONNX Runtime, OpenVINO).

Every runtime answers one question, :meth:`Runtime.infer`: given images already resized for the model (the
test-time ``ResizeShortestEdge``, done outside the graph by the detector), return detectron2 ``Instances`` at
the resized size, before postprocessing (masks are per-box probabilities, not yet pasted). The detector then
runs detectron2's own ``detector_postprocess`` for every runtime alike, so rescaling to the original image and
mask pasting are one piece of code, not one per runtime.

The exported graph (see :mod:`d2ops.model.export`) is detectron2's ``TracingAdapter`` around
``GeneralizedRCNN.inference(..., do_postprocess=False)``:

- input ``image``: float32 ``[3, H, W]``, channels in ``INPUT.FORMAT`` order, 0-255, already resized. Pixel
  normalisation and padding to ``size_divisibility`` are inside the graph; ``H`` and ``W`` are dynamic.
- outputs ``boxes`` ``[N, 4]``, ``classes`` ``[N]`` (int64), ``masks`` ``[N, 1, M, M]`` (Mask R-CNN only),
  ``scores`` ``[N]``, ``image_size`` ``[2]``, in the order ``metadata.json`` records under ``runtimes.<name>.outputs``.

Threads are set from the machine, not from library defaults: :func:`d2ops.utils.device.machine_threads` divides
the CPUs this process may use (its affinity mask, which containers and ``taskset`` narrow) among the replicas.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from d2ops.model.bundle import ModelBundle, ModelNotFoundError

__all__ = [
    "EXPORTED",
    "OUTPUT_FIELDS",
    "PREFERENCE",
    "RUNTIMES",
    "Runtime",
    "RuntimeUnavailableError",
    "available_runtimes",
    "choose_runtime",
    "installed_runtimes",
    "load_runtime",
]

log = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "torchscript", "onnx", "openvino")
#: The runtimes that run an exported graph (``d2ops export <runtime>``).
EXPORTED = ("torchscript", "onnx", "openvino")
#: ``--runtime auto`` for a bundle without measured export speeds (see :func:`available_runtimes`), per device,
#: fastest first on the demo model (bench/bench_runtimes.py; at 800 px OpenVINO overtakes ONNX Runtime, which is
#: why exports measure). On CUDA only eager PyTorch is chosen: the exported graphs are traced on the CPU and this
#: onnxruntime build has no CUDA provider.
PREFERENCE = {"cpu": ("onnx", "openvino", "torchscript", "pytorch"), "cuda": ("pytorch",)}
#: detectron2 ``Instances`` field -> the graph's output name.
OUTPUT_FIELDS = {"pred_boxes": "boxes", "pred_classes": "classes", "pred_masks": "masks", "scores": "scores"}


class RuntimeUnavailableError(ModelNotFoundError):
    """The runtime asked for cannot run this bundle here; the message says which ones can and how to add one."""


def _device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def available_runtimes(bundle: ModelBundle, device: str) -> list[str]:
    """The runtimes that can run ``bundle`` on ``device`` (resolved: ``cpu`` or ``cuda[:N]``), fastest first.

    Fastest by the speedup over PyTorch each export measured beside it (``speed`` in the runtime's entry,
    :func:`d2ops.model.export.measured_speed`; PyTorch counts 1.0) when every exported runtime usable here has
    one; otherwise (bundles exported before speeds were recorded) by :data:`PREFERENCE`. The speeds are the
    export machine's (its CPUs and threads are recorded beside them): serving on very different hardware,
    name the runtime (``--runtime``) if it measures otherwise there. Runtimes this version does not know
    come last.
    """
    exported = bundle.runtimes()
    kind = _device_kind(device)
    usable = {"pytorch"} | {name for name, entry in exported.items() if entry.get("device", "cpu") == kind}
    known = [name for name in PREFERENCE[kind] if name in usable]
    unknown = sorted(usable - set(known))
    speedups = {name: 1.0 if name == "pytorch" else _speedup(exported[name]) for name in known}
    if kind != "cpu" or any(v is None for v in speedups.values()):
        return known + unknown
    return sorted(known, key=lambda name: -(speedups[name] or 0.0)) + unknown  # stable: ties keep preference


def _speedup(entry: dict[str, Any]) -> float | None:
    speed = entry.get("speed")
    value = speed.get("speedup") if isinstance(speed, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


#: The package each exported runtime needs at inference (TorchScript needs only torch).
RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}


def installed_runtimes() -> list[str]:
    """The runtimes whose packages this interpreter can import, in :data:`RUNTIMES` order."""
    return [name for name in RUNTIMES if importlib.util.find_spec(RUNTIME_PACKAGES.get(name, "torch")) is not None]


def choose_runtime(bundle: ModelBundle, device: str, requested: str = "auto") -> str:
    """``requested`` if the bundle has it for ``device``; for ``auto`` the fastest it has."""
    available = available_runtimes(bundle, device)
    if requested == "auto":
        return available[0]
    if requested not in RUNTIMES:
        raise RuntimeUnavailableError(f"unknown runtime {requested!r}; choose one of auto, {', '.join(RUNTIMES)}")
    if requested not in available:
        raise RuntimeUnavailableError(
            f"{bundle.path} has no {requested} model for {_device_kind(device)} (it has: {', '.join(available)}); "
            f"export one with `d2ops export {requested} --model {bundle.path} --out DIR --images IMAGES` "
            "and serve DIR, or pick another --runtime"
        )
    return requested


class Runtime(ABC):
    """One way to run the model: resized images in, unpostprocessed ``Instances`` out (see the module doc)."""

    name: str

    @abstractmethod
    def infer(self, images: Sequence[torch.Tensor]) -> list[Instances]:
        """``Instances`` per image (``[3, H, W]`` float32, resized), at the resized size, masks not pasted."""


class PyTorchRuntime(Runtime):
    """detectron2's eager model: a whole batch per forward pass."""

    name = "pytorch"

    def __init__(self, cfg: CfgNode, weights: str) -> None:
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(weights)

    @torch.inference_mode()
    def infer(self, images: Sequence[torch.Tensor]) -> list[Instances]:
        return list(self.model.inference([{"image": image} for image in images], do_postprocess=False))


def _instances(outputs: Sequence[Any], names: Sequence[str]) -> Instances:
    """The graph's flat outputs (named by ``names``, ``image_size`` last) as detectron2 ``Instances``."""
    by_name = dict(zip(names, (torch.as_tensor(np.asarray(value)) for value in outputs), strict=True))
    height, width = (int(v) for v in by_name.pop("image_size").tolist())
    fields = {field: by_name[output] for field, output in OUTPUT_FIELDS.items() if output in by_name}
    fields["pred_boxes"] = Boxes(fields["pred_boxes"].float())
    return Instances((height, width), **fields)


class _ExportedRuntime(Runtime):
    """A graph from ``d2ops export``: one image per call (each image has its own size)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.outputs = list(entry["outputs"])

    def infer(self, images: Sequence[torch.Tensor]) -> list[Instances]:
        return [_instances(self._run(image.detach().cpu().float().contiguous()), self.outputs) for image in images]

    @abstractmethod
    def _run(self, image: torch.Tensor) -> Sequence[Any]:
        """The graph's outputs for one image, in ``self.outputs`` order."""


class TorchScriptRuntime(_ExportedRuntime):
    name = "torchscript"

    def __init__(self, path: Path, entry: dict[str, Any]) -> None:
        super().__init__(entry)
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.inference_mode()
    def _run(self, image: torch.Tensor) -> Sequence[Any]:
        return list(self.module(image))


class OnnxRuntime(_ExportedRuntime):
    """ONNX Runtime's CPU provider, ``threads`` intra-op threads, sequential execution (no inter-op pool)."""

    name = "onnx"

    def __init__(self, path: Path, entry: dict[str, Any], threads: int) -> None:
        import onnxruntime as ort  # lazy: only bundles exported to ONNX need it

        super().__init__(entry)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # the traced graph's constant-folding notices are not the user's concern
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _run(self, image: torch.Tensor) -> Sequence[Any]:
        return self.session.run(self.outputs, {"image": image.numpy()})  # thread-safe (ORT's InferenceSession.Run)


class OpenVINORuntime(_ExportedRuntime):
    """OpenVINO on the CPU at f32 (its CPU plugin defaults to bf16 where the CPU has it, which changes which
    detections survive NMS), ``threads`` inference threads, one infer request per calling thread."""

    name = "openvino"

    def __init__(self, path: Path, entry: dict[str, Any], threads: int) -> None:
        import openvino as ov  # lazy: only bundles exported to OpenVINO need it

        super().__init__(entry)
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        # by every name a port's tensor has: OpenVINO may give one tensor several (the ONNX output's and an inner
        # node's), and get_any_name() picks one of them
        self._ports = {name: port for port in self.compiled.outputs for name in port.get_names()}
        self._local = threading.local()

    def _run(self, image: torch.Tensor) -> Sequence[Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer({"image": image.numpy()})
        return [np.array(results[self._ports[name]]) for name in self.outputs]


def load_runtime(name: str, bundle: ModelBundle | None, cfg: CfgNode, weights: str, threads: int) -> Runtime:
    """The runtime ``name`` for ``bundle`` (``cfg``/``weights`` serve eager PyTorch; exported ones read the bundle)."""
    if name == "pytorch":
        return PyTorchRuntime(cfg, weights)
    if bundle is None:
        raise RuntimeUnavailableError(f"the {name} runtime needs an exported bundle (d2ops export {name})")
    entry = bundle.runtimes().get(name)
    if entry is None:
        raise RuntimeUnavailableError(f"{bundle.path} has no {name} model (d2ops export {name})")
    path = bundle.path / entry["file"]
    if name == "torchscript":
        return TorchScriptRuntime(path, entry)
    if name == "onnx":
        return OnnxRuntime(path, entry, threads)
    if name == "openvino":
        return OpenVINORuntime(path, entry, threads)
    raise RuntimeUnavailableError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
