"""``d2ops export``: a bundle with a faster runtime's graph (``torchscript``, ``onnx``, ``openvino``, checked for
parity with PyTorch before it is written), or a model as CVAT serverless (nuclio) functions, CPU and GPU."""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Sequence

from d2ops.cli.common import fail, user_errors_types
from d2ops.model.source import resolve_model
from d2ops.serving.nuclio import DEFAULT_BASE_IMAGE, DEFAULT_RUNTIME, export_nuclio
from d2ops.utils.logs import setup_logging

log = logging.getLogger(__name__)

__all__ = ["export_main"]


RUNTIME_TARGETS = ("torchscript", "onnx", "openvino")


def export_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops export torchscript|onnx|openvino --model M --out DIR --images IMAGES [--force]``, or
    ``d2ops export nuclio --model M --out DIR [--name N] [--threshold T] [--force]``."""

    parser = argparse.ArgumentParser(prog="d2ops export", description="export a model for another runtime or platform")
    parser.add_argument(
        "target",
        choices=[*RUNTIME_TARGETS, "triton", "nuclio"],
        help="torchscript|onnx|openvino: the bundle plus that runtime's graph (d2ops serve --runtime); "
        "triton: a Triton model repository and preprocess.py for clearml-serving --engine triton (from an ONNX "
        "export); nuclio: a CVAT serverless function (CPU and GPU)",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="bundle folder or zip, s3:// URI, ClearML model id or clearml://<project>/<name>[@<tag>]",
    )
    parser.add_argument("--out", required=True, help="folder to write (nuclio: DIR/cpu and DIR/gpu)")
    parser.add_argument(
        "--images",
        help="runtime exports: a folder of held-out images (e.g. the test split) the graph must match PyTorch on",
    )
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
    if args.target in RUNTIME_TARGETS:
        return _export_runtime(args)
    if args.target == "triton":
        return _export_triton(args)
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


def _export_runtime(args: argparse.Namespace) -> int:
    # lazy: torch, detectron2 and the exporters, only for these targets (nuclio's export is pure files)
    from d2ops.model.export import describe, export_bundle, read_images

    if not args.images:
        return fail(ValueError(f"d2ops export {args.target} needs --images: a folder of held-out images to check the "
                               "exported graph against PyTorch on (e.g. the dataset's test split)"))  # fmt: skip
    try:
        bundle = resolve_model(args.model, args.cache_dir)
        result = export_bundle(bundle, args.target, args.out, images=read_images(args.images), force=args.force)
    except user_errors_types() as err:
        return fail(err)
    print(describe(result))
    print(f"serve it: d2ops serve --model {result.path} --runtime {args.target}")
    return 0


def _export_triton(args: argparse.Namespace) -> int:
    # lazy: the onnx package, only for this target
    from d2ops.serving.triton import TritonExportError, write_triton_repository

    try:
        bundle = resolve_model(args.model, args.cache_dir)
        repo = write_triton_repository(bundle, args.out, model_name=args.name or bundle.name)
    except (TritonExportError, *user_errors_types()) as err:  # type: ignore[misc]  # a tuple of error types
        return fail(err)
    print(f"Triton model {repo.model_name} ({repo.config}, {repo.model}) and {repo.preprocess} written; serve it:")
    for command in repo.commands:
        print("  " + shlex.join(command))
    return 0
