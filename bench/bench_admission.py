"""admission_*: how ``d2ops serve`` answers a burst it cannot finish in time (issue 22, part 4).

Each round posts ``C`` single-image requests at the same moment (one connection each; C = 64 and 150) to
a server whose queue holds more work than its ``--request-timeout`` allows: the smoke model with seeded
random weights, 128x128 JPEGs on the CVAT route, ``--max-batch-size 8``, ``--request-timeout 2``
(the default 64-deep queue is then about twice the timeout's work on 2 CPUs, the shape of the issue's
30 s timeout with a slower model). Reported per concurrency, over all rounds:

- ``admission_share_504_cC``: replies that waited the whole timeout for a 504 (target 0);
- ``admission_p99_ms_admitted_cC``: p99 latency of the requests served (200);
- the share of 200 and 503, and p99 latency of the 503s (a refusal is meant to come at once).

With ``--baseline-code DIR`` (a checkout of an earlier version, e.g. ``git archive <commit> | tar -x -C DIR``)
the same rounds also run against that version's server, alternating with this one, under ``baseline``.

    .venv/bin/python bench/bench_admission.py [--rounds 5] [--baseline-code DIR] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from results_io import merge_into
from serve_clients import REPO, Server, burst, make_images, p99

from d2ops.testing import build_tiny_bundle

CONCURRENCIES = (64, 150)
SERVER_ARGS = ("--max-batch-size", "8", "--max-batch-wait-ms", "5", "--request-timeout", "2")


def summarise(outcomes: list[tuple[int, float]], concurrency: int) -> dict[str, Any]:
    """Shares of each status and latencies of the served and the refused, over all rounds at ``concurrency``."""
    counts = Counter(status for status, _ in outcomes)
    served = [lat for status, lat in outcomes if status == 200]
    refused = [lat for status, lat in outcomes if status == 503]
    share = {f"share_{code}_c{concurrency}": round(counts.get(code, 0) / len(outcomes), 4) for code in (200, 503, 504)}
    return {
        **share,
        f"p99_ms_admitted_c{concurrency}": round(1000 * p99(served), 1) if served else None,
        f"median_ms_admitted_c{concurrency}": round(1000 * statistics.median(served), 1) if served else None,
        f"p99_ms_refused_c{concurrency}": round(1000 * p99(refused), 1) if refused else None,
        f"statuses_c{concurrency}": {str(k): v for k, v in sorted(counts.items())},
    }


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="bursts per concurrency and server")
    parser.add_argument("--baseline-code", type=Path, help="a d2ops tree of an earlier version to measure too")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="d2ops-bench-admission-"))
    bundle = build_tiny_bundle(work, metadata={"experiment": "bench-admission"})
    bodies = [json.dumps({"image": base64.b64encode(data).decode()}).encode() for data in make_images(150)]
    codes = {"current": REPO, **({"baseline": args.baseline_code.resolve()} if args.baseline_code else {})}
    servers = {name: Server(bundle, work / f"{name}.log", *SERVER_ARGS, code=code) for name, code in codes.items()}
    outcomes: dict[str, dict[int, list[tuple[int, float]]]] = {n: {c: [] for c in CONCURRENCIES} for n in servers}
    try:
        for server in servers.values():
            for _ in range(3):  # warm up: the model's first batches, and the server's time per image
                burst(server.url, bodies[:8])
        for r in range(args.rounds):
            for concurrency in CONCURRENCIES:
                for name, server in servers.items():
                    got = burst(server.url, bodies[:concurrency])
                    outcomes[name][concurrency] += got
                    print(f"round {r} c{concurrency} {name}: {dict(Counter(s for s, _ in got))}", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    figures: dict[str, Any] = {}
    for name, by_concurrency in outcomes.items():
        summary: dict[str, Any] = {}
        for concurrency, got in by_concurrency.items():
            summary.update(summarise(got, concurrency))
        if name == "current":
            figures.update({f"admission_{k}": v for k, v in summary.items()})
        else:
            figures[name] = {"code": str(codes[name]), **summary}
    figures.update({
        "rounds": args.rounds,
        "workload": "bursts of single-image requests, 128x128 JPEG, CVAT /predict (base64 JSON), threshold 0",
        "server": " ".join(SERVER_ARGS) + " (other limits at their defaults: --max-queue-depth 64)",
        "device": "cpu",
        "machine": f"{cpu_model()}, {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_after": os.getloadavg(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip
    merge_into(args.json, "admission", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
