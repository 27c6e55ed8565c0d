"""cpu_runtime_speedup: images/s of the fastest exported runtime over the eager PyTorch predictor, batch 1, CPU.

Same bundle, exported with ``d2ops export`` to TorchScript, ONNX and OpenVINO; the same images (``--size`` px
arrays, or a trained model's own held-out images); the same
call, :meth:`d2ops.model.detector.Detector.predict` on one image, so the resize before the graph and detectron2's
postprocessing after it are inside every figure. Rounds alternate between runtimes; medians are reported.

Threads: each runtime is measured with the threads d2ops sets from the machine (this process's CPUs) and with
one thread, to show the effect of the setting (``threads_effect``).

Three models (``--model``); the first two at score threshold 0, so every image carries 100 detections through
postprocessing on every runtime:

- ``smoke`` (results key ``runtimes``): the demo's architecture, Faster R-CNN R18-FPN at 128 px, seeded random
  weights as the serving benchmarks use;
- ``r50`` (key ``runtimes_r50``): the architecture users deploy, the model zoo's Faster R-CNN R50-FPN (FrozenBN)
  at 800 px, seeded random weights calibrated to behave like trained ones
  (:func:`d2ops.testing.build_production_standin`);
- ``trained`` (key ``runtimes_trained``): a trained bundle (``--bundle``, e.g. ``make demo``'s) on its own
  held-out images (``--image-dir``), at its own score threshold: what the demo's model really serves.

    .venv/bin/python bench/bench_runtimes.py [--model smoke|r50] [--images N] [--rounds 3] [--json bench/results.json]
    .venv/bin/python bench/bench_runtimes.py --model trained --bundle B --image-dir D [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from results_io import merge_into

from d2ops.model.detector import Detector
from d2ops.model.export import export_bundle, read_images
from d2ops.testing import build_production_standin, build_tiny_bundle
from d2ops.utils.device import machine_threads

RUNTIMES = ("pytorch", "torchscript", "onnx", "openvino")
MODELS = {
    "smoke": {"images": 24, "size": 128, "key": "runtimes"},
    "r50": {"images": 6, "size": 800, "key": "runtimes_r50"},
    "trained": {"images": 24, "size": 128, "key": "runtimes_trained"},
}


def make_images(n: int, size: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 255, size=(size, size * 4 // 3, 3), dtype=np.uint8)
        x, y = rng.integers(0, size // 2, size=2)
        pixels[y : y + size // 3, x : x + size // 3] = rng.integers(0, 255, size=3)
        out.append((f"{i}.png", pixels))
    return out


def throughput(detector: Detector, images: list[np.ndarray]) -> float:
    detector.predict([images[0]])  # warm-up (lazy allocations, TorchScript's profiling run)
    started = time.perf_counter()
    for image in images:
        detector.predict([image])
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smoke")
    parser.add_argument("--images", type=int, help="images per round (default: 24 smoke, 6 r50)")
    parser.add_argument("--size", type=int, help="image height, width 4/3 of it (default: the model's test size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bundle", type=Path, help="--model trained: the trained bundle (make demo's)")
    parser.add_argument("--image-dir", type=Path, help="--model trained: its held-out images (the test split)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.images = args.images or MODELS[args.model]["images"]
    args.size = args.size or MODELS[args.model]["size"]
    if args.model == "trained":
        if not (args.bundle and args.image_dir):
            parser.error(
                "--model trained needs --bundle and --image-dir (after make demo: --bundle "
                "outputs/demo/run/bundle/d2ops-shapes --image-dir outputs/demo/dataset/test)"
            )
        images = read_images(args.image_dir, limit=args.images)
    else:
        images = make_images(args.images, args.size)
    arrays = [p for _, p in images]
    threads = machine_threads()
    with tempfile.TemporaryDirectory(prefix="d2ops-bench-runtimes-") as tmp:
        if args.model == "r50":
            bundle = build_production_standin(Path(tmp) / "r50", arrays[0])
        elif args.model == "trained":
            bundle = args.bundle
        else:
            bundle = build_tiny_bundle(Path(tmp) / "tiny")
        exported = bundle
        for runtime in RUNTIMES[1:]:
            exported = export_bundle(exported, runtime, Path(tmp) / runtime, images=images[:4]).path
        settings = [(rt, threads) for rt in RUNTIMES] + ([(rt, 1) for rt in RUNTIMES] if threads > 1 else [])
        detectors = {(rt, n): Detector.from_bundle(exported, device="cpu", runtime=rt, threads=n) for rt, n in settings}
        rounds: dict[str, list[float]] = {f"{rt}@{n}": [] for rt, n in settings}
        for r in range(args.rounds):
            for (rt, n), detector in detectors.items():
                torch.set_num_threads(n)  # the process-wide torch setting follows the detector measured
                rounds[f"{rt}@{n}"].append(throughput(detector, arrays))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rounds.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rounds.items()}
    exported_best = max(RUNTIMES[1:], key=lambda rt: median[f"{rt}@{threads}"])
    figures = {
        "model": args.model,
        "cpu_runtime_speedup": median[f"{exported_best}@{threads}"] / median[f"pytorch@{threads}"],
        "fastest_runtime": exported_best,
        "images_per_s": median,
        "rounds": rounds,
        "threads": threads,
        "threads_effect": {rt: median[f"{rt}@{threads}"] / median[f"{rt}@1"] for rt in RUNTIMES if f"{rt}@1" in median},
        "images": args.images,
        "image_size": [args.size, args.size * 4 // 3] if args.model != "trained" else "the images' own",
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {threads} CPUs usable",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print({k: v for k, v in figures.items() if k != "rounds"})
    if args.json:
        merge_into(args.json, MODELS[args.model]["key"], figures)


if __name__ == "__main__":
    main()
