"""A TorchServe handler for a d2ops model bundle, written the way TorchServe users write one (seed 004's
``ObjectDetector(VisionHandler)`` with ``initialize``/``preprocess``/``inference``/``postprocess``), around
detectron2's ``DefaultPredictor``. It imports nothing from d2ops: it is the stack d2ops is compared with.

Archive (bench/bench_peers.py does this at run time, into a temporary model store)::

    torch-model-archiver --model-name tiny --version 1.0 --handler bench/torchserve/handler.py \\
        --serialized-file BUNDLE/model_final.pth --extra-files BUNDLE/config.yaml,BUNDLE/labels.json \\
        --config-file model-config.yaml --export-path MODEL_STORE

TorchServe 0.12.0 API used, as installed (bench/.peers):

- ``ts/torch_handler/base_handler.py``: ``BaseHandler.handle(data, context)`` calls ``preprocess(data)``,
  ``inference(...)``, ``postprocess(...)`` and returns the list, one entry per request of the batch;
  ``context.system_properties["model_dir"]`` is the unpacked archive, ``context.manifest["model"]
  ["serializedFile"]`` the weights' file name. ``BaseHandler.initialize`` is not called: it loads a
  torchscript or ``model.py`` model, and a detectron2 model is built from its config instead.
- ``ts/torch_handler/vision_handler.py``: a request's bytes are ``row.get("data") or row.get("body")``.
- With ``batchSize`` > 1 (the archive's model-config.yaml; ``ModelConfig`` in the frontend jar) TorchServe's
  frontend hands ``handle`` up to ``batchSize`` requests gathered for at most ``maxBatchDelay`` ms.

Inference is ``DefaultPredictor.__call__`` (detectron2/engine/defaults.py) over the whole batch: the same
``ResizeShortestEdge`` (``predictor.aug``), input format flip and ``predictor.model([...])`` call, in
``torch.inference_mode``; with one request it is exactly ``predictor(image)``. The reply is TorchServe's
object-detector list, ``[{"<label>": [x1, y1, x2, y2], "score": s}, ...]`` (seed 004), the same JSON
``d2ops serve`` answers on ``/predictions/{name}``; ``D2OPS_BENCH_THRESHOLD`` (default 0) filters scores.
Intra-op threads: the CPUs this worker may run on (its affinity mask) divided by ``D2OPS_BENCH_TS_WORKERS``,
what ``d2ops serve`` gives each of its workers (d2ops.utils.device.machine_threads).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)


class DetectronHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        workers = int(os.environ.get("D2OPS_BENCH_TS_WORKERS", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
        cfg = get_cfg()
        cfg.set_new_allowed(True)
        cfg.merge_from_file(str(model_dir / "config.yaml"))
        cfg.MODEL.WEIGHTS = str(model_dir / context.manifest["model"]["serializedFile"])
        cfg.MODEL.DEVICE = "cpu"
        self.predictor = DefaultPredictor(cfg)
        self.labels = json.loads((model_dir / "labels.json").read_text())
        self.threshold = float(os.environ.get("D2OPS_BENCH_THRESHOLD", "0"))
        self.manifest = context.manifest
        self.initialized = True
        log.info("detectron2 model loaded from %s, %d torch threads", model_dir, torch.get_num_threads())

    def preprocess(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        inputs = []
        for row in data:
            raw = row.get("data") or row.get("body")
            image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)  # BGR, as DefaultPredictor takes
            if image is None:
                raise ValueError("the request body is not an image")
            if self.predictor.input_format == "RGB":
                image = image[:, :, ::-1]
            height, width = image.shape[:2]
            resized = self.predictor.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": height, "width": width})
        return inputs

    def inference(self, data: list[dict[str, Any]], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        with torch.inference_mode():
            return self.predictor.model(data)

    def postprocess(self, data: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        replies = []
        for output in data:
            instances = output["instances"].to("cpu")
            instances = instances[instances.scores >= self.threshold]
            replies.append(
                [
                    {self.labels[int(cls)]: [float(v) for v in box], "score": float(score)}
                    for box, score, cls in zip(
                        instances.pred_boxes.tensor.tolist(),
                        instances.scores.tolist(),
                        instances.pred_classes.tolist(),
                        strict=True,
                    )
                ]
            )
        return replies
