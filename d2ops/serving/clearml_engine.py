"""Serve d2ops bundles with clearml-serving: the custom engine (``custom`` or ``custom_async``).

``clearml-serving model add --engine custom_async --preprocess d2ops/serving/clearml_engine.py`` (what
``d2ops serving register`` runs, see :mod:`d2ops.clearml.serving`) uploads this file; every inference
container loads it with ``importlib`` as a standalone module, so it imports d2ops absolutely: the
container needs d2ops and detectron2 installed (``docker/Dockerfile.clearml-serving``). It creates one
:class:`Preprocess` per process and calls, as ``clearml_serving/serving/preprocess_service.py``
(``BasePreprocessRequest._instantiate_custom_preprocess_cls``) and ``model_request_processor.py``
(``ModelRequestProcessor._process_request``) do:

1. ``load(local_file_name)`` once, with ``Model(model_id).get_local_copy()``: the bundle folder
   (d2ops registers bundles as packages, so ClearML extracts them) or the bundle zip;
2. per request ``preprocess(body, state, fn)``, ``process(data, state, fn)``, ``postprocess(data, state, fn)``,
   with a fresh ``state`` dict and ``fn`` either ``None`` or a callable that takes a dict of custom statistics.

With ``--engine custom`` the three run synchronously on the worker's event loop, so one slow image
holds every other request of that worker. With ``--engine custom_async``
(``CustomAsyncPreprocessRequest``) clearml-serving awaits them: ``load`` sees the endpoint's engine
type (``self.model_endpoint``, set by clearml-serving before ``load``) and switches this instance to
coroutines that decode and run the model in threads (``asyncio.to_thread``), so the event loop keeps
taking requests. ``D2OPS_INFERENCE_CONCURRENCY`` (default 1) bounds the forward passes running at once
per worker process.

``body`` is what clearml-serving's FastAPI route ``serve_model(..., request: Union[bytes, Dict])`` gets:
a dict for ``application/json`` requests, and the raw bytes for any other content type. Accepted, as
``d2ops serve`` accepts them (:func:`d2ops.serving.payloads.parse_detection_batch`):

- ``{"image": <base64>, "threshold": 0.5}`` (CVAT's body) -> ``{"detections": [shape, ...]}``;
- ``{"images": [<base64>, ...]}`` -> ``{"detections": [[shape, ...], ...]}``, one list per image;
- the image file's bytes (``curl --data-binary @img.jpg -H 'Content-Type: image/jpeg'``) -> one list;
- a ``multipart/form-data`` upload (``curl -F data=@img.jpg [-F threshold=0.3]``): one list for one
  file, one list per file for several.

Shapes are CVAT's detector format (:func:`d2ops.serving.replies.to_cvat`). The reply is a dict rather
than a bare list because clearml-serving's metric logging reads ``return_value.keys()``. Bad input (the
validation every front end shares, :mod:`d2ops.serving.service`) raises
:class:`~d2ops.serving.formats.BadInputError`, a ``ValueError``: clearml-serving's app answers every
``ValueError`` with 422 and ``{"detail": "Error [<type>] processing request: <message>"}``
(``clearml_serving/serving/main.py`` ``serve_model``, 1.3.5), so 422 is its client error; an exception of
any other type becomes its 500, and a ``fastapi.HTTPException`` raised here would too.

**Statistics.** Each request offers ``detection_count`` (detections in the reply, all images) and
``image_count`` to clearml-serving's statistics. Their names differ from every request and reply key
(``image``, ``images``, ``threshold``, ``detections``): ``_process_request`` copies the request and
reply values of a logged metric's name over the custom ones, so a statistic called ``detections``
would arrive as the list of shapes. Log them with
``clearml-serving metrics add --endpoint <name> --variable-scalar detection_count=0,1,2,5,10,20,50,100``.

Environment of the inference container: ``D2OPS_DEVICE`` (``auto``, ``cpu``, ``cuda``; default
``auto``), ``D2OPS_SCORE_THRESHOLD`` (default 0.5), ``D2OPS_MODEL_CACHE`` (where bundle zips are
extracted), ``D2OPS_MAX_IMAGES`` (images per request, default 16), ``D2OPS_INFERENCE_CONCURRENCY``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2ops.model.bundle import ModelBundle, ModelNotFoundError
from d2ops.model.detector import Detector
from d2ops.model.source import resolve_model
from d2ops.serving.payloads import DEFAULT_MAX_IMAGES, parse_threshold
from d2ops.serving.replies import to_cvat
from d2ops.serving.service import decode_batch, load_detector

if TYPE_CHECKING:
    from d2ops.model.detector import Detection, Detector, Frame

__all__ = [
    "ASYNC_ENGINE",
    "PREPROCESS_FILE",
    "Preprocess",
    "find_bundle",
]

log = logging.getLogger(__name__)

#: The file clearml-serving uploads as the endpoint's pre/post-processing code: this module.
PREPROCESS_FILE = Path(__file__).resolve()
#: clearml-serving's engine type that awaits the three calls (``CustomAsyncPreprocessRequest``).
ASYNC_ENGINE = "custom_async"

StatsFn = Callable[[dict[str, Any]], None] | None


# ---------------------------------------------------------------------------------------- the engine


def find_bundle(local: Path, cache_dir: Path) -> Path:
    """The bundle folder in what ClearML downloaded: the folder itself, one folder down, or a zip."""

    try:
        return resolve_model(str(ModelBundle.find(local)), cache_dir)
    except ModelNotFoundError as err:
        raise ValueError(f"the endpoint's model is not a d2ops bundle: {err}") from None


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={raw!r}: set it to a whole number of at least 1")
    return value


class Preprocess:
    """clearml-serving's custom-engine class for d2ops bundles (see the module docstring for the call order).

    One instance per serving process; requests carry their own ``state``, so it keeps no per-request data.
    """

    def __init__(self) -> None:

        self.detector: Detector | None = None
        self.device = os.environ.get("D2OPS_DEVICE", "auto")
        self.runtime = os.environ.get("D2OPS_RUNTIME", "auto")  # auto: the fastest the exported bundle has
        self.default_threshold = parse_threshold(os.environ.get("D2OPS_SCORE_THRESHOLD"), 0.5)
        self.cache_dir = Path(os.environ.get("D2OPS_MODEL_CACHE", Path(tempfile.gettempdir()) / "d2ops-models"))
        self.max_images = _positive_int("D2OPS_MAX_IMAGES", DEFAULT_MAX_IMAGES)
        self._forward_slots = threading.BoundedSemaphore(_positive_int("D2OPS_INFERENCE_CONCURRENCY", 1))

    def load(self, local_file_name: str | None) -> Detector:
        """Load the endpoint's model (its local copy: a bundle folder or zip) onto ``D2OPS_DEVICE``.

        Under ``--engine custom_async`` this instance's three calls become coroutines (see the module docstring).
        """

        if not local_file_name:
            raise ValueError("the endpoint has no model: register it with --model-id or --project/--name")
        bundle = find_bundle(Path(local_file_name), self.cache_dir)
        self.detector = load_detector(bundle, device=self.device, runtime=self.runtime)
        engine = getattr(getattr(self, "model_endpoint", None), "engine_type", None)
        if engine == ASYNC_ENGINE:
            # clearml-serving looks the methods up on the instance on every request.
            vars(self).update(
                preprocess=self.preprocess_async, process=self.process_async, postprocess=self.postprocess_async
            )
        log.info("d2ops model loaded from %s (%d labels, engine %s)", bundle, len(self.detector.labels), engine)
        return self.detector

    # ---- synchronous (``--engine custom``)

    def preprocess(self, body: Any, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None) -> list[Frame]:
        """Decode the request (JSON dict, JSON, image or multipart bytes) into frames the model can take
        (:func:`d2ops.serving.service.decode_batch`); the rest goes in ``state``."""

        request = decode_batch(self._loaded(), body, self.default_threshold, max_images=self.max_images)
        state["threshold"] = request.threshold
        state["single"] = request.single
        return list(request.images)

    def process(
        self, data: list[Frame], state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> list[list[Detection]]:
        """Run the detector on the request's frames (one forward pass)."""
        detector = self._loaded()
        with self._forward_slots:
            return detector.predict(data, state["threshold"])

    def _loaded(self) -> Detector:
        if self.detector is None:
            raise RuntimeError("Preprocess called before load(): clearml-serving found no model to load")
        return self.detector

    def postprocess(
        self, data: list[list[Detection]], state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> dict[str, Any]:
        """``{"detections": ...}`` in CVAT's format; counts go to clearml-serving's statistics."""

        if collect_custom_statistics_fn is not None:
            collect_custom_statistics_fn({"detection_count": sum(len(dets) for dets in data), "image_count": len(data)})
        replies = [to_cvat(dets) for dets in data]
        return {"detections": replies[0] if state.get("single", True) else replies}

    # ---- awaited (``--engine custom_async``): decoding and the model run in threads

    async def preprocess_async(
        self, body: Any, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> list[Frame]:
        return await asyncio.to_thread(Preprocess.preprocess, self, body, state, collect_custom_statistics_fn)

    async def process_async(
        self, data: list[Frame], state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> list[list[Detection]]:
        return await asyncio.to_thread(Preprocess.process, self, data, state, collect_custom_statistics_fn)

    async def postprocess_async(
        self, data: list[list[Detection]], state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> dict[str, Any]:
        return await asyncio.to_thread(Preprocess.postprocess, self, data, state, collect_custom_statistics_fn)
