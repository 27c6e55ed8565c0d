"""A batched detectron2 predictor that loads a model bundle (weights, config.yaml, labels).

It is detectron2's DefaultPredictor generalised to a list of images per forward pass and to the runtimes of
:mod:`d2ops.model.runtimes` (eager PyTorch, or the TorchScript, ONNX or OpenVINO graph of an exported bundle),
so that evaluation, batch inference and every serving front end share one implementation. The resize before
the graph and detectron2's postprocessing after it (rescaling to the original image, pasting masks) are done
here, once, for every runtime. It imports no training or S3 code: the serving stack loads it alone.

An image is a BGR uint8 array, or a :class:`Frame`: pixels decoded at a reduced size plus the size of
the original frame, so that detections come back in the original frame's coordinates (detectron2's
postprocessing rescales to the ``height`` and ``width`` it is given).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances

from d2ops.model.bundle import ModelBundle
from d2ops.model.runtimes import Runtime, choose_runtime, load_runtime
from d2ops.utils.device import machine_threads, resolve_device

__all__ = ["Detection", "Detector", "Frame", "load_d2_config", "mask_polygon"]

log = logging.getLogger(__name__)


@dataclass
class Detection:
    """One detected object, in absolute pixel coordinates of the input image.

    Instance-segmentation models also give the object's ``mask``: a boolean array cropped to
    ``mask_box``, the integer box ``[xtl, ytl, xbr, ybr]`` with inclusive right and bottom edges
    (the crop CVAT's mask shapes use).
    """

    label: str
    category_index: int
    score: float
    box: list[float]  # x1, y1, x2, y2
    mask: np.ndarray | None = field(default=None, repr=False)
    mask_box: tuple[int, int, int, int] | None = None

    @property
    def polygon(self) -> list[float]:
        """One simplified outline of the mask (x, y pairs), or [] without a mask: one object, one polygon."""
        if self.mask is None or self.mask_box is None:
            return []
        return mask_polygon(self.mask, self.mask_box[:2])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "score": self.score, "box": self.box}
        polygon = self.polygon
        if polygon:
            out["polygon"] = polygon
        return out


@dataclass(frozen=True)
class Frame:
    """An image decoded at a reduced size: ``pixels`` (BGR uint8) stand for a ``height`` x ``width`` frame."""

    pixels: np.ndarray
    height: int
    width: int

    @property
    def scale(self) -> float:
        """Original size over decoded size (1.0 when not reduced)."""
        return self.height / self.pixels.shape[0]


Image = np.ndarray | Frame


def load_d2_config(path: str | Path) -> CfgNode:
    """A detectron2 config file merged onto detectron2's defaults (new keys allowed, as the trainer wrote it)."""
    cfg = get_cfg()
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(path))
    return cfg


def mask_polygon(mask: np.ndarray, offset: Sequence[int] = (0, 0), tolerance: float = 1.0) -> list[float]:
    """The outline of a mask's largest region, simplified (Douglas-Peucker, ``tolerance`` pixels).

    One polygon per object: smaller islands are dropped, as CVAT's own functions do
    (``serverless/.../nuclio/model_handler.py``: ``find_contours`` then ``approximate_polygon`` of one
    contour). Holes cannot be drawn by a polygon; mask shapes keep them.
    """
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    largest = max(contours, key=cv2.contourArea)
    simplified = cv2.approxPolyDP(largest, tolerance, True).reshape(-1, 2)
    if len(simplified) < 3:
        return []
    return (simplified + np.asarray(offset[:2])).astype(float).reshape(-1).tolist()


def _inclusive_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The integer pixels a box covers, ``[xtl, ytl, xbr, ybr]`` with inclusive right and bottom (inside the image)."""
    xtl = min(max(int(np.floor(box[0])), 0), width - 1)
    ytl = min(max(int(np.floor(box[1])), 0), height - 1)
    xbr = min(max(int(np.ceil(box[2])) - 1, xtl), width - 1)
    ybr = min(max(int(np.ceil(box[3])) - 1, ytl), height - 1)
    return xtl, ytl, xbr, ybr


def _mask_crop(
    mask: np.ndarray, box: Sequence[float], frame: Frame | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The mask cropped to the box's integer pixels, with the inclusive box (inside the image).

    With a reduced ``frame``, ``mask`` is at the decoded size and ``box`` in the original frame: the crop is
    sampled (nearest pixel) at the original size over the box only, never over the whole original frame.
    """
    if frame is None:
        xtl, ytl, xbr, ybr = _inclusive_box(box, *mask.shape)
        return np.ascontiguousarray(mask[ytl : ybr + 1, xtl : xbr + 1]), (xtl, ytl, xbr, ybr)
    small_h, small_w = mask.shape
    xtl, ytl, xbr, ybr = _inclusive_box(box, frame.height, frame.width)
    cols = np.minimum(((np.arange(xtl, xbr + 1) + 0.5) * small_w / frame.width).astype(int), small_w - 1)
    rows = np.minimum(((np.arange(ytl, ybr + 1) + 0.5) * small_h / frame.height).astype(int), small_h - 1)
    return np.ascontiguousarray(mask[np.ix_(rows, cols)]), (xtl, ytl, xbr, ybr)


class Detector:
    """Runs a trained detectron2 model over batches of BGR uint8 images, on one of the bundle's runtimes.

    ``runtime``: ``pytorch`` (eager), an exported one the bundle has (``torchscript``, ``onnx``, ``openvino``),
    or ``auto``: the fastest the bundle has for the device (:func:`~d2ops.model.runtimes.choose_runtime`).
    ``threads``: intra-op threads (default: this process's CPUs, :func:`~d2ops.utils.device.machine_threads`;
    a server with N model replicas passes its share).
    """

    def __init__(
        self,
        d2_cfg: CfgNode,
        weights: str,
        labels: Sequence[str],
        device: str = "auto",
        *,
        bundle: ModelBundle | None = None,
        runtime: str = "pytorch",
        threads: int | None = None,
    ) -> None:
        cfg = d2_cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = resolve_device(device)
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        if len(labels) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"the model has {cfg.MODEL.ROI_HEADS.NUM_CLASSES} classes but {len(labels)} labels were given"
            )
        self.cfg = cfg
        self.labels = list(labels)
        self.threads = threads or machine_threads()
        if cfg.MODEL.DEVICE == "cpu":
            torch.set_num_threads(self.threads)  # torch's default is every core of the host, not of this process
        name = choose_runtime(bundle, cfg.MODEL.DEVICE, runtime) if bundle is not None else runtime
        self.runtime: Runtime = load_runtime(name, bundle, cfg, weights, self.threads)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    @classmethod
    def from_bundle(
        cls,
        bundle: ModelBundle | str | Path,
        device: str = "auto",
        runtime: str = "auto",
        threads: int | None = None,
    ) -> Detector:
        """Load a :class:`~d2ops.model.bundle.ModelBundle` (or the folder of one) on ``runtime``."""
        if not isinstance(bundle, ModelBundle):
            bundle = ModelBundle.open(bundle)
        config, weights, labels = load_d2_config(bundle.config_file), str(bundle.weights), bundle.labels()
        return cls(config, weights, labels, device, bundle=bundle, runtime=runtime, threads=threads)

    @classmethod
    def from_files(
        cls, d2_config: str | Path, weights: str | Path, labels: Sequence[str], device: str = "auto"
    ) -> Detector:
        """Load weights and a detectron2 config file that are not (yet) a bundle, e.g. a training run's output
        (eager PyTorch: there is no exported graph yet)."""
        return cls(load_d2_config(d2_config), str(weights), labels, device)

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    def input_problem(self, image: Image) -> str | None:
        """Why the model cannot take this image (None when it can): an aspect ratio so extreme that the
        test-time resize (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``) leaves a side of zero pixels."""
        pixels = image.pixels if isinstance(image, Frame) else image
        height, width = pixels.shape[:2]
        new_h, new_w = T.ResizeShortestEdge.get_output_shape(
            height, width, self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        )
        if min(new_h, new_w) < 1:
            return (
                f"the image is {width}x{height} pixels: at the model's input size ({self.cfg.INPUT.MIN_SIZE_TEST} "
                f"short side, {self.cfg.INPUT.MAX_SIZE_TEST} long side at most) one side would be 0 pixels; "
                "crop or pad it to a less extreme aspect ratio"
            )
        return None

    def model_inputs(self, frame: Image, at_original_size: bool = True) -> dict[str, Any]:
        """detectron2's input dict for one image: resized ``image`` (CHW float32) and the ``height``/``width`` to
        postprocess to (the original frame's, or with ``at_original_size=False`` the decoded pixels')."""
        if isinstance(frame, Frame) and at_original_size:
            image, height, width = frame.pixels, frame.height, frame.width
        else:
            image = frame.pixels if isinstance(frame, Frame) else frame
            height, width = image.shape[:2]
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}

    def raw(self, images: Sequence[Image]) -> list[Any]:
        """detectron2 ``Instances`` per image (on the CPU), in each original frame; ValueError for an image
        :meth:`input_problem` refuses."""
        return self._run(images, at_original_size=True)

    def _run(self, images: Sequence[Image], at_original_size: bool) -> list[Any]:
        for image in images:
            problem = self.input_problem(image)
            if problem:
                raise ValueError(problem)
        outputs = self([self.model_inputs(img, at_original_size) for img in images])
        return [out["instances"].to("cpu") for out in outputs]

    @torch.inference_mode()
    def __call__(self, batched_inputs: Sequence[dict[str, Any]]) -> list[dict[str, Instances]]:
        """detectron2's model interface on any runtime: dicts with the resized ``image`` (CHW, ``INPUT.FORMAT``)
        and the original ``height`` and ``width`` in; ``{"instances": ...}`` in the original frame out.

        This is what ``GeneralizedRCNN.forward`` does at inference, with the graph in the middle swappable:
        ``inference(..., do_postprocess=False)`` then ``detector_postprocess`` (``GeneralizedRCNN._postprocess``),
        so :func:`detectron2.evaluation.inference_on_dataset` evaluates every runtime alike.
        """
        raw = self.runtime.infer([inputs["image"] for inputs in batched_inputs])
        outputs = []
        for inputs, instances in zip(batched_inputs, raw, strict=True):
            height = inputs.get("height", instances.image_size[0])
            width = inputs.get("width", instances.image_size[1])
            outputs.append({"instances": detector_postprocess(instances, height, width)})
        return outputs

    def predict(self, images: Sequence[Image], score_threshold: float = 0.0) -> list[list[Detection]]:
        """Detections per image with score >= ``score_threshold``, in each original frame.

        A reduced :class:`Frame` is postprocessed at its decoded size and the boxes and mask crops are mapped
        to the original frame here: detectron2 would paste every instance's mask into a frame-sized array
        (100 instances of an 8000x5100 frame: 4 GB).
        """
        results = []
        for image, inst in zip(images, self._run(images, at_original_size=False), strict=True):
            keep = inst.scores >= score_threshold
            inst = inst[keep]
            masks = inst.pred_masks.numpy() if inst.has("pred_masks") else None
            frame = image if isinstance(image, Frame) else None
            sx, sy = (
                (1.0, 1.0) if frame is None else (frame.width / inst.image_size[1], frame.height / inst.image_size[0])
            )
            dets = []
            for i, (box, score, cls) in enumerate(
                zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), inst.pred_classes.tolist(), strict=True)
            ):
                x1, y1, x2, y2 = (float(v) for v in box)
                det = Detection(self.labels[cls], int(cls), float(score), [x1 * sx, y1 * sy, x2 * sx, y2 * sy])
                if masks is not None:
                    det.mask, det.mask_box = _mask_crop(masks[i], det.box, frame)
                dets.append(det)
            results.append(dets)
        return results
