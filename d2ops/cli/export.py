"""``d2ops export nuclio``: a model as CVAT serverless (nuclio) functions, CPU and GPU."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from d2ops.cli.common import fail, user_errors_types
from d2ops.model.source import resolve_model
from d2ops.serving.nuclio import DEFAULT_BASE_IMAGE, DEFAULT_RUNTIME, export_nuclio
from d2ops.utils.logs import setup_logging

log = logging.getLogger(__name__)

__all__ = ["export_main"]


def export_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops export nuclio --model M --out DIR [--name N] [--threshold T] [--force]``."""

    parser = argparse.ArgumentParser(prog="d2ops export", description="export a model for another serving platform")
    parser.add_argument("target", choices=["nuclio"], help="nuclio: a CVAT serverless function (CPU and GPU)")
    parser.add_argument(
        "--model",
        required=True,
        help="bundle folder or zip, s3:// URI, ClearML model id or clearml://<project>/<name>[@<tag>]",
    )
    parser.add_argument("--out", required=True, help="folder to write (DIR/cpu and DIR/gpu)")
    parser.add_argument("--name", help="nuclio function name (default: d2ops-<model>)")
    parser.add_argument("--threshold", type=float, default=0.5, help="default score threshold (default 0.5)")
    parser.add_argument(
        "--shape",
        choices=["mask", "polygon"],
        default="mask",
        help="how a segmenting model's objects reach CVAT: masks (keep holes) or one polygon each",
    )
    parser.add_argument("--base-image", default=DEFAULT_BASE_IMAGE, help="image with detectron2 (docker/Dockerfile)")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, help="nuclio runtime matching the image's Python")
    parser.add_argument("--cache-dir", default="outputs/cache/models", help="where remote models are downloaded")
    parser.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier export")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        bundle = resolve_model(args.model, args.cache_dir)
        export = export_nuclio(
            bundle,
            args.out,
            name=args.name,
            threshold=args.threshold,
            shape=args.shape,
            base_image=args.base_image,
            runtime=args.runtime,
            force=args.force,
            model_ref=args.model,
        )
    except user_errors_types() as err:
        return fail(err)
    print(f"CVAT function {export.name} ({export.shape_type}, {len(export.labels)} labels) written to {export.out_dir}")
    print("deploy one of:")
    for command in export.deploy_commands():
        print(f"  {command}")
    return 0
