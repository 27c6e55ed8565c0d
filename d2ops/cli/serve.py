"""``d2ops serve``: the HTTP model server (:mod:`d2ops.serving.http`) under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from d2ops.model.source import ModelNotFoundError, parse_model_ref
from d2ops.serving.connections import (
    ACCEPT_BACKLOG,
    FD_RESERVE,
    LIMITS_ENV,
    ConnectionLimits,
    connection_cap,
    protocol_path,
    raise_open_files_limit,
)
from d2ops.serving.core import (
    TOKEN_ENV,
    ServeSettings,
    ServeSettingsError,
    load_settings,
)
from d2ops.serving.http import OPEN_PATHS, SETTINGS_ENV, create_app
from d2ops.utils.device import machine_threads
from d2ops.utils.logs import setup_logging

log = logging.getLogger(__name__)

__all__ = ["build_parser", "serve_main"]


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeSettings.model_fields
    p = argparse.ArgumentParser(
        prog="d2ops serve",
        description="Serve a detectron2 model bundle over HTTP (CVAT nuclio and TorchServe contracts).",
        epilog=f"Set {TOKEN_ENV} to require 'Authorization: Bearer <token>' on every route except "
        f"{', '.join(sorted(OPEN_PATHS))} (probes and the Prometheus scraper). SIGTERM drains and exits 0.",
    )
    p.add_argument("--model", required=True, help=defaults["model"].description)
    p.add_argument("--name", help="served model name (default: the bundle's folder name or ClearML name)")
    p.add_argument("--host", default=defaults["host"].default)
    p.add_argument("--port", type=int, default=defaults["port"].default)
    p.add_argument("--workers", type=int, help=defaults["workers"].description)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--runtime", default="auto", choices=["auto", "pytorch", "torchscript", "onnx", "openvino"],
                   help=defaults["runtime"].description)  # fmt: skip
    p.add_argument("--threads", type=int, help=defaults["threads"].description)
    p.add_argument("--threshold", type=float, default=defaults["threshold"].default, help="default score threshold")
    p.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"].default,
                   help="images per forward pass (1 disables micro-batching)")  # fmt: skip
    p.add_argument("--max-batch-wait-ms", type=float, default=defaults["max_batch_wait_ms"].default,
                   help="how long a batch waits for more images (only while requests are arriving)")  # fmt: skip
    p.add_argument("--max-queue-depth", type=int, default=defaults["max_queue_depth"].default,
                   help="images waiting for the model before requests get 503")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=defaults["request_timeout"].default,
                   help="seconds a request may take before it gets 504")  # fmt: skip
    p.add_argument("--max-body-size", type=int, default=defaults["max_body_size"].default, help="bytes (413 beyond)")
    p.add_argument("--max-pixels", type=int, default=defaults["max_pixels"].default,
                   help="per image: larger images are refused (decompression bombs)")  # fmt: skip
    p.add_argument("--max-inference-pixels", type=int, default=defaults["max_inference_pixels"].default,
                   help="larger frames are decoded reduced; shapes come back in the frame's pixels")  # fmt: skip
    p.add_argument("--max-request-images", type=int, default=defaults["max_request_images"].default,
                   help="images in one request (413 beyond)")  # fmt: skip
    p.add_argument("--max-request-pixels", type=int, default=defaults["max_request_pixels"].default,
                   help="pixels of all images of one request, from their headers (413 beyond)")  # fmt: skip
    p.add_argument("--max-pixels-in-flight", type=int, default=defaults["max_pixels_in_flight"].default,
                   help="pixels of all images a worker holds at once, from their headers (503 with Retry-After "
                   "beyond; 413 for a request over it alone)")  # fmt: skip
    p.add_argument("--decode-threads", type=int, help=defaults["decode_threads"].description)
    p.add_argument("--body-timeout", type=float, default=defaults["body_timeout"].default,
                   help="seconds a client may take to send its request body (408 beyond)")  # fmt: skip
    p.add_argument("--keep-alive-timeout", type=float, default=defaults["keep_alive_timeout"].default,
                   help="seconds a connection may stay idle, before its first request or between requests")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=defaults["header_timeout"].default,
                   help="seconds a connection may take to send a request head, from opening or its last "
                   "response (408 and close beyond)")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=defaults["max_connections"].default,
                   help="open connections per worker, kept below the open-files limit; beyond it the one "
                   "waiting longest for a request head is closed")  # fmt: skip
    p.add_argument("--http", choices=["auto", "httptools", "h11"], default=defaults["http"].default,
                   help=defaults["http"].description)  # fmt: skip
    p.add_argument("--cvat-shape", choices=["mask", "polygon"], default="mask",
                   help="a segmenting model's CVAT shapes: masks, or one polygon per object")  # fmt: skip
    p.add_argument("--watch", action="store_true", help="poll the model source and hot-swap new versions")
    p.add_argument("--poll-interval", type=float, default=defaults["poll_interval"].default, help="seconds")
    p.add_argument("--quiet-period", type=float, default=defaults["quiet_period"].default,
                   help=defaults["quiet_period"].description)  # fmt: skip
    p.add_argument("--cache-dir", default=str(defaults["cache_dir"].default), help="where remote bundles go")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request log line")
    return p


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``d2ops serve --model M [options]``: 0 after a graceful shutdown, 1 if the model cannot load, 2 bad options."""
    import uvicorn

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        settings = load_settings(vars(args))
        _check_source(settings.model)
    except (ServeSettingsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        settings = settings.model_copy(update={"workers": settings.replicas})
    except RuntimeError as err:  # --device cuda without a GPU
        print(f"error: {err}", file=sys.stderr)
        return 2
    threads = settings.threads or machine_threads(settings.replicas)
    log.info("serving %s as %r on http://%s:%d (token %s; %d worker(s) x %d intra-op thread(s))", settings.model,
             settings.served_name, settings.host, settings.port, "required" if settings.token else "not required",
             settings.replicas, threads)  # fmt: skip
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": int(settings.request_timeout) + 5,
        "log_config": None,
        **_connection_options(settings),
    }
    # uvicorn re-raises SIGTERM after its graceful shutdown; a finished shutdown is a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if settings.replicas > 1:
        os.environ[SETTINGS_ENV] = settings.model_dump_json(exclude={"token"})
        uvicorn.run("d2ops.serving.http:create_app_from_env", factory=True, workers=settings.replicas, **common)
        return 0
    fatal: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop(err: BaseException) -> None:
        fatal.append(err)
        if server is not None:
            server.should_exit = True

    server = uvicorn.Server(uvicorn.Config(create_app(settings, on_fatal=stop), **common))
    server.run()
    return 1 if fatal else 0


def _connection_options(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn's options for the connection limits of :mod:`d2ops.serving.connections`, whose protocol
    classes read the rest from the environment (in this process and in every worker)."""
    raise_open_files_limit(settings.max_connections + FD_RESERVE)
    limits = ConnectionLimits(settings.max_header_bytes, settings.header_timeout, settings.max_connections)
    os.environ[LIMITS_ENV] = limits.to_env()
    cap = connection_cap(settings.max_connections)
    if cap < settings.max_connections:
        log.warning("--max-connections %d lowered to %d per worker: this process may open only %d files "
                    "(raise it with ulimit -n)", settings.max_connections, cap, cap + FD_RESERVE)  # fmt: skip
    return {
        "http": protocol_path(settings.http),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "backlog": ACCEPT_BACKLOG,
    }


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _check_source(ref: str) -> None:
    """Fail before starting the server when a local model path plainly does not exist."""

    parsed = parse_model_ref(ref)
    if parsed.kind == "path" and not os.path.exists(os.path.expanduser(ref)):
        raise ModelNotFoundError(f"model {ref} does not exist (pass a bundle folder or zip, s3://, or clearml://)")
