"""``d2ops export``: a bundle with a faster runtime's graph (``torchscript``, ``onnx``, ``openvino``, checked for
parity with PyTorch before it is written), or a model as CVAT serverless (nuclio) functions, CPU and GPU."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from d2ops.cli.common import fail, user_errors_types
from d2ops.model.source import resolve_model
from d2ops.serving.nuclio import DEFAULT_BASE_IMAGE, DEFAULT_RUNTIME, ExportError, check_nuclio_runtime, export_nuclio
from d2ops.utils.folders import OutputFolderError, refuse_overlap
from d2ops.utils.logs import setup_logging

log = logging.getLogger(__name__)

__all__ = ["build_parser", "export_main"]


RUNTIME_TARGETS = ("torchscript", "onnx", "openvino")


def build_parser() -> argparse.ArgumentParser:
    """``d2ops export <target>``: one sub-command per target, each with only the options it uses."""
    parser = argparse.ArgumentParser(prog="d2ops export", description="export a model for another runtime or platform")
    targets = parser.add_subparsers(dest="target", required=True)
    for runtime in RUNTIME_TARGETS:
        sub = targets.add_parser(
            runtime,
            help=f"the bundle plus its {runtime} graph, checked against PyTorch (d2ops serve --runtime {runtime})",
            description=f"write the bundle plus its {runtime} graph to --out, once the graph matches PyTorch on "
            f"--images (serve it: d2ops serve --runtime {runtime})",
        )
        _common(sub)
        sub.add_argument(
            "--images",
            required=True,
            help="a folder of held-out images (e.g. the test split) the graph must match PyTorch on",
        )
    triton = targets.add_parser(
        "triton",
        help="a Triton model repository and preprocess.py for clearml-serving --engine triton (from an ONNX export)",
        description="write a Triton model repository (and clearml-serving's preprocess.py) for a bundle exported "
        "to onnx",
    )
    _common(triton)
    triton.add_argument("--name", help="Triton model name, one path segment (default: the bundle folder's name)")
    nuclio = targets.add_parser(
        "nuclio",
        help="a CVAT serverless function (nuclio), CPU and GPU",
        description="write the model as CVAT serverless functions (nuclio): --out/cpu and --out/gpu",
    )
    _common(nuclio)
    nuclio.add_argument("--name", help="nuclio function name (default: d2ops-<model>)")
    nuclio.add_argument("--threshold", type=float, default=0.5, help="default score threshold (default 0.5)")
    nuclio.add_argument(
        "--shape",
        choices=["mask", "polygon"],
        default="mask",
        help="how a segmenting model's objects reach CVAT: masks (keep holes) or one polygon each",
    )
    nuclio.add_argument("--base-image", default=DEFAULT_BASE_IMAGE, help="image with detectron2 (docker/Dockerfile)")
    nuclio.add_argument(
        "--runtime",
        default=DEFAULT_RUNTIME,
        type=_nuclio_runtime,
        help=f"nuclio's Python runtime, python:3.<minor> matching the base image's python3 (default {DEFAULT_RUNTIME})"
        "; the model's runtime is picked in the function (D2OPS_RUNTIME, default auto)",
    )
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="bundle folder or zip, s3:// URI, ClearML model id or clearml://<project>/<name>[@<tag>]",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="a new (or empty) folder to write; never the model's own folder",
    )
    parser.add_argument("--cache-dir", default="outputs/cache/models", help="where remote models are downloaded")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --out when it holds exactly an earlier d2ops export of the same model (nothing else is replaced)",
    )


def _nuclio_runtime(value: str) -> str:
    try:
        return check_nuclio_runtime(value)
    except ExportError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def export_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops export torchscript|onnx|openvino --model M --out DIR --images IMAGES [--force]``,
    ``d2ops export triton --model M --out DIR [--name N] [--force]``, or
    ``d2ops export nuclio --model M --out DIR [--name N] [--threshold T] [--force]``."""

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = ""
        if args.target != "nuclio" and any(u == "--runtime" or u.startswith("--runtime=") for u in unknown):
            hint = f" (the target is the runtime: d2ops export {'|'.join(RUNTIME_TARGETS)} --model M --out DIR ...)"
        parser.error(f"d2ops export {args.target} does not take {' '.join(unknown)}{hint}")
    setup_logging()
    model = Path(os.path.expanduser(args.model))
    try:
        if model.exists():  # a local bundle or zip: --out must not be, be inside, or hold it
            refuse_overlap(args.out, [model], f"{args.target} export")
    except OutputFolderError as err:
        return fail(err)
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
        repo = write_triton_repository(bundle, args.out, model_name=args.name or bundle.name, force=args.force)
    except (TritonExportError, *user_errors_types()) as err:  # type: ignore[misc]  # a tuple of error types
        return fail(err)
    print(f"Triton model {repo.model_name} ({repo.config}, {repo.model}) and {repo.preprocess} written; serve it:")
    for command in repo.commands:
        print("  " + shlex.join(command))
    return 0
