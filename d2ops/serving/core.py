"""The serving core behind ``d2ops serve``: settings, the detector API, the micro-batcher, hot swap.

The HTTP layer (:mod:`d2ops.serving.http`) is a thin FastAPI shell over four parts that know nothing of HTTP:

- :class:`ServeSettings`: every knob, validated once, with errors that name the option and the fix.
- :class:`DetectorAPI`: the model-facing lifecycle in LitServe's shape: ``setup`` loads a bundle,
  ``decode_request`` turns a payload into an image, ``predict`` runs one forward pass over a batch,
  ``encode_response`` writes one of the wire contracts. Subclass it to change any one step.
- :class:`MicroBatcher`: concurrent requests meet in one asyncio queue; a single inference thread runs
  one ``predict`` per batch of up to ``max_batch_size`` images and fans the results back out.
- :class:`ModelHolder` and :class:`SourceWatcher`: the served model, swapped atomically when the watched
  source (a bundle folder or zip, an ``s3://`` prefix, a ``clearml://`` query) publishes a new version.

torch and detectron2 are imported lazily (in ``setup``), so the server answers ``/health`` and
``/ready`` (503) while the model is still loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from d2ops.model.bundle import InconsistentBundleError, ModelBundle, ModelNotFoundError
from d2ops.model.detector import Detector
from d2ops.model.source import model_registry, parse_model_ref, resolve_model
from d2ops.serving.formats import base64_bytes, decode_frame
from d2ops.serving.replies import cvat_label_type, to_cvat, to_torchserve
from d2ops.serving.service import load_detector
from d2ops.utils.device import machine_replicas, resolve_device

if TYPE_CHECKING:
    from d2ops.model.detector import Detection, Detector, Frame

__all__ = [
    "TOKEN_ENV",
    "DetectorAPI",
    "LoadedModel",
    "MicroBatcher",
    "ModelHolder",
    "ModelInfo",
    "Overloaded",
    "ServeSettings",
    "ServeSettingsError",
    "SourceWatcher",
    "default_model_name",
    "load_model",
    "load_settings",
]

log = logging.getLogger(__name__)

#: The bearer token every protected route requires, when set. Read from the environment only.
TOKEN_ENV = "D2OPS_SERVE_TOKEN"
MIB = 1024 * 1024
Contract = Literal["cvat", "torchserve"]


# --------------------------------------------------------------------------------------------- settings


class ServeSettingsError(ValueError):
    """A serving option is invalid; the message names each bad option and what is allowed."""


class ServeSettings(BaseModel):
    """Everything ``d2ops serve`` can be told. Times are seconds unless the name says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="bundle folder or zip, s3:// URI, ClearML model id or clearml://")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="served model name")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="model replicas, one worker process each (default: from the machine, "
        "d2ops.utils.device.machine_replicas: one per 4 CPUs the process may use, one on CUDA)",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    runtime: Literal["auto", "pytorch", "torchscript", "onnx", "openvino"] = Field(
        "auto",
        description="auto: the fastest the bundle has for the device, by the speeds its exports measured "
        "(d2ops export adds runtimes)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="intra-op threads per worker (default: the CPUs this process may use / workers)",
    )
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="default score threshold")
    cvat_shape: Literal["mask", "polygon"] = Field("mask", description="a segmenting model's CVAT shapes")
    max_batch_size: int = Field(8, ge=1, le=1024, description="1 disables micro-batching")
    max_batch_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    max_queue_depth: int = Field(64, ge=1, description="images waiting for the model; beyond it: 503")
    request_timeout: float = Field(30.0, gt=0.0, le=3600.0, description="seconds; beyond it: 504")
    max_body_size: int = Field(32 * MIB, ge=1024, description="bytes; beyond it: 413")
    max_pixels: int = Field(60_000_000, ge=1, description="per image; larger images are refused (bombs)")
    max_inference_pixels: int = Field(
        12_000_000, ge=10_000, description="larger frames are decoded reduced for inference; shapes are mapped back"
    )
    max_request_images: int = Field(16, ge=1, description="images in one request; beyond it: 413")
    max_request_pixels: int = Field(
        120_000_000, ge=1, description="pixels of all images of one request (from their headers); beyond it: 413"
    )
    max_pixels_in_flight: int = Field(
        120_000_000,
        ge=1,
        description="pixels (from the headers) of all images a worker has admitted and not yet answered (about "
        "10 bytes each at most: 1.2 GB by default); a request beyond it: 503 with Retry-After, one over it alone: 413",
    )
    decode_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="threads decoding images, per worker (default: the CPUs this process may use / workers)",
    )
    body_timeout: float = Field(20.0, gt=0.0, le=3600.0, description="seconds to receive a request body; then 408")
    keep_alive_timeout: float = Field(5.0, gt=0.0, le=600.0, description="seconds an idle connection stays open")
    max_header_bytes: int = Field(64 * 1024, ge=4096, description="request line and headers; beyond it "
                                  "431 and the connection closes")  # fmt: skip
    header_timeout: float = Field(10.0, gt=0.0, le=600.0, description="seconds a connection may take to send "
                                  "a request head, from opening or its last response; then 408 and close")  # fmt: skip
    max_connections: int = Field(1000, ge=1, description="open connections per worker; beyond it the connection "
                                 "waiting longest for a request head is closed")  # fmt: skip
    http: Literal["auto", "httptools", "h11"] = Field("auto", description="uvicorn's HTTP parser (auto: httptools "
                                                      "when installed); the limits hold with either")  # fmt: skip
    watch: bool = False
    poll_interval: float = Field(30.0, gt=0.0, description="seconds between polls of the source with watch")
    quiet_period: float = Field(
        60.0,
        ge=0.0,
        le=86_400.0,
        description="--watch: seconds a bundle without recorded sha256s must stay unchanged before it is swapped in",
    )
    cache_dir: Path = Path("outputs/cache/models")
    access_log: bool = True
    token: SecretStr | None = Field(None, description=f"bearer token; set it through {TOKEN_ENV}")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @property
    def replicas(self) -> int:
        """``workers``, else what the machine gives the device (:func:`~d2ops.utils.device.machine_replicas`)."""
        if self.workers is not None:
            return self.workers
        return machine_replicas(resolve_device(self.device))

    @property
    def served_name(self) -> str:
        """The name clients use in ``/predictions/{name}`` and see in ``/v1/models``."""
        return self.name or default_model_name(self.model)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "settings"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        lines.append(f"--{key.replace('_', '-')}: {e['msg']}{got}")
    return "invalid serve settings:\n  " + "\n  ".join(lines)


def load_settings(values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Validate ``values`` (CLI options) into settings; the token comes from ``environ`` only."""
    environ = os.environ if environ is None else environ
    values = {k: v for k, v in values.items() if k != "token"}
    token = environ.get(TOKEN_ENV)
    try:
        return ServeSettings(**values, token=SecretStr(token) if token else None)
    except ValidationError as err:
        raise ServeSettingsError(_describe(err)) from None


def default_model_name(ref: str) -> str:
    """A served name from the model reference: the bundle folder or zip name, or the ClearML name."""

    parsed = parse_model_ref(ref)
    if parsed.kind == "clearml_query" and parsed.name:
        raw = parsed.name
    else:
        raw = ref.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zip") or "model"
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in raw).lstrip("._-")
    return cleaned or "model"


# ------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` says about the served model (from the bundle's metadata and metrics)."""

    name: str
    version: Annotated[str, Field(description="content hash of the bundle")]
    labels: list[str]
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    source: str | None
    bundle: str | None
    device: str
    loaded_at: str
    label_type: str = "rectangle"
    runtime: str = "pytorch"

    def public(self) -> ModelInfo:
        """What anyone may see when the server has no token: no filesystem paths, no storage URIs."""
        return replace(self, source=None, bundle=None, metadata=_without_locations(self.metadata))


def _without_locations(value: Any) -> Any:
    """``value`` with every string that names a file or storage location (``/...``, ``s3://...``) dropped."""
    if isinstance(value, dict):
        return {k: _without_locations(v) for k, v in value.items() if not _is_location(v)}
    if isinstance(value, list):
        return [_without_locations(v) for v in value if not _is_location(v)]
    return value


def _is_location(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~", "file:")) or "://" in value)


@dataclass(frozen=True)
class LoadedModel:
    """A detector and its description; replaced as a whole on a hot swap."""

    detector: Detector
    info: ModelInfo
    #: Whether metadata.json recorded each file's sha256 (and the files matched them); else ``files`` is what
    #: the files were at load, for the watcher to compare the source with after a quiet period.
    hashed: bool = True
    files: Mapping[str, str] = field(default_factory=dict)


def bundle_version(bundle_dir: Path) -> str:
    """The bundle's content hash (:meth:`~d2ops.model.bundle.ModelBundle.version`)."""

    return ModelBundle(bundle_dir).version()


class DetectorAPI:
    """The model side of the server, one overridable method per lifecycle step (LitServe's shape).

    ``setup`` once per model (and again on every hot swap); then, per image, ``decode_request``
    in a request's task, ``predict`` for a whole batch in the inference thread, and
    ``encode_response`` back in the request's task.
    """

    def __init__(
        self,
        device: str = "auto",
        max_pixels: int = 60_000_000,
        inference_pixels: int = 12_000_000,
        cvat_shape: str = "mask",
        runtime: str = "auto",
        threads: int | None = None,
    ) -> None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive pixel count, got {max_pixels}")
        if device != "auto" and device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
        self.device = device
        self.max_pixels = max_pixels
        self.inference_pixels = inference_pixels
        self.cvat_shape = cvat_shape
        self.runtime = runtime
        self.threads = threads

    def setup(self, bundle_dir: Path) -> Detector:
        """Load the detector from a bundle folder on the asked runtime (imports torch and detectron2 on first use)."""

        return load_detector(bundle_dir, device=self.device, runtime=self.runtime, threads=self.threads)

    def payload_bytes(self, payload: bytes | str) -> bytes:
        """The image file's bytes: raw, or from a base64 string (CVAT); raises ``BadImageError``."""

        return base64_bytes(payload) if isinstance(payload, str) else payload

    def decode_request(self, payload: bytes | str) -> Frame:
        """Raw image bytes or a base64 string (CVAT) into a frame for the model; raises ``BadImageError``."""

        data = self.payload_bytes(payload)
        return decode_frame(data, max_pixels=self.max_pixels, inference_pixels=self.inference_pixels)

    def predict(
        self, detector: Detector, images: Sequence[Frame], thresholds: Sequence[float]
    ) -> list[list[Detection]]:
        """One forward pass over the batch; each image keeps its own request's score threshold."""
        results = detector.predict(images, score_threshold=min(thresholds, default=0.0))
        return [[d for d in dets if d.score >= t] for dets, t in zip(results, thresholds, strict=True)]

    def encode_response(self, detections: Sequence[Detection], contract: Contract) -> list[dict[str, Any]]:
        """One image's detections in the CVAT nuclio or the TorchServe reply format."""

        return to_cvat(detections, self.cvat_shape) if contract == "cvat" else to_torchserve(detections)


def load_model(api: DetectorAPI, settings: ServeSettings) -> LoadedModel:
    """Resolve ``settings.model`` to a local bundle (downloading as needed) and set it up."""

    bundle = resolve_model(settings.model, settings.cache_dir)
    started = time.perf_counter()
    # Load a private copy whose files match the sha256s its metadata.json records: a bundle folder being
    # replaced file by file (labels first, weights later) is never loaded half old, half new.
    with tempfile.TemporaryDirectory(prefix="d2ops-load-") as tmp:
        snapshot = ModelBundle.open(bundle, settings.model).copy_to(Path(tmp) / "bundle")
        try:
            snapshot.verify()
        except InconsistentBundleError as err:
            raise InconsistentBundleError(str(err).replace(str(snapshot.path), str(bundle))) from None
        # Without recorded sha256s nothing shows a half-replaced bundle: hash what was copied, so the watcher can
        # swap it in only once the source's files still match after a quiet period (ServerState.watch).
        hashed = snapshot.hashed
        files = {} if hashed else snapshot.hashes()
        try:
            detector = api.setup(snapshot.path)  # an exported graph must still give its export's recorded outputs
        except ModelNotFoundError as err:
            raise type(err)(str(err).replace(str(snapshot.path), str(bundle))) from None
        info = ModelInfo(
            name=settings.served_name,
            version=snapshot.version(),
            labels=list(detector.labels),
            metrics=snapshot.metrics(),
            metadata=snapshot.metadata(),
            source=settings.model,
            bundle=str(bundle),
            device=str(detector.cfg.MODEL.DEVICE),
            loaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            label_type=cvat_label_type(snapshot.segments(), settings.cvat_shape),
            runtime=detector.runtime_name,
        )
    log.info("model %s version %s loaded from %s on %s (%d threads) in %.1f s", info.name, info.version, bundle,
             info.runtime, detector.threads, time.perf_counter() - started)  # fmt: skip
    return LoadedModel(detector, info, hashed=hashed, files=files)


class ModelHolder:
    """The served model. Readers take ``current`` once per batch; ``swap`` replaces it atomically."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Serve ``new`` from the next batch on; batches already running finish on the old model."""
        with self._lock:
            old, self._current = self._current, new
        return old


# ------------------------------------------------------------------------------------------- watching


class SourceWatcher:
    """A cheap fingerprint of the model source, to notice a new version without downloading it.

    - bundle folder: the folder's inode and each file's inode, size, mtime and ctime (an atomic replace changes the
      inode; ctime changes on every write, also one that restores the mtime, as ``cp -p`` and ``rsync -t`` do);
    - bundle zip: its inode, size and mtime;
    - ``s3://``: the listed keys, ETags and sizes;
    - ``clearml://project/name[@tag]``: the id of the newest published model with that name and tag;
    - a ClearML model id never changes, so there is nothing to watch (``fingerprint`` returns None).
    """

    def __init__(self, ref: str) -> None:

        self.ref = ref
        self.parsed = parse_model_ref(ref)

    @property
    def watchable(self) -> bool:
        return self.parsed.kind != "clearml_id"

    def fingerprint(self) -> str | None:
        kind = self.parsed.kind
        if kind == "path":
            return self._path_fingerprint(Path(self.ref).expanduser())
        if kind == "s3":
            return self._s3_fingerprint()
        if kind == "clearml_query":
            return self._clearml_fingerprint()
        return None

    @staticmethod
    def _path_fingerprint(path: Path) -> str:
        st = path.stat()
        parts = [f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"]
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file():
                    cs = child.stat()
                    parts.append(f"{child.name}:{cs.st_ino}:{cs.st_size}:{cs.st_mtime_ns}:{cs.st_ctime_ns}")
        return "|".join(parts)

    def still_matches(self, loaded: LoadedModel) -> bool:
        """Whether a bundle folder source still holds the files ``loaded`` was hashed from at load.

        What shows an unhashed bundle complete: after a quiet period its files are still the ones loaded. Other
        sources are one object (a zip) or listed with their content hashes (S3 ETags): their fingerprint says it.
        """
        if self.parsed.kind != "path" or not Path(self.ref).expanduser().is_dir() or not loaded.files:
            return True
        try:  # the folder the bundle was found in (the source, or its one bundle subfolder)
            return ModelBundle(Path(loaded.info.bundle or self.ref)).hashes() == dict(loaded.files)
        except (OSError, ModelNotFoundError):  # a file vanished or metadata.json is half written: not stable
            return False

    def _s3_fingerprint(self) -> str:
        # lazy: boto3; only an s3:// model source needs it
        from d2ops.storage import s3 as storage

        loc = storage.parse_s3_uri(self.ref)
        remotes, _ = storage.list_remote(storage.make_s3_client(loc), loc)
        return storage.dataset_identity([r.info for r in remotes])

    def _clearml_fingerprint(self) -> str | None:

        return model_registry().newest_id(self.parsed)


# ------------------------------------------------------------------------------------------- batching


class Overloaded(Exception):
    """The queue is full (or the server is shutting down); retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Item:
    image: Any
    threshold: float
    deadline: float
    future: asyncio.Future[Any]


@dataclass
class BatchStats:
    """Running numbers the metrics and the Retry-After estimate read."""

    batches: int = 0
    images: int = 0
    ewma_batch_seconds: float = 0.0
    sizes: list[int] = field(default_factory=list)  # the last few batch sizes, for tests and logs
    #: the last few batches' seconds over their sizes, each with the wait since the batch before it when images
    #: were waiting: the wall time the server takes per image under load
    image_seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float:
        """The median of the last few batches' seconds per image (0 before the first): what admission estimates
        waits from. A median, so the first batch after a load (slow: lazy initialisation) soon stops counting."""
        return statistics.median(self.image_seconds) if self.image_seconds else 0.0


RunBatch = Callable[[list[Any], list[float]], list[Any]]


class MicroBatcher:
    """Server-side dynamic batching: one asyncio queue, one inference thread, one forward pass per batch.

    A collector task takes the first waiting image, then gathers more until ``max_batch_size`` or
    ``max_wait_s`` has passed, and hands the batch to ``run_batch`` on a single worker thread. While
    that batch runs, new images queue up, so under load batches fill without waiting. The wait is
    skipped when no other request is on its way (``expected_arrivals``), so a lone client pays no
    batching latency. ``max_batch_size=1`` disables batching.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        max_queue_depth: int = 64,
        expected_arrivals: Callable[[], int] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (1 disables batching), got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s}")
        if max_queue_depth < 1:
            raise ValueError(f"max_queue_depth must be >= 1, got {max_queue_depth}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_depth = max_queue_depth
        self.expected_arrivals = expected_arrivals or (lambda: 0)
        self.on_batch = on_batch
        self.stats = BatchStats()
        self.requests_inside = 0  # submit() calls waiting for their results
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._collector: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._backlog_since: float | None = None  # when the last batch ended with images still waiting

    @property
    def depth(self) -> int:
        """Images waiting for the model (not counting the batch that is running)."""
        return self._queue.qsize()

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2ops-infer")
        self._collector = asyncio.create_task(self._collect_forever(), name="d2ops-batcher")

    async def stop(self, drain_timeout: float = 60.0) -> None:
        """Refuse new work, let queued and running batches finish, then stop the worker thread."""
        self._closing = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), drain_timeout)
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _drained(self) -> None:
        while not self._queue.empty() or not self._idle.is_set():
            await asyncio.sleep(0.01)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: a hint for the client's Retry-After."""
        batches_ahead = math.ceil((self.depth + 1) / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self.stats.ewma_batch_seconds))

    async def submit(self, images: Sequence[Any], thresholds: Sequence[float], deadline: float) -> list[Any]:
        """Queue every image of one request (all or none) and wait for their results.

        Raises :class:`Overloaded` when they do not fit in the queue, ``TimeoutError`` at ``deadline``
        (the event loop's clock).
        """
        if self._closing:
            raise Overloaded("the server is shutting down", retry_after=1)
        if self.depth + len(images) > self.max_queue_depth:
            raise Overloaded(
                f"server overloaded: {self.depth} images already waiting (queue depth {self.max_queue_depth})",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        items = [_Item(img, thr, deadline, loop.create_future()) for img, thr in zip(images, thresholds, strict=True)]
        for item in items:
            self._queue.put_nowait(item)
        self._arrived.set()
        self.requests_inside += 1
        try:
            remaining = deadline - loop.time()
            return await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), max(remaining, 0.0))
        finally:
            self.requests_inside -= 1
            for item in items:
                if not item.future.done():
                    item.future.cancel()  # the collector skips cancelled items

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            if batch:
                await self._run(loop, batch)

    def _live(self, item: _Item, now: float) -> bool:
        return not item.future.done() and now < item.deadline

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        first = await self._queue.get()
        self._idle.clear()
        batch = [first] if self._live(first, loop.time()) else []
        wait_until = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = wait_until - loop.time()
                if remaining <= 0 or not batch or self.expected_arrivals() - self.requests_inside <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            if self._live(item, loop.time()):
                batch.append(item)
        if not batch:  # only expired or cancelled images were waiting: the next batch starts from idle
            self._idle.set()
            self._backlog_since = None
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        assert self._executor is not None, "start() the batcher before submitting"
        started = time.perf_counter()
        # With images waiting, the time from the last batch's end to this one's start is part of serving them
        # (gathering the batch, an event loop busy with other requests): admission's estimate counts it.
        gap = 0.0 if self._backlog_since is None else started - self._backlog_since
        images, thresholds = [i.image for i in batch], [i.threshold for i in batch]
        try:
            outputs = await loop.run_in_executor(self._executor, self.run_batch, images, thresholds)
        except Exception as err:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(err)
            else:  # one image may have broken the batch: run each alone, so only its own request fails
                log.warning("a batch of %d images failed (%s); running them one by one", len(batch), err)
                for item in batch:
                    await self._run_one(loop, item)
        else:
            for item, out in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(out)
        finally:
            ended = time.perf_counter()
            self._record(len(batch), ended - started, gap)
            self._backlog_since = None if self._queue.empty() else ended
            if self._queue.empty():
                self._idle.set()

    async def _run_one(self, loop: asyncio.AbstractEventLoop, item: _Item) -> None:
        assert self._executor is not None
        if item.future.done():
            return
        try:
            output = await loop.run_in_executor(self._executor, self.run_batch, [item.image], [item.threshold])
        except Exception as err:
            if not item.future.done():
                item.future.set_exception(err)
        else:
            if not item.future.done():
                item.future.set_result(output[0])

    def _record(self, size: int, seconds: float, gap: float = 0.0) -> None:
        s = self.stats
        s.batches += 1
        s.images += size
        s.ewma_batch_seconds = seconds if s.batches == 1 else 0.8 * s.ewma_batch_seconds + 0.2 * seconds
        s.sizes = [*s.sizes[-99:], size]
        s.image_seconds = [*s.image_seconds[-15:], (gap + seconds) / max(size, 1)]
        if self.on_batch is not None:
            self.on_batch(size, seconds)
