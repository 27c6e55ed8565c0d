"""replicas: ``d2ops serve`` with the machine's CPUs shared out as model replicas x intra-op threads.

``d2ops serve`` sets both from the machine (``d2ops.utils.device.machine_replicas``/``machine_threads``): one
replica (uvicorn worker process, its own model copy) per 4 CPUs the process may use, threads = CPUs / replicas.
This measures what the split costs or buys on this machine: every ``--workers W --threads T`` with W x T = the
CPUs, plus one replica with one thread (what a library default of "one thread" would give), each at
concurrency 16 (throughput, p99) and 1 (latency), micro-batching on.

Same bundle as bench_peers.py (the tiny model exported with ``d2ops export onnx``, served on its default
runtime), same images and client (bench/serve_clients.py). All servers stay up; only the one measured runs,
the others are stopped with SIGSTOP. Rounds alternate; medians reported under ``replicas`` in results.json.

    .venv/bin/python bench/bench_replicas.py [--rounds 3] [--duration-s 8] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from results_io import merge_into
from serve_clients import REPO, Server, make_images, p99, served_for

from d2ops.testing import build_tiny_bundle
from d2ops.utils.device import machine_cpus, machine_replicas

JPEG, PATH = "image/jpeg", "/predictions/tiny"


def splits(cpus: int) -> list[tuple[int, int]]:
    """(workers, threads) with workers x threads = cpus, fewest workers first, then (1, 1)."""
    out = [(w, cpus // w) for w in range(1, cpus + 1) if cpus % w == 0]
    return out + ([(1, 1)] if (1, 1) not in out else [])


def all_workers_ready(url: str, workers: int) -> bool:
    """Every worker answers /ready: ask more times than there are workers (the kernel spreads connections)."""
    return all(httpx.get(f"{url}/ready", timeout=5).status_code == 200 for _ in range(4 * workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    cpus = machine_cpus()
    work = Path(tempfile.mkdtemp(prefix="d2ops-bench-replicas-"))
    images = make_images(args.images)
    servers: dict[str, Server] = {}
    c16: dict[str, list[float]] = {}
    c1: dict[str, list[float]] = {}
    lat16: dict[str, list[float]] = {}
    try:
        bundle = build_tiny_bundle(work, metadata={"experiment": "bench-replicas"})
        image_dir = work / "images"
        image_dir.mkdir()
        for i, data in enumerate(images):
            (image_dir / f"{i:03d}.jpg").write_bytes(data)
        exported = work / "exported"
        subprocess.run([sys.executable, "-m", "d2ops", "export", "onnx", "--model", str(bundle), "--out",
                        str(exported), "--images", str(image_dir)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for workers, threads in splits(cpus):
            name = f"{workers}x{threads}"
            server = Server(exported, work / f"{name}.log", "--name", "tiny", "--workers", str(workers),
                            "--threads", str(threads))  # fmt: skip
            deadline = time.monotonic() + 120
            while not all_workers_ready(server.url, workers):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: not every worker became ready: {server.log.read_text()[-2000:]}")
                time.sleep(0.5)
            served_for(server.url, images, 16, 3.0, PATH, JPEG)  # warm-up: every worker's first passes
            server.pause()
            servers[name] = server
            c16[name], c1[name], lat16[name] = [], [], []
        print(f"servers up in {time.perf_counter() - started:.0f} s: {', '.join(servers)}", flush=True)
        names = list(servers)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                servers[name].resume()
                try:
                    throughput, latencies = served_for(servers[name].url, images, 16, args.duration_s, PATH, JPEG)
                    c16[name].append(throughput)
                    lat16[name] += latencies
                    c1[name].append(served_for(servers[name].url, images, 1, args.duration_s / 2, PATH, JPEG)[0])
                finally:
                    servers[name].pause()
            print(f"round {r}: " + ", ".join(f"{n} c16 {c16[n][-1]:.2f} c1 {c1[n][-1]:.2f}" for n in names), flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    default = f"{machine_replicas('cpu')}x{max(1, cpus // machine_replicas('cpu'))}"
    figures: dict[str, Any] = {
        "default": default,
        "images_per_s_c16": {n: round(med(v), 2) for n, v in c16.items()},
        "p99_ms_c16": {n: round(1000 * p99(v), 1) for n, v in lat16.items()},
        "images_per_s_c1": {n: round(med(v), 2) for n, v in c1.items()},
        "rounds_c16": {n: [round(x, 2) for x in v] for n, v in c16.items()},
        "rounds_c1": {n: [round(x, 2) for x in v] for n, v in c1.items()},
        "vs_default_c16": {n: round(med(v) / med(c16[default]), 3) for n, v in c16.items()},
        "vs_default_c1": {n: round(med(v) / med(c1[default]), 3) for n, v in c1.items()},
        "runtime": "onnx (d2ops export onnx, served on the default --runtime auto)",
        "cpus": cpus,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs ({cpus} usable), Python {platform.python_version()}",
        "rounds": args.rounds,
        "duration_s_per_round": args.duration_s,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    merge_into(args.json, "replicas", figures)
    print(figures)


if __name__ == "__main__":
    main()
