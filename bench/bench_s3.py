"""Benchmark: parallel cached S3 downloads against a sequential boto3 loop.

Starts moto's S3 server as a separate process on 127.0.0.1, uploads many small objects, then
times, alternating and repeated (median reported):

  (a) a sequential ``get_object`` loop writing files (the naive baseline),
  (b) ``d2ops.storage.s3.download`` with its default workers into a fresh directory,

and finally (c) re-runs ``download`` on unchanged data, which should transfer 0 bytes.
Results are merged into a JSON file under the key "s3". CPU seconds of client and server are
recorded too: on a small machine the in-Python moto server, not the client, sets the ceiling.
``--latency-ms N`` adds a second scenario, reported separately, in which the server sleeps N ms
per request (no CPU) to mimic a remote store's time to first byte.

    .venv/bin/python bench/bench_s3.py [--objects 2000] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from results_io import merge_into

from d2ops.storage import s3 as storage
from d2ops.storage.local_s3 import local_s3_endpoint

BUCKET = "bench"
PREFIX = "objects/"
DEFAULT_WORKERS = int(inspect.signature(storage.download).parameters["workers"].default)


def make_objects(root: Path, count: int, min_kib: int, max_kib: int, seed: int = 0) -> int:
    """Write ``count`` files of random bytes, sizes uniform in [min_kib, max_kib] KiB; returns the bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(count):
        size = rng.randint(min_kib * 1024, max_kib * 1024)
        path = root / f"shard{i % 20:02d}" / f"obj{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def sequential_download(uri: str, dest: Path) -> int:
    """The baseline: list, then one ``get_object`` after another, writing each file."""
    loc = storage.parse_s3_uri(uri)
    client = storage.make_s3_client(loc)
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix):
        for obj in page.get("Contents", []):
            target = dest / obj["Key"][len(loc.prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket=loc.bucket, Key=obj["Key"])["Body"].read())
            count += 1
    return count


class CpuClock:
    """CPU seconds used by this process and by the server process (Linux /proc; 0 elsewhere)."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def read(self) -> tuple[float, float]:
        client = sum(os.times()[:2])
        return client, self._server()

    def _server(self) -> float:
        try:
            fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def timed(clock: CpuClock, fn: Any, *args: Any, **kwargs: Any) -> tuple[dict[str, float], Any]:
    """Run ``fn``; return wall and CPU seconds (client, server) and its result."""
    client0, server0 = clock.read()
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    wall = time.perf_counter() - started
    client1, server1 = clock.read()
    return {"wall": wall, "client_cpu": client1 - client0, "server_cpu": server1 - server0}, result


def run(
    objects: int, repeats: int, workers: int, min_kib: int, max_kib: int, latency_ms: float = 0.0
) -> dict[str, Any]:
    """Upload, then time (a) and (b) alternately ``repeats`` times, then (c); returns the figures."""
    work = Path(tempfile.mkdtemp(prefix="d2ops-bench-s3-"))
    try:
        with local_s3_endpoint(in_process=False, latency_ms=latency_ms) as s3:
            clock = CpuClock(s3.pid)
            uri = s3.uri(BUCKET, PREFIX)
            total_bytes = make_objects(work / "src", objects, min_kib, max_kib)
            upload_t, _ = timed(clock, storage.upload, work / "src", uri, create_bucket=True, progress=False)

            sequential: list[dict[str, float]] = []
            parallel: list[dict[str, float]] = []
            for r in range(repeats):
                t, count = timed(clock, sequential_download, uri, work / f"seq{r}")
                sequential.append(t)
                t, stats = timed(clock, storage.download, uri, work / f"par{r}", workers=workers, progress=False)
                parallel.append(t)
                if count != objects or stats.files_transferred != objects:
                    raise RuntimeError(f"expected {objects} objects, got {count}, {stats.files_transferred}")
                shutil.rmtree(work / f"seq{r}")

            rerun_t, rerun = timed(
                clock, storage.download, uri, work / f"par{repeats - 1}", workers=workers, progress=False
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(runs: list[dict[str, float]], what: str) -> float:
        return round(statistics.median(run[what] for run in runs), 3)

    seq_s, par_s = median(sequential, "wall"), median(parallel, "wall")
    return {
        "s3_parallel_speedup": round(seq_s / par_s, 2),
        # What (b) could reach at best: the moto server runs requests under one interpreter lock.
        "s3_speedup_ceiling": round(seq_s / max(median(parallel, "server_cpu"), 1e-9), 2),
        "s3_cached_rerun_bytes": rerun.bytes_transferred,
        "s3_cached_rerun_files": rerun.files_transferred,
        "s3_cached_rerun_seconds": round(rerun_t["wall"], 3),
        "sequential_seconds": seq_s,
        "parallel_seconds": par_s,
        "sequential_runs": [round(run["wall"], 3) for run in sequential],
        "parallel_runs": [round(run["wall"], 3) for run in parallel],
        "cpu_seconds": {
            name: {"client": median(runs, "client_cpu"), "server": median(runs, "server_cpu")}
            for name, runs in (("sequential", sequential), ("parallel", parallel))
        },
        "upload_seconds": round(upload_t["wall"], 3),
        "objects": objects,
        "bytes": total_bytes,
        "object_kib": [min_kib, max_kib],
        "workers": workers,
        "repeats": repeats,
        "latency_ms": latency_ms,
        "server": "moto S3 server in a separate process on 127.0.0.1",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(f: dict[str, Any]) -> None:
    cpu = f["cpu_seconds"]
    latency = f" + {f['latency_ms']:g} ms simulated latency per request" if f["latency_ms"] else ""
    kib = f"{f['object_kib'][0]}-{f['object_kib'][1]} KiB"
    rows = [
        ("objects", f"{f['objects']} ({f['bytes'] / 2**20:.1f} MiB, {kib}){latency}"),
        (
            "(a) sequential get_object loop",
            f"{f['sequential_seconds']:.2f} s  runs {f['sequential_runs']}  "
            f"cpu client {cpu['sequential']['client']:.2f} s, server {cpu['sequential']['server']:.2f} s",
        ),
        (
            f"(b) storage.download, {f['workers']} workers",
            f"{f['parallel_seconds']:.2f} s  runs {f['parallel_runs']}  "
            f"cpu client {cpu['parallel']['client']:.2f} s, server {cpu['parallel']['server']:.2f} s",
        ),
        ("s3_parallel_speedup (a)/(b)", f"{f['s3_parallel_speedup']:.2f}x  (target >= 5)"),
        ("ceiling: (a) / server cpu in (b)", f"{f['s3_speedup_ceiling']:.2f}x  (single-process server)"),
        (
            "(c) cached re-run",
            f"{f['s3_cached_rerun_bytes']} bytes, {f['s3_cached_rerun_files']} files, "
            f"{f['s3_cached_rerun_seconds']:.2f} s  (target 0 bytes)",
        ),
        ("machine", f"{f['machine']['platform']}, {f['machine']['cpu_count']} CPUs"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing rounds (median reported)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--min-kib", type=int, default=4)
    parser.add_argument("--max-kib", type=int, default=16)
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="also run a second, separately reported scenario with this delay per request",
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    repeats = max(2, args.repeats)
    figures = run(args.objects, repeats, args.workers, args.min_kib, args.max_kib)
    print_table(figures)
    if args.latency_ms > 0:
        delayed = run(args.objects, repeats, args.workers, args.min_kib, args.max_kib, args.latency_ms)
        print()
        print_table(delayed)
        figures["simulated_latency"] = {
            key: delayed[key]
            for key in (
                "latency_ms",
                "s3_parallel_speedup",
                "s3_speedup_ceiling",
                "sequential_seconds",
                "parallel_seconds",
                "sequential_runs",
                "parallel_runs",
                "cpu_seconds",
                "s3_cached_rerun_bytes",
            )
        }
    merge_into(args.json, "s3", figures)
    print(f"merged into {args.json} under 's3'")


if __name__ == "__main__":
    main()
