"""``make demo``: the whole pipeline on one machine, with no ClearML server and no GPU.

It generates a synthetic COCO dataset, serves it from a local S3 endpoint (moto, on 127.0.0.1),
runs the offline pipeline through every step, stops the endpoint, prints a summary and writes
``<out>/summary.json`` and ``<out>/report.html`` (see :mod:`d2ops.pipeline.report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2ops.clearml.session import enable_offline
from d2ops.clearml.step import run_offline
from d2ops.cli.common import fail, user_errors_types
from d2ops.config import load_config
from d2ops.data.synthetic import generate_shapes_dataset
from d2ops.pipeline.report import format_summary, write_outputs
from d2ops.storage import s3 as storage
from d2ops.storage.local_s3 import local_s3_endpoint
from d2ops.utils.files import atomic_write
from d2ops.utils.folders import OutputFolderError
from d2ops.utils.logs import setup_logging

__all__ = ["DEMO_MARKER", "claim_demo_folder", "demo_main", "run_demo"]

log = logging.getLogger(__name__)

#: Marks a folder as the demo's output: a later demo replaces its own sub-folders there, and nothing else.
DEMO_MARKER = "d2ops-demo.json"


def run_demo(out_dir: Path, config: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Generate data, serve it over local S3, run the offline pipeline; returns the summary."""

    tic = time.perf_counter()
    out_dir = out_dir.resolve()
    claim_demo_folder(out_dir)
    for stale in ("run", "cache", "clearml", "registry"):  # the demo's own folders, from its earlier run
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    enable_offline(out_dir / "clearml")
    dataset = generate_shapes_dataset(out_dir / "dataset", seed=0)
    with local_s3_endpoint() as s3:
        uri = s3.uri("d2ops-demo", "datasets/shapes/")
        storage.upload(dataset, uri, create_bucket=True, progress=False)
        log.info("dataset uploaded to %s", uri)
        cfg = load_config(config, [*overrides, f"data.source={uri}"])
        all_overrides = [
            f"inference.source={uri}{cfg.data.splits[cfg.eval.split]}/",  # batch inference straight from S3
            *overrides,
            f"data.source={uri}",
            f"data.cache_dir={out_dir / 'cache'}",
            f"runtime.output_dir={out_dir / 'run'}",
            f"registry.local_dir={out_dir / 'registry'}",  # the offline model registry (champion)
        ]
        load_config(config, all_overrides)  # fail fast on a bad config, before any work
        run = run_offline(config, all_overrides)
    summary, _ = write_outputs(run, out_dir, time.perf_counter() - tic, debug_images=cfg.inference.debug_images)
    return summary


def claim_demo_folder(out_dir: Path) -> None:
    """The demo writes a new or empty folder, or its own earlier output (marked by DEMO_MARKER), never a user's."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputFolderError(f"--out {out_dir} is not a folder; name a new folder for the demo's output")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / DEMO_MARKER).is_file():
        raise OutputFolderError(
            f"--out {out_dir} holds files the demo did not write (it has no {DEMO_MARKER}); the demo never replaces "
            "them: name a new folder with --out, or move that one away yourself"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / DEMO_MARKER, "w") as handle:
        json.dump({"kind": "demo output", "note": "written by d2ops demo, which replaces this folder's run, cache, "
                   "clearml, registry and dataset on its next run"}, handle, indent=2)  # fmt: skip


def demo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2ops demo", description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/demo", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging()

    try:
        summary = run_demo(args.out, args.config, args.overrides)
    except user_errors_types() as err:
        return fail(err)
    print(format_summary(summary, args.out / "summary.json", args.out / "report.html", title="d2ops demo"))
    return 0
