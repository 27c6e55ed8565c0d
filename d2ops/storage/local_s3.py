"""A local S3 endpoint (moto's real HTTP server) for tests, demos and benchmarks.

No MinIO binary is needed: moto serves the S3 REST API on 127.0.0.1, and the storage layer
talks to it exactly as it talks to MinIO (``s3://127.0.0.1:PORT/bucket/prefix``). Data lives in
memory and is gone when the server stops. Any access key and secret are accepted.

Run one by hand with ``python -m d2ops.storage.local_s3 --port 9000``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from d2ops.utils.logs import setup_logging

logger = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "d2ops-local",
    "AWS_SECRET_ACCESS_KEY": "d2ops-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Unset while the endpoint runs: a profile or session token would override the dummy keys.
_MASKED_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LocalS3:
    """A running local endpoint: where it listens and how to address a bucket on it."""

    host: str
    endpoint_url: str
    pid: int | None = None  # the server process, when it runs in one

    def uri(self, bucket: str, prefix: str = "") -> str:
        """``s3://127.0.0.1:PORT/bucket/prefix``: the URI form the storage layer reads as an endpoint."""
        return f"s3://{self.host}/{bucket}/{prefix.lstrip('/')}"


@contextmanager
def local_s3_endpoint(port: int = 0, *, in_process: bool = True, latency_ms: float = 0.0) -> Iterator[LocalS3]:
    """Run moto's S3 server on 127.0.0.1 for the duration of the block.

    ``port=0`` picks a free port. ``in_process=True`` serves from a thread of this process
    (fast to start; fine for tests); ``in_process=False`` starts a separate Python process so
    that clients measured against it do not share its interpreter lock (benchmarks).
    ``latency_ms`` (separate process only) delays every response, to mimic the time to first
    byte of a remote store; the delay is a sleep, so it costs the server no CPU.
    Dummy AWS credentials are set in ``os.environ`` meanwhile and the previous values restored.
    """
    if latency_ms and in_process:
        raise ValueError("latency_ms needs in_process=False: the delay is added by the server process")
    with _dummy_credentials():
        if in_process:
            with _threaded_server(port) as endpoint:
                yield endpoint
        else:
            with _subprocess_server(port or _free_port(), latency_ms) as endpoint:
                yield endpoint


@contextmanager
def _dummy_credentials() -> Iterator[None]:
    names = (*DUMMY_CREDENTIALS, *_MASKED_ENV)
    saved = {name: os.environ.get(name) for name in names}
    for name in _MASKED_ENV:
        os.environ.pop(name, None)
    os.environ.update(DUMMY_CREDENTIALS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _threaded_server(port: int) -> Iterator[LocalS3]:
    from moto.server import ThreadedMotoServer

    _quiet_request_log()
    server = ThreadedMotoServer(ip_address=LOCAL_HOST, port=port, verbose=False)
    server.start()
    host, bound_port = server.get_host_and_port()
    logger.debug("moto S3 server (thread) on %s:%d", host, bound_port)
    try:
        yield _endpoint(bound_port)
    finally:
        server.stop()


@contextmanager
def _subprocess_server(port: int, latency_ms: float) -> Iterator[LocalS3]:
    command = [sys.executable, "-m", "d2ops.storage.local_s3", "--port", str(port), "--quiet"]
    if latency_ms:
        command += ["--latency-ms", str(latency_ms)]
    # stderr goes to a file, not a pipe: a pipe nobody reads would block a chatty server.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=_child_env())
        endpoint = _endpoint(port, pid=process.pid)
        try:
            _wait_until_serving(endpoint.endpoint_url, process, stderr)
            logger.debug("moto S3 server (pid %d) on %s", process.pid, endpoint.host)
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _child_env() -> dict[str, str]:
    """This environment, with d2ops importable even when it is not installed."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{package_root}{os.pathsep}{path}" if path else package_root}


def _endpoint(port: int, pid: int | None = None) -> LocalS3:
    return LocalS3(host=f"{LOCAL_HOST}:{port}", endpoint_url=f"http://{LOCAL_HOST}:{port}", pid=pid)


def _free_port() -> int:
    """A port that was free a moment ago (the child binds it itself, so a race is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_HOST, 0))
        return int(sock.getsockname()[1])


def _wait_until_serving(url: str, process: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"moto S3 server exited with code {process.returncode}: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto S3 server did not answer on {url} within {_START_TIMEOUT_S:.0f}s")


def _quiet_request_log() -> None:
    """Werkzeug logs one line per request by default; that costs server time and floods output."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


class _Delayed:
    """WSGI middleware that sleeps before each request: a stand-in for network latency."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        time.sleep(self.seconds)
        return self.app(environ, start_response)


def main(argv: list[str] | None = None) -> None:
    """Serve a local S3 endpoint until interrupted (``python -m d2ops.storage.local_s3 --port 9000``)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay per response (fake network)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO, "%(message)s")
    _quiet_request_log()

    app: Any = DomainDispatcherApplication(create_backend_app)
    if args.latency_ms > 0:
        app = _Delayed(app, args.latency_ms / 1000)
    server = make_server(LOCAL_HOST, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    endpoint = _endpoint(server.server_address[1])
    logger.info("S3 endpoint %s (in memory; any key/secret is accepted)", endpoint.endpoint_url)
    logger.info(
        "use URIs like %s and, in clearml.conf, sdk.aws.s3.credentials: "
        '[{host: "%s", key: "any", secret: "any", multipart: false, secure: false}]',
        endpoint.uri("bucket", "prefix"),
        endpoint.host,
    )
    with suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
