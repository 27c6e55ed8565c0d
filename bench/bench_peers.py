"""peers: ``d2ops serve`` side by side with TorchServe and LitServe, same model, same images, same client, one run.

Figures (merged into ``bench/results.json`` under ``peers``), each a ratio of medians over alternating rounds:

- ``serve_vs_torchserve_c16``: ``d2ops serve --runtime pytorch`` images/s at concurrency 16 / TorchServe's
  (target >= 1.2);
- ``serve_vs_litserve_c16``: the same / LitServe's, batching on (target >= 1.0);
- ``*_default_runtime``: the same with ``d2ops serve``'s default runtime (``--runtime auto``) on the bundle
  exported with ``d2ops export onnx``, where ``auto`` picks ONNX Runtime on the CPU; the peers stay on eager
  PyTorch, as their users' handlers are written. Measured only when ``d2ops serve --help`` lists ``--runtime``.

p99 latency of every server is recorded beside its images/s (``p99_ms_c16``).

What runs (all on 127.0.0.1, the CPU, one model replica each, micro-batching up to 8 images / 5 ms, score
threshold 0 so every reply carries all of the model's detections, TorchServe's detector list as the reply):

- ``d2ops serve --model BUNDLE --name tiny --max-batch-size 8 --max-batch-wait-ms 5 [--runtime pytorch]``:
  one uvicorn worker (the default ``--workers 1``), intra-op threads = the process's CPUs. Request: the raw
  JPEG on ``POST /predictions/tiny`` (its TorchServe contract).
- TorchServe 0.12.0, bench/torchserve/handler.py (detectron2 ``DefaultPredictor`` over the bundle's
  config.yaml and model_final.pth), archived into a ``.mar`` at run time; one worker
  (``default_workers_per_model=1``, min/maxWorkers 1), ``batchSize: 8``, ``maxBatchDelay: 5`` ms, intra-op
  threads = the CPUs; the Java frontend and a Python worker that runs the project venv's python. Request:
  the raw JPEG on ``POST /predictions/tiny``. One worker because ``d2ops serve`` runs one model replica by
  default: the same number of model copies and the same threads per copy, so neither side gets more CPU for
  the model; both batch the same way.
- LitServe 0.2.19, bench/litserve_app.py: a ``LitAPI`` over ``Detector.from_bundle(dir, device="cpu",
  runtime="pytorch")`` (the predictor ``d2ops serve --runtime pytorch`` runs), ``max_batch_size=8``,
  ``batch_timeout=0.005``, ``workers_per_device=1`` (one inference worker, one uvicorn API process). Request:
  ``{"image": "<base64 JPEG>"}`` on ``POST /predict`` (LitServe reads JSON bodies, see litserve_app.py).

Client (bench/serve_clients.py ``served_for``, the httpx client of bench_serve.py): ``--concurrency`` closed-loop
clients, one keep-alive connection each, posting the ``--images`` JPEGs cyclically for ``--duration-s``
seconds per server per round. Every server first gets the same warm-up (``--warmup`` requests at the same
concurrency), and one image is checked to give the same detections on every server (same model, same
weights). Rounds alternate: round r starts with server r mod N, so no server always runs first or last.
All servers stay up for the whole run, but only the one under load runs: the others are stopped with SIGSTOP
(their whole process groups) and continued for their own turn. An idle server is not idle everywhere: the CPU
each uses with no request in flight is measured first (``idle_cpu_percent``, over 10 s), and a busy-polling
peer would otherwise slow whichever server is being measured beside it.

    bash bench/setup_peers.sh        # once: TorchServe, torch-model-archiver, LitServe into bench/.peers
    .venv/bin/python bench/bench_peers.py [--images 48] [--rounds 5] [--duration-s 10] [--json bench/results.json]

Without a Java runtime TorchServe is skipped (its ratio is then absent and ``skipped`` says why).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import torch
from results_io import merge_into
from serve_clients import REPO, Server, ServerProcess, free_port, make_images, p99, served, served_for

from d2ops.testing import build_tiny_bundle

BENCH = REPO / "bench"
PEERS = BENCH / ".peers"
MODEL = "tiny"
MAX_BATCH, BATCH_WAIT_MS = 8, 5
IDLE_WINDOW_S = 10.0
JPEG, JSON = "image/jpeg", "application/json"


@dataclass
class Target:
    """One server under test: how to post to it, and what came back."""

    name: str
    server: ServerProcess
    url: str
    path: str
    content_type: str
    bodies: list[bytes]
    describe: str
    throughput: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    requests: int = 0

    def post_all(self, concurrency: int, n: int) -> None:
        served(self.url, (self.bodies * (n // len(self.bodies) + 1))[:n], concurrency, self.path, self.content_type)

    def reply(self, i: int = 0) -> list[dict[str, Any]]:
        r = httpx.post(self.url + self.path, content=self.bodies[i], headers={"content-type": self.content_type},
                       timeout=120)  # fmt: skip
        r.raise_for_status()
        return r.json()


def peer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "D2OPS_SERVE_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(PEERS), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def peer_versions() -> dict[str, str]:
    code = "import ts.version, litserve; print(ts.version.__version__, litserve.__version__)"
    out = subprocess.run([sys.executable, "-c", code], env=peer_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"TorchServe/LitServe not importable from {PEERS}: run `bash bench/setup_peers.sh` first\n"
                         f"{out.stderr[-1000:]}")  # fmt: skip
    ts_version, ls_version = out.stdout.split()
    return {"torchserve": ts_version, "litserve": ls_version}


def java_version() -> str | None:
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    if java is None or not Path(java).exists():
        return None
    out = subprocess.run([str(java), "-version"], capture_output=True, text=True)
    return (out.stderr or out.stdout).splitlines()[0].strip() if out.returncode == 0 else None


def d2ops_has_runtime_option() -> bool:
    out = subprocess.run([sys.executable, "-m", "d2ops", "serve", "--help"], capture_output=True, text=True, cwd=REPO)
    return "--runtime" in out.stdout


def d2ops_runtime(url: str) -> str:
    models = httpx.get(f"{url}/v1/models").json()["models"]
    return str(models[0].get("runtime", "?"))


def start_torchserve(bundle: Path, work: Path) -> tuple[ServerProcess, str]:
    """Archive the handler with the bundle into a .mar in a fresh model store, then ``torchserve --start``."""
    home = work / "torchserve"
    store, tmp = home / "model-store", home / "tmp"
    store.mkdir(parents=True)
    tmp.mkdir()
    (home / "model-config.yaml").write_text(
        f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {MAX_BATCH}\nmaxBatchDelay: {BATCH_WAIT_MS}\nresponseTimeout: 300\n"
    )
    archiver = [sys.executable, str(PEERS / "bin" / "torch-model-archiver"), "--model-name", MODEL, "--version",
                "1.0", "--handler", str(BENCH / "torchserve" / "handler.py"),
                "--serialized-file", str(bundle / "model_final.pth"),
                "--extra-files", f"{bundle / 'config.yaml'},{bundle / 'labels.json'}",
                "--config-file", str(home / "model-config.yaml"), "--export-path", str(store), "--force"]  # fmt: skip
    subprocess.run(archiver, env=peer_env(), check=True, cwd=home)
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_i", "grpc_m", "worker")}
    (home / "config.properties").write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports['inference']}",
                f"management_address=http://127.0.0.1:{ports['management']}",
                f"metrics_address=http://127.0.0.1:{ports['metrics']}",
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                f"grpc_inference_port={ports['grpc_i']}",
                f"grpc_management_port={ports['grpc_m']}",
                f"initial_worker_port={ports['worker']}",
                "default_workers_per_model=1",
                "disable_token_authorization=true",
                "enable_envvars_config=true",
                "install_py_dep_per_model=false",
                "default_response_timeout=300",
                f"model_store={store}",
                "",
            ]
        )
    )
    env = peer_env()
    # A private temp dir: torchserve keeps its pid file in tempfile.gettempdir() and the JVM its worker sockets
    # in java.io.tmpdir (TEMP), so a TorchServe of another job on this machine is never seen or touched.
    env.update(TMPDIR=str(tmp), TEMP=str(tmp), D2OPS_BENCH_TS_WORKERS="1", D2OPS_BENCH_THRESHOLD="0")
    command = [sys.executable, str(PEERS / "bin" / "torchserve"), "--start", "--foreground", "--ncs",
               "--disable-token-auth", "--model-store", str(store), "--models", f"{MODEL}={MODEL}.mar",
               "--ts-config", str(home / "config.properties")]  # fmt: skip
    management = f"http://127.0.0.1:{ports['management']}/models/{MODEL}"

    def workers_ready() -> bool:
        reply = httpx.get(management, timeout=5)
        workers = reply.json()[0].get("workers", []) if reply.status_code == 200 else []
        return bool(workers) and all(w.get("status") == "READY" for w in workers)

    url = f"http://127.0.0.1:{ports['inference']}"
    server = ServerProcess(command, home / "torchserve.log", f"{url}/ping", env=env, cwd=home, group_kill=True,
                           ready=workers_ready)  # fmt: skip
    return server, url


def start_litserve(bundle: Path, work: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    command = [sys.executable, str(BENCH / "litserve_app.py"), "--model", str(bundle), "--port", str(port),
               "--max-batch-size", str(MAX_BATCH), "--batch-timeout", str(BATCH_WAIT_MS / 1000),
               "--workers-per-device", "1", "--threshold", "0"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(command, work / "litserve.log", f"{url}/health", env=peer_env(), group_kill=True)
    return server, url


def idle_cpu_percent(targets: list[Target], window_s: float) -> dict[str, float]:
    """CPU % each server's processes use while no request reaches any of them, over ``window_s`` seconds."""
    before = {t.name: t.server.cpu_seconds() for t in targets}
    tic = time.perf_counter()
    time.sleep(window_s)
    elapsed = time.perf_counter() - tic
    return {t.name: round(100 * (t.server.cpu_seconds() - before[t.name]) / elapsed, 1) for t in targets}


def same_detections(reference: list[dict[str, Any]], other: list[dict[str, Any]], tolerance_px: float) -> str | None:
    """None when both replies hold the same detections (label, box within ``tolerance_px``), else why not."""
    if len(reference) != len(other):
        return f"{len(other)} detections instead of {len(reference)}"
    worst = 0.0
    for a, b in zip(reference, other, strict=True):
        (label_a,) = (k for k in a if k != "score")
        (label_b,) = (k for k in b if k != "score")
        if label_a != label_b:
            return f"label {label_b} instead of {label_a}"
        worst = max(worst, *(abs(x - y) for x, y in zip(a[label_a], b[label_b], strict=True)))
    return None if worst <= tolerance_px else f"boxes differ by up to {worst:.3f} px"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="distinct JPEGs the clients cycle through")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds of load per server per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=32, help="requests per server before the first round")
    parser.add_argument("--json", type=Path, default=BENCH / "results.json")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (bundles, .mar, logs)")
    args = parser.parse_args()

    started = time.perf_counter()
    versions = {"torch": torch.__version__, **peer_versions()}
    java = java_version()
    versions["java"] = java or "none"
    skipped: dict[str, str] = {}
    if java is None:
        skipped["torchserve"] = "no Java runtime (install one, e.g. apt-get install openjdk-17-jre-headless)"
        print(f"WARNING: TorchServe skipped: {skipped['torchserve']}", file=sys.stderr)
    runtime_variant = d2ops_has_runtime_option()
    if not runtime_variant:
        skipped["d2ops_default_runtime"] = "d2ops serve has no --runtime option"

    work = Path(tempfile.mkdtemp(prefix="d2ops-bench-peers-"))
    bundle = build_tiny_bundle(work, metadata={"experiment": "bench-peers"})
    images = make_images(args.images)
    image_dir = work / "images"
    image_dir.mkdir()
    for i, data in enumerate(images):
        (image_dir / f"{i:03d}.jpg").write_bytes(data)
    json_bodies = [json.dumps({"image": base64.b64encode(data).decode()}).encode() for data in images]
    batching = ("--name", MODEL, "--max-batch-size", str(MAX_BATCH), "--max-batch-wait-ms", str(BATCH_WAIT_MS))
    d2ops_servers: dict[str, Server] = {}

    targets: list[Target] = []
    try:
        d2 = Server(bundle, work / "d2ops_pytorch.log", *batching, "--runtime", "pytorch")
        d2ops_servers["d2ops_pytorch"] = d2
        targets.append(Target("d2ops_pytorch", d2, d2.url, f"/predictions/{MODEL}", JPEG, images,
                              f"d2ops serve --runtime pytorch, 1 worker, {' '.join(batching[2:])}"))  # fmt: skip
        if runtime_variant:
            exported = work / "exported"
            subprocess.run([sys.executable, "-m", "d2ops", "export", "onnx", "--model", str(bundle), "--out",
                            str(exported), "--images", str(image_dir)], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            d2x = Server(exported, work / "d2ops_default.log", *batching)
            d2ops_servers["d2ops_default_runtime"] = d2x
            runtime = d2ops_runtime(d2x.url)
            targets.append(Target("d2ops_default_runtime", d2x, d2x.url, f"/predictions/{MODEL}", JPEG, images,
                                  f"d2ops serve (default --runtime auto: {runtime}) on the `d2ops export onnx` "
                                  f"bundle, 1 worker, {' '.join(batching[2:])}"))  # fmt: skip
        if java is not None:
            ts_server, ts_url = start_torchserve(bundle, work)
            targets.append(Target("torchserve", ts_server, ts_url, f"/predictions/{MODEL}", JPEG, images,
                                  f"TorchServe {versions['torchserve']}, bench/torchserve/handler.py "
                                  f"(DefaultPredictor), 1 worker, batchSize {MAX_BATCH}, "
                                  f"maxBatchDelay {BATCH_WAIT_MS} ms"))  # fmt: skip
        ls_server, ls_url = start_litserve(bundle, work)
        ls_describe = (f"LitServe {versions['litserve']}, bench/litserve_app.py (d2ops Detector, pytorch), 1 worker, "
                       f"max_batch_size {MAX_BATCH}, batch_timeout {BATCH_WAIT_MS / 1000:g} s")  # fmt: skip
        targets.append(Target("litserve", ls_server, ls_url, "/predict", JSON, json_bodies, ls_describe))
        print(f"servers up in {time.perf_counter() - started:.0f} s: {', '.join(t.name for t in targets)}", flush=True)

        reference = targets[0].reply()
        agreement = {}
        for t in targets[1:]:
            tolerance = 1.0 if t.name == "d2ops_default_runtime" else 1e-3  # ONNX: the export's parity tolerance
            agreement[t.name] = same_detections(reference, t.reply(), tolerance) or "same detections"
            if agreement[t.name] != "same detections":
                print(f"WARNING: {t.name} disagrees with d2ops_pytorch: {agreement[t.name]}", file=sys.stderr)
        for t in targets:
            t.post_all(args.concurrency, args.warmup)
        idle_cpu = idle_cpu_percent(targets, IDLE_WINDOW_S)
        print("idle CPU %: " + ", ".join(f"{name} {v}" for name, v in idle_cpu.items()), flush=True)
        batch_before = {name: s.batch_totals() for name, s in d2ops_servers.items()}
        for t in targets:
            t.server.pause()
        for r in range(args.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for t in order:
                t.server.resume()  # only the server under load runs; the others are stopped (SIGSTOP)
                try:
                    throughput, lat = served_for(t.url, t.bodies, args.concurrency, args.duration_s, t.path,
                                                 t.content_type)  # fmt: skip
                finally:
                    t.server.pause()
                t.throughput.append(throughput)
                t.latencies += lat
                t.requests += len(lat)
            print(f"round {r}: " + ", ".join(f"{t.name} {t.throughput[-1]:.2f} img/s" for t in targets), flush=True)
        for t in targets:
            t.server.resume()
        batch_after = {name: s.batch_totals() for name, s in d2ops_servers.items()}
    finally:
        for t in targets:
            t.server.stop()
        for orphan in d2ops_servers.values():
            if all(t.server is not orphan for t in targets):
                orphan.stop()
        if args.keep_work:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    by_name = {t.name: t for t in targets}
    speed = {t.name: round(med(t.throughput), 2) for t in targets}
    figures: dict[str, Any] = {}
    for peer in ("torchserve", "litserve"):
        if peer in by_name:
            figures[f"serve_vs_{peer}_c16"] = round(speed["d2ops_pytorch"] / speed[peer], 4)
            if "d2ops_default_runtime" in by_name:
                figures[f"serve_vs_{peer}_c16_default_runtime"] = round(speed["d2ops_default_runtime"] / speed[peer], 4)
    mean_batch = {}
    for name in d2ops_servers:
        images_done, passes = (
            after - before for after, before in zip(batch_after[name], batch_before[name], strict=True)
        )
        mean_batch[name] = round(images_done / max(passes, 1), 2)
    figures.update(
        {
            "images_per_s_c16": speed,
            "p99_ms_c16": {t.name: round(1000 * p99(t.latencies), 1) for t in targets},
            "median_ms_c16": {t.name: round(1000 * med(t.latencies), 1) for t in targets},
            "rounds_images_per_s": {t.name: [round(v, 2) for v in t.throughput] for t in targets},
            "requests_c16": {t.name: t.requests for t in targets},
            "mean_batch_size_c16": mean_batch,
            "idle_cpu_percent": idle_cpu,
            "others_paused": True,
            "servers": {t.name: t.describe for t in targets},
            "agreement_with_d2ops_pytorch": agreement,
            "skipped": skipped,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "duration_s_per_round": args.duration_s,
            "warmup_requests": args.warmup,
            "images": len(images),
            "workload": "128x128 JPEG, raw bytes on /predictions/tiny (d2ops, TorchServe), base64 JSON on /predict "
            "(LitServe), threshold 0 (every detection serialised), TorchServe detector-list replies",
            "device": "cpu",
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"Python {platform.python_version()}",
            "versions": versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )
    merge_into(args.json, "peers", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
