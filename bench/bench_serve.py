"""serve_*: ``d2ops serve`` over HTTP against a raw detectron2 ``DefaultPredictor`` loop.

Same tiny model (the smoke architecture with seeded random weights, as the tests use), same images
(128x128 JPEGs), same run, alternating rounds, medians reported:

- ``serve_overhead_ratio_c1``: images/s of one client posting to ``/predict`` (CVAT contract, base64
  JSON, every detection serialised) divided by images/s of ``DefaultPredictor`` called in a loop on the
  already decoded images. Everything the server adds (HTTP, JSON, base64, decoding, queueing,
  encoding the reply) is inside the ratio. Target >= 0.9.
- ``serve_throughput_c16`` (images/s) and ``serve_p99_ms_c16``: 16 concurrent clients, micro-batching on.
- ``serve_batching_speedup_c16``: throughput at concurrency 16 with micro-batching on
  (``--max-batch-size 8``) divided by off (``--max-batch-size 1``), two servers in the same run.

    .venv/bin/python bench/bench_serve.py [--images 48] [--rounds 3] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_io import merge_into
from serve_clients import REPO, Server, make_images, p99, served

from d2ops.testing import build_tiny_bundle

CONCURRENCY = 16


def raw_predictor(bundle: Path) -> Any:
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    cfg = get_cfg()
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(bundle / "config.yaml"))
    cfg.MODEL.WEIGHTS = str(bundle / "model_final.pth")
    cfg.MODEL.DEVICE = "cpu"
    return DefaultPredictor(cfg)


def raw_throughput(predictor: Any, arrays: list[np.ndarray]) -> float:
    tic = time.perf_counter()
    for image in arrays:
        predictor(image)
    return len(arrays) / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images per round at concurrency 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args()

    from d2ops.serving.formats import decode_image

    work = Path(tempfile.mkdtemp(prefix="d2ops-bench-serve-"))
    bundle = build_tiny_bundle(work, metadata={"experiment": "bench-serve"})
    images = make_images(args.images)
    arrays = [decode_image(data) for data in images]
    bodies = [json.dumps({"image": base64.b64encode(data).decode()}).encode() for data in images]
    bodies16 = bodies * 2  # 96 requests by default at concurrency 16

    predictor = raw_predictor(bundle)
    batched = Server(bundle, work / "batched.log", "--max-batch-size", "8", "--max-batch-wait-ms", "5")
    unbatched = Server(bundle, work / "unbatched.log", "--max-batch-size", "1")
    try:
        for warm in (batched, unbatched):
            served(warm.url, bodies[:4], 1)
        raw_throughput(predictor, arrays[:4])
        raw, c1, c16, c16_off = [], [], [], []
        latencies16, latencies16_off = [], []
        batch_images = batch_count = 0.0
        for r in range(args.rounds):
            raw.append(raw_throughput(predictor, arrays))
            c1.append(served(batched.url, bodies, 1)[0])
            before = batched.batch_totals()
            throughput, lat = served(batched.url, bodies16, CONCURRENCY)
            after = batched.batch_totals()
            batch_images, batch_count = batch_images + after[0] - before[0], batch_count + after[1] - before[1]
            c16.append(throughput)
            latencies16 += lat
            throughput, lat = served(unbatched.url, bodies16, CONCURRENCY)
            c16_off.append(throughput)
            latencies16_off += lat
            print(f"round {r}: raw {raw[-1]:.2f} img/s, c1 {c1[-1]:.2f}, c16 {c16[-1]:.2f}, "
                  f"c16 unbatched {c16_off[-1]:.2f}", flush=True)  # fmt: skip
    finally:
        batched.stop()
        unbatched.stop()

    med = statistics.median
    figures = {
        "serve_overhead_ratio_c1": round(med(c1) / med(raw), 4),
        "serve_throughput_c16": round(med(c16), 2),
        "serve_p99_ms_c16": round(1000 * p99(latencies16), 1),
        "serve_batching_speedup_c16": round(med(c16) / med(c16_off), 4),
        "raw_predictor_images_per_s": round(med(raw), 2),
        "serve_throughput_c1": round(med(c1), 2),
        "serve_throughput_c16_unbatched": round(med(c16_off), 2),
        "serve_p99_ms_c16_unbatched": round(1000 * p99(latencies16_off), 1),
        "mean_batch_size_c16": round(batch_images / max(batch_count, 1), 2),
        "rounds": args.rounds,
        "images_c1": len(bodies),
        "requests_c16": len(bodies16),
        "workload": "128x128 JPEG, CVAT /predict (base64 JSON), threshold 0 (100 detections serialised per image)",
        "batched_server": "--max-batch-size 8 --max-batch-wait-ms 5 --max-queue-depth 64",
        "device": "cpu",
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    merge_into(args.json, "serve", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
