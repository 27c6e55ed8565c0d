"""``d2ops serve``: a detectron2 model bundle behind HTTP (FastAPI + uvicorn).

Routes:

- ``POST /predict``: CVAT's nuclio contract, ``{"image": <base64>, "threshold": t}`` -> CVAT shapes
  (``{"images": [...]}`` -> one list per image);
- ``POST|PUT /predictions/{model_name}``: TorchServe's contract, raw image bytes or multipart files ->
  ``[{"<label>": [x1, y1, x2, y2], "score": s}]`` (several files -> one list per image);
- ``GET /health`` (alive), ``GET /ready`` (503 until the model is loaded), ``GET /metrics``
  (Prometheus), ``GET /v1/models`` (name, version, labels, metrics, source), ``GET /openapi.json``.

With ``D2OPS_SERVE_TOKEN`` set, every route but ``/health``, ``/ready`` and ``/metrics`` (what probes
and scrapers call, and which reveal nothing about the model or its inputs) needs
``Authorization: Bearer <token>``.

Client mistakes get a 4xx with ``{"error": "<what is wrong>"}``; a full queue, a full pixel budget or
work that could not finish before ``--request-timeout`` a 503 with Retry-After, at once; a request past
``--request-timeout`` a 504; anything unexpected is logged with its traceback and
answered ``{"error": "internal error"}`` (500).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import d2ops
from d2ops.model.bundle import InconsistentBundleError, ModelNotFoundError
from d2ops.serving.admission import Admission, NeverFits
from d2ops.serving.core import (
    MIB,
    DetectorAPI,
    LoadedModel,
    MicroBatcher,
    ModelHolder,
    ModelInfo,
    Overloaded,
    ServeSettings,
    SourceWatcher,
    load_model,
    load_settings,
)
from d2ops.serving.formats import BadImageError, UnsupportedFormatError, read_header
from d2ops.serving.service import check_frames
from d2ops.utils.device import machine_threads
from d2ops.utils.logs import setup_logging

__all__ = ["SETTINGS_ENV", "create_app", "create_app_from_env"]

log = logging.getLogger(__name__)

#: How ``serve_main`` hands the settings to uvicorn's worker processes (the token stays in its own variable).
SETTINGS_ENV = "D2OPS_SERVE_SETTINGS"
#: Reachable without the bearer token: liveness and readiness probes, the Prometheus scraper.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
PREDICT_PATHS = ("/predict", "/predictions/")
KNOWN_PATHS = frozenset({*OPEN_PATHS, "/predict", "/v1/models", "/openapi.json", "/docs", "/redoc"})


# -------------------------------------------------------------------------------------- API schema


class CvatRequest(BaseModel):
    """CVAT's nuclio detector request: one base64 image, or several under ``images``."""

    model_config = ConfigDict(extra="ignore")

    image: str | None = Field(None, description="base64 of a JPEG/PNG file (a data: URL prefix is accepted)")
    images: list[str] | None = Field(None, min_length=1, description="several base64 images: one reply list each")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="score threshold (a number, or a numeric string)"
    )

    @field_validator("threshold", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read true as 1.0
            raise ValueError("must be a number between 0 and 1, not true or false")
        return value

    @model_validator(mode="after")
    def _one_of_image_or_images(self) -> CvatRequest:
        if (self.image is None) == (self.images is None):
            raise ValueError("send exactly one of 'image' (a base64 string) or 'images' (a list of them)")
        return self


class CvatShape(BaseModel):
    confidence: str = Field(description="score, formatted with 4 decimals as CVAT expects")
    label: str
    points: list[float] = Field(description="[x1, y1, x2, y2] for a rectangle, x, y pairs for a polygon")
    type: Literal["rectangle", "polygon"]


TorchServeDetection = dict[str, list[float] | float]


class ErrorReply(BaseModel):
    error: str


class ModelList(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str
    model: str | None = None
    version: str | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorReply, "description": text}
    for code, text in {
        400: "bad image or request",
        401: "missing or wrong bearer token",
        413: "body over --max-body-size",
        415: "unsupported image format",
        422: "malformed request body",
        503: "model not loaded yet, queue full, pixel budget in use, or no time left to finish (see Retry-After)",
        504: "request timed out",
    }.items()
}

_TORCHSERVE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
        },
    }
}


# ------------------------------------------------------------------------------------------- metrics


class ServeMetrics:
    """Prometheus metrics of one app, on their own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("d2ops_requests", "HTTP requests by route and status", ["route", "method", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram(
            "d2ops_request_latency_seconds", "HTTP request latency", ["route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.errors = Counter("d2ops_errors", "error replies by route and kind", ["route", "kind"], registry=r)
        self.batch_size = Histogram("d2ops_batch_size", "images per forward pass", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128))  # fmt: skip
        self.batch_seconds = Histogram("d2ops_batch_seconds", "seconds per forward pass", registry=r)
        self.queue_depth = Gauge("d2ops_queue_depth", "images waiting for the model", registry=r)
        self.pixels_in_flight = Gauge("d2ops_pixels_in_flight", "pixels (from image headers) admitted, not yet "
                                      "answered; at most --max-pixels-in-flight", registry=r)  # fmt: skip
        self.seconds_per_image = Gauge("d2ops_seconds_per_image", "measured inference seconds per image, which "
                                       "admission estimates waits from", registry=r)  # fmt: skip
        self.reloads = Counter("d2ops_model_reloads", "model (re)loads by result", ["result"], registry=r)
        self.model_info = Gauge("d2ops_model_info", "the served model (value 1)", ["name", "version"], registry=r)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def served(self, loaded: LoadedModel) -> None:
        self.model_info.clear()
        self.model_info.labels(loaded.info.name, loaded.info.version).set(1)


# ----------------------------------------------------------------------------------------- middleware


def _json_reply(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes ({limit / MIB:g} MiB); send less")


class BodyTimedOut(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s (--body-timeout); "
                              "send it at once")  # fmt: skip


class BodyLimitMiddleware:
    """413 for a body over the limit: from Content-Length up front, else counted while it streams in.
    408 for a body still arriving ``body_timeout`` seconds after the app first asked for it (a slow client
    would otherwise hold its connection, and a worker's attention, for as long as it likes)."""

    def __init__(
        self, app: ASGIApp, max_body_size: int, body_timeout: float = 20.0, max_header_bytes: int = 64 * 1024
    ) -> None:
        self.app = app
        self.limit = max_body_size
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:  # uvicorn's httptools parser has no limit of its own
            message = f"request headers of {header_bytes} bytes are over the limit of {self.max_header_bytes}"
            return await _json_reply(431, message, {"Connection": "close"})(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _json_reply(413, BodyTooLarge(self.limit).detail)(scope, receive, send)
        seen = 0
        started = False
        complete = False
        deadline: float | None = None

        async def counting_receive() -> Message:
            nonlocal seen, complete, deadline
            if complete:
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise BodyTimedOut(self.body_timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except (BodyTooLarge, BodyTimedOut) as err:
            if started:
                raise
            headers = {"Connection": "close"} if isinstance(err, BodyTimedOut) else None
            await _json_reply(err.status_code, err.detail, headers)(scope, receive, send)


class AuthMiddleware:
    """Bearer-token check for every path but :data:`OPEN_PATHS`. The token is never logged."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
            reason = "missing bearer token" if not given else "wrong bearer token"
            reply = _json_reply(401, f"{reason}: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
            return await reply(scope, receive, send)
        await self.app(scope, receive, send)


class ObserveMiddleware:
    """Request count and latency by route template and status; counts predictions in progress."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, state: ServerState) -> None:
        self.app = app
        self.metrics = metrics
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        predicting = scope["path"].startswith(PREDICT_PATHS)
        self.state.active_predictions += predicting

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            self.state.active_predictions -= predicting
            route = getattr(scope.get("route"), "path", None) or _route_of(scope["path"])
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            if status >= 400:
                self.metrics.errors.labels(route, _error_kind(status)).inc()


def _route_of(path: str) -> str:
    """The route template for requests answered before routing (401, 413), else "other"."""
    if path.startswith("/predictions/"):
        return "/predictions/{model_name}"
    return path if path in KNOWN_PATHS else "other"


#: The status recorded for a request whose client left before it was answered (nginx's "client closed
#: request"); nothing is sent, the connection is gone.
CLIENT_CLOSED = 499


def _error_kind(status: int) -> str:
    kinds = {401: "unauthorized", 404: "not_found", 413: "too_large", 415: "unsupported_media", 422: "invalid",
             CLIENT_CLOSED: "client_disconnect", 503: "unavailable", 504: "timeout"}  # fmt: skip
    return kinds.get(status, "bad_request" if status < 500 else "internal")


# -------------------------------------------------------------------------------------------- state


class ServerState:
    """Everything one app instance owns: settings, API, model holder, batcher, metrics."""

    def __init__(self, settings: ServeSettings, api: DetectorAPI, on_fatal: Callable[[BaseException], None]) -> None:
        self.settings = settings
        self.api = api
        self.on_fatal = on_fatal
        self.metrics = ServeMetrics()
        self.holder = ModelHolder()
        self.active_predictions = 0
        self.closing = False
        self.extracted: list[str] = []  # bundle folders this server unzipped into the cache, oldest first
        self.batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000.0,
            max_queue_depth=settings.max_queue_depth,
            expected_arrivals=lambda: self.active_predictions,
            on_batch=self.metrics.on_batch,
        )
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        # Decoding is bounded twice: by threads (CPU) and by the pixels admitted and not yet answered (memory).
        self.decoder = ThreadPoolExecutor(
            settings.decode_threads or machine_threads(settings.workers or 1), thread_name_prefix="d2ops-decode"
        )
        self.admission = Admission(settings.max_pixels_in_flight, lambda: self.batcher.stats.seconds_per_image)
        self.metrics.pixels_in_flight.set_function(lambda: self.admission.pixels)
        self.metrics.seconds_per_image.set_function(lambda: self.batcher.stats.seconds_per_image)

    def _run_batch(self, images: list[Any], thresholds: list[float]) -> list[tuple[Any, str]]:
        """In the inference thread: one forward pass on the model current at the start of the batch."""
        loaded = self.holder.current
        assert loaded is not None, "batches only run once a model is loaded"
        detections = self.api.predict(loaded.detector, images, thresholds)
        return [(dets, loaded.info.version) for dets in detections]

    def install(self, loaded: LoadedModel) -> None:
        old = self.holder.swap(loaded)
        self.metrics.served(loaded)
        self.metrics.reloads.labels("success").inc()
        if old is not None:
            log.info("now serving version %s (was %s)", loaded.info.version, old.info.version)
        self._prune_cache(loaded.info.bundle)

    def _prune_cache(self, bundle: str | None) -> None:
        """With --watch on a zip, each version is unzipped into the cache: keep the current and the previous."""
        cache = Path(self.settings.cache_dir).resolve()
        if bundle is None or Path(bundle).resolve().parent != cache or bundle in self.extracted:
            return
        self.extracted.append(bundle)
        while len(self.extracted) > 2:
            stale = self.extracted.pop(0)
            shutil.rmtree(stale, ignore_errors=True)
            log.info("--watch: removed %s, two versions old, from the model cache", stale)

    async def load_initial(self) -> None:
        """Load the model in the background; with --watch, then keep polling the source."""
        watcher = SourceWatcher(self.settings.model) if self.settings.watch else None
        fingerprint = await self._fingerprint(watcher) if watcher is not None else None
        try:
            loaded = await asyncio.to_thread(load_model, self.api, self.settings)
            self.install(loaded)
        except Exception as err:
            self.metrics.reloads.labels("failure").inc()
            if watcher is None:
                if isinstance(err, ModelNotFoundError):  # the user can fix it: one line that says how
                    log.error("could not load %s; stopping: %s", self.settings.model, err)
                else:
                    log.exception("could not load %s; stopping", self.settings.model)
                self.on_fatal(err)
                return
            log.exception("could not load %s; still watching it for a loadable version", self.settings.model)
            await self.watch(watcher, None, fingerprint)
            return
        if watcher is not None:
            if not loaded.hashed:
                log.warning("--watch: %s records no sha256 of its files; a new version is swapped in only after its "
                            "files have stayed unchanged for --quiet-period %g s (bundles d2ops builds record them)",
                            watcher.ref, self.settings.quiet_period)  # fmt: skip
            await self.watch(watcher, fingerprint, None)

    async def watch(self, watcher: SourceWatcher, loaded: str | None, rejected: str | None) -> None:
        """Poll the source; once a new fingerprint has held still for one interval, load it and swap."""
        if not watcher.watchable:
            log.warning("--watch: %s is a fixed ClearML model id; nothing to watch", watcher.ref)
            return
        previous = loaded or rejected
        since = time.monotonic()  # when the source last changed, as far as the polls saw
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            current = await self._fingerprint(watcher)
            settled = current is not None and current == previous
            if not settled:
                since = time.monotonic()
            previous = current
            if not settled or current in (loaded, rejected):
                continue
            outcome = await self._reload(watcher, current, since)
            if outcome == "loaded":
                loaded = current
            elif outcome == "rejected":
                rejected = current
            else:  # changed while loading or waiting: the quiet period starts again
                since = time.monotonic()

    async def _fingerprint(self, watcher: SourceWatcher) -> str | None:
        try:
            return await asyncio.to_thread(watcher.fingerprint)
        except Exception as err:
            log.warning("--watch: cannot poll %s: %s", watcher.ref, err)
            return None

    async def _reload(
        self, watcher: SourceWatcher, fingerprint: str | None, since: float
    ) -> Literal["loaded", "rejected", "retry"]:
        log.info("--watch: %s changed; loading the new version", watcher.ref)

        try:
            loaded = await asyncio.to_thread(load_model, self.api, self.settings)
        except InconsistentBundleError as err:  # mid-replacement: the next change will complete it
            log.warning("--watch: %s; the old version keeps serving", err)
            return "rejected"
        except ModelNotFoundError as err:  # the new version is refused (e.g. its graph fails the load check)
            self.metrics.reloads.labels("failure").inc()
            log.error("--watch: the new version of %s is refused; the old one keeps serving: %s", watcher.ref, err)
            return "rejected"
        except Exception:
            self.metrics.reloads.labels("failure").inc()
            log.exception("--watch: the new version of %s does not load; the old one keeps serving", watcher.ref)
            return "rejected"
        if not loaded.hashed:
            # Nothing records what the complete bundle is: only files that stay unchanged for the quiet period,
            # and are still the ones hashed at load, show that a file-by-file replacement has finished.
            wait = self.settings.quiet_period - (time.monotonic() - since)
            if wait > 0:
                log.info("--watch: %s records no sha256s; swapping it in if its files stay unchanged %.1f s more",
                         watcher.ref, wait)  # fmt: skip
                await asyncio.sleep(wait)
            if not await asyncio.to_thread(watcher.still_matches, loaded):
                log.info("--watch: %s changed since it was loaded; retrying at the next poll", watcher.ref)
                return "retry"
        if await self._fingerprint(watcher) != fingerprint:
            log.info("--watch: %s changed again while loading; retrying at the next poll", watcher.ref)
            return "retry"
        current = self.holder.current
        if current is None or current.info.version != loaded.info.version:
            self.install(loaded)
        return "loaded"


# ------------------------------------------------------------------------------------------- the app


def create_app(
    settings: ServeSettings,
    *,
    api: DetectorAPI | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The FastAPI app for ``settings``; the model loads in the background once the app has started."""
    api = api or DetectorAPI(
        device=settings.device,
        max_pixels=settings.max_pixels,
        inference_pixels=settings.max_inference_pixels,
        cvat_shape=settings.cvat_shape,
        runtime=settings.runtime,
        threads=settings.threads or machine_threads(settings.workers or 1),
    )
    state = ServerState(settings, api, on_fatal or (lambda err: None))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        loader = asyncio.create_task(state.load_initial(), name="d2ops-model-loader")
        yield
        state.closing = True
        loader.cancel()
        await state.batcher.stop(drain_timeout=settings.request_timeout)
        state.decoder.shutdown(wait=False, cancel_futures=True)
        log.info("batcher drained; shut down")

    app = FastAPI(
        title="d2ops detector",
        version=_package_version(),
        summary="A detectron2 model bundle behind the CVAT nuclio and TorchServe contracts",
        lifespan=lifespan,
    )
    app.state.serving = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_size=settings.max_body_size,
        body_timeout=settings.body_timeout,
        max_header_bytes=settings.max_header_bytes,
    )
    if settings.token is not None:
        app.add_middleware(AuthMiddleware, token=settings.token.get_secret_value())
    app.add_middleware(ObserveMiddleware, metrics=state.metrics, state=state)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn's factory for ``--workers N``: each worker process rebuilds the app from the environment."""
    setup_logging()
    return create_app(load_settings(json.loads(os.environ[SETTINGS_ENV])))


def _package_version() -> str:

    return d2ops.__version__


def _add_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's 400 for a JSON body cut short
            return await client_left(request, exc.__cause__)
        return _json_reply(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    async def client_left(request: Request, exc: Exception) -> Response:
        log.info("the client left %s %s before its request body arrived", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED)  # uvicorn drops it: only the metrics see it

    async def invalid_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]  # fmt: skip
        content = {"error": "invalid request: " + _summarise(errors), "detail": errors}
        return JSONResponse(content, status_code=422)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_reply(500, "internal error")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_left)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)


def _summarise(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
        if e["type"] == "missing" and where == "body":
            parts.append('the request body is empty; send JSON like {"image": "<base64>"}')
        elif e["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON ({e['msg']})")
        else:
            parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def _check_ready(state: ServerState) -> LoadedModel:
    if state.closing:
        raise HTTPException(503, "the server is shutting down", {"Retry-After": "1"})
    loaded = state.holder.current
    if loaded is None:
        raise HTTPException(503, "the model is still loading; retry shortly (see GET /ready)", {"Retry-After": "2"})
    return loaded


def _check_request_bounds(state: ServerState, data: Sequence[bytes]) -> list[int]:
    """Before any pixel is decoded: the request's image count and its pixels (from the headers), which it returns.

    A request that can never fit gets 413 with what to change; one that only has to wait gets 503.
    """

    s = state.settings
    limit = min(s.max_request_images, s.max_queue_depth)
    if len(data) > limit:
        raise HTTPException(413, f"{len(data)} images in one request; this server takes at most {limit} "
                                 "(--max-request-images, --max-queue-depth): split the request")  # fmt: skip
    pixels = [read_header(d, max_pixels=s.max_pixels).pixels for d in data]
    total = sum(pixels)
    if total > s.max_request_pixels:
        raise HTTPException(413, f"the request's images hold {total} pixels; this server takes at most "
                                 f"{s.max_request_pixels} per request (--max-request-pixels): send fewer or "
                                 "smaller images per request")  # fmt: skip
    if state.batcher.depth + len(data) > s.max_queue_depth:
        raise Overloaded(
            f"server overloaded: {state.batcher.depth} images already waiting (queue depth {s.max_queue_depth})",
            retry_after=state.batcher.retry_after(),
        )
    return pixels


async def _infer(state: ServerState, payloads: Sequence[bytes | str], threshold: float | None) -> list[tuple[Any, str]]:
    """Bound, admit, decode, queue for the batcher and wait: 400/415 bad image, 413 too much, 503 overloaded or
    no time left, 504 late. Headers are read in a thread, admission (the pixel budget and the deadline estimate,
    :class:`~d2ops.serving.admission.Admission`) runs on the loop, and only admitted images are decoded, on the
    bounded decode pool."""

    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.request_timeout
    loaded = _check_ready(state)
    which = "" if len(payloads) == 1 else " (one of the images)"

    def read() -> tuple[list[bytes], list[int]]:
        data = [state.api.payload_bytes(p) for p in payloads]
        return data, _check_request_bounds(state, data)

    def decode(data: list[bytes]) -> list[Any]:
        frames = [state.api.decode_request(d) for d in data]
        check_frames(loaded.detector, frames)  # the model's own limits, as every front end checks them
        return frames

    try:
        data, pixels = await asyncio.to_thread(read)  # not behind decodes: a refusal comes at once
        ticket = state.admission.admit(pixels, deadline - loop.time())
        try:
            images = await loop.run_in_executor(state.decoder, decode, data)
            del data
            return await _predict(state, images, threshold, deadline, which)
        finally:
            state.admission.release(ticket)
    except BadImageError as err:
        status = 415 if isinstance(err, UnsupportedFormatError) else 400
        raise HTTPException(status, f"{err}{which}") from None
    except NeverFits as err:
        raise HTTPException(413, str(err)) from None
    except Overloaded as err:
        raise HTTPException(503, str(err), {"Retry-After": str(err.retry_after)}) from None


async def _predict(
    state: ServerState, images: list[Any], threshold: float | None, deadline: float, which: str
) -> list[tuple[Any, str]]:
    """Queue decoded images for the batcher and wait for their results; every failure becomes an HTTP error."""
    threshold = state.settings.threshold if threshold is None else threshold
    try:
        return await state.batcher.submit(images, [threshold] * len(images), deadline)
    except Overloaded as err:
        raise HTTPException(503, str(err), {"Retry-After": str(err.retry_after)}) from None
    except asyncio.TimeoutError:
        raise HTTPException(
            504, f"no result within --request-timeout {state.settings.request_timeout:g} s; retry later"
        ) from None
    except ValueError as err:  # the model refused this image (input_problem): only this request fails
        raise HTTPException(400, f"{err}{which}") from None
    except Exception:
        log.exception("inference failed")
        raise HTTPException(500, "internal error") from None


def _version_header(results: Sequence[tuple[Any, str]]) -> dict[str, str]:
    return {"X-Model-Version": results[-1][1]} if results else {}


async def _read_images(request: Request) -> list[bytes]:
    """TorchServe's inputs: every file of a multipart form, else the raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(400, "the multipart form has no file; send the image as a file, e.g. -F data=@img")
        return [await f.read() for f in files]
    body = await request.body()
    if not body:
        raise HTTPException(400, "empty body: send the image bytes (e.g. curl --data-binary @img.jpg)")
    return [body]


def _add_routes(app: FastAPI, state: ServerState) -> None:
    name = state.settings.served_name

    @app.get("/health", response_model=Status, response_model_exclude_none=True, tags=["probes"])
    async def health() -> Status:
        """Alive: 200 while the process serves HTTP."""
        return Status(status="alive")

    @app.get("/ready", response_model=Status, responses={503: _ERRORS[503]}, tags=["probes"])
    async def ready() -> Response:
        """Ready: 200 once the model is loaded (and not shutting down), else 503."""
        loaded = state.holder.current
        if loaded is None or state.closing:
            status = "shutting down" if state.closing else "loading"
            return JSONResponse({"error": f"not ready: {status}", "status": status}, 503, {"Retry-After": "2"})
        return JSONResponse(Status(status="ready", model=loaded.info.name, version=loaded.info.version).model_dump())

    @app.get("/metrics", response_class=Response, tags=["probes"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})  # fmt: skip
    async def metrics() -> Response:
        """Prometheus metrics of this worker process."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses={503: _ERRORS[503]}, tags=["models"])
    async def models() -> ModelList:
        """The served model: name, version, labels, metrics and source, from the bundle."""
        loaded = _check_ready(state)
        # Without a token anyone can ask: paths and storage URIs stay private then.
        return ModelList(models=[loaded.info if state.settings.token is not None else loaded.info.public()])

    @app.post(
        "/predict",
        response_model=list[CvatShape] | list[list[CvatShape]],
        responses=_ERRORS,
        tags=["predict"],
    )
    async def predict_cvat(body: CvatRequest) -> Response:
        """CVAT nuclio contract: shapes for ``image``, or one list of shapes per entry of ``images``."""
        payloads = [body.image] if body.image is not None else list(body.images or [])
        results = await _infer(state, payloads, body.threshold)
        replies = [state.api.encode_response(dets, "cvat") for dets, _ in results]
        content = replies[0] if body.image is not None else replies
        return JSONResponse(content, headers=_version_header(results))

    async def predict_torchserve(
        model_name: str,
        request: Request,
        threshold: Annotated[float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False)] = None,
    ) -> Response:
        """TorchServe contract: raw image bytes or multipart file(s); several files, one list each."""
        if model_name != name:
            raise HTTPException(404, f"unknown model {model_name!r}: this server serves {name!r}")
        payloads = await _read_images(request)
        results = await _infer(state, payloads, threshold)
        replies = [state.api.encode_response(dets, "torchserve") for dets, _ in results]
        return JSONResponse(replies[0] if len(replies) == 1 else replies, headers=_version_header(results))

    for method in ("POST", "PUT"):  # TorchServe takes both (``curl -T img`` sends a PUT)
        app.add_api_route(
            "/predictions/{model_name}",
            predict_torchserve,
            methods=[method],
            operation_id=f"predictions_{method.lower()}",
            response_model=list[TorchServeDetection] | list[list[TorchServeDetection]],
            responses={**_ERRORS, 404: {"model": ErrorReply, "description": "no such model"}},
            openapi_extra=_TORCHSERVE_BODY,
            tags=["predict"],
        )


# ------------------------------------------------------------------------------------------------ CLI
