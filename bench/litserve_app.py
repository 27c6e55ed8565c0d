"""A LitServe server over the predictor ``d2ops serve`` uses, so that bench/bench_peers.py compares serving
stacks, not models: ``d2ops.model.detector.Detector.from_bundle(dir, device="cpu", runtime="pytorch")`` and its
``predict(images, score_threshold)``, one forward pass per LitServe batch.

    PYTHONPATH=bench/.peers .venv/bin/python bench/litserve_app.py --model BUNDLE --port 8000
    curl -s localhost:8000/predict -H 'content-type: application/json' -d "{\\"image\\": \\"$(base64 -w0 img.jpg)\\"}"

Request: ``{"image": "<base64 JPEG/PNG>"}`` on ``POST /predict``. LitServe's endpoint reads a JSON body (or a
form) and hands the parsed object to ``decode_request`` in the inference worker (litserve 0.2.19,
``server.py`` ``BaseRequestHandler._prepare_request``: ``await request.json()`` when ``decode_request``'s
``request`` has no annotation); raw image bytes cannot reach the worker, hence base64 JSON. Reply: TorchServe's
object-detector list ``[{"<label>": [x1, y1, x2, y2], "score": s}, ...]``, as ``d2ops serve`` and the bench's
TorchServe handler answer.

LitServe 0.2.19 API used, as installed (bench/.peers/litserve):

- ``api.py``: ``LitAPI(max_batch_size=..., batch_timeout=...)`` with ``setup(device)``, ``decode_request``,
  ``batch``, ``predict``, ``unbatch``, ``encode_response``. ``batch`` is overridden: the default one
  ``numpy.stack``\\s ndarrays, and images of different sizes do not stack (the detector takes a list).
- ``server.py``: ``LitServer(lit_api, accelerator, devices, workers_per_device, timeout)``; passing
  ``max_batch_size``/``batch_timeout`` to ``LitServer`` still works there but is deprecated (a warning says they
  move to ``LitAPI``), so they are given to ``LitAPI``. ``LitServer.run(host, port, num_api_servers,
  generate_client_file)``: ``num_api_servers`` defaults to the number of inference workers (here 1, one uvicorn
  process). ``GET /health`` answers 200 once every inference worker has finished ``setup``.
"""

from __future__ import annotations

import argparse
import base64
import os
from typing import Any

import cv2
import litserve as ls
import numpy as np


class DetectorAPI(ls.LitAPI):
    def __init__(self, bundle: str, threshold: float, threads: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bundle = bundle
        self.threshold = threshold
        self.threads = threads

    def setup(self, device: str) -> None:
        from d2ops.model.detector import Detector  # in the inference worker (a spawned process)

        self.detector = Detector.from_bundle(self.bundle, device="cpu", runtime="pytorch", threads=self.threads)

    # No annotation on ``request``: LitServe makes its type the endpoint's parameter type, and only an
    # unannotated one gets the parsed JSON body (``Any`` makes FastAPI answer 422).
    def decode_request(self, request) -> np.ndarray:  # type: ignore[no-untyped-def]
        data = base64.b64decode(request["image"])
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR, what the detector takes
        if image is None:
            raise ValueError("the request's image is not an image")
        return image

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return list(inputs)

    def predict(self, images: list[np.ndarray]) -> list[Any]:
        return self.detector.predict(images, self.threshold)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return list(output)

    def encode_response(self, detections: list[Any]) -> list[dict[str, Any]]:
        return [{det.label: det.box, "score": det.score} for det in detections]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="d2ops model bundle folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--threads", type=int, help="intra-op threads per worker (default: CPUs / workers)")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cpus // args.workers_per_device)
    api = DetectorAPI(args.model, args.threshold, threads,
                      max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers_per_device, timeout=300)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
