"""Serve d2ops bundles with clearml-serving: a custom engine, and ``d2ops serving register``.

**The engine.** ``clearml-serving model add --engine custom --preprocess d2ops/serving/clearml_engine.py``
uploads this file; every inference container loads it with ``importlib`` (as a standalone module, so
it imports d2ops absolutely: the container needs d2ops and detectron2 installed, e.g. an inference
image built from ``d2ops/detectron2``), creates one :class:`Preprocess` per process and calls, as
``clearml_serving/serving/preprocess_service.py`` (``CustomPreprocessRequest``) and
``model_request_processor.py`` (``_process_request``) do:

1. ``load(local_file_name)`` once, with ``Model(model_id).get_local_copy()``: the bundle folder
   (d2ops registers bundles as packages, so ClearML extracts them) or the bundle zip;
2. per request ``preprocess(body, state, fn)``, ``process(data, state, fn)``, ``postprocess(data, state, fn)``,
   synchronously, with a fresh ``state`` dict and ``fn`` either ``None`` or a callable that takes a dict
   of custom statistics.

``body`` is what clearml-serving's FastAPI route ``serve_model(..., request: Union[bytes, Dict])`` gets:
a dict for ``application/json`` requests, ``{"image": <base64>, "threshold": 0.5}`` as CVAT sends it,
and the raw bytes for any other content type, which may be the image file itself
(``curl --data-binary @img.jpg -H 'Content-Type: image/jpeg'``). The reply is
``{"detections": [...]}`` in CVAT's detector format (:func:`d2ops.serving.replies.to_cvat`, the same as the
CVAT nuclio function's reply): a dict rather than a bare list because clearml-serving's metric logging
reads ``return_value.keys()``. Bad input raises ``ValueError``, which clearml-serving answers with 422
and the message.

Environment of the inference container: ``D2OPS_DEVICE`` (``auto``, ``cpu``, ``cuda``; default
``auto``), ``D2OPS_SCORE_THRESHOLD`` (default 0.5), ``D2OPS_MODEL_CACHE`` (where bundle zips are extracted).

**Registration.** :func:`build_register_command` builds the ``clearml-serving`` command line (an
argument list, never a shell string) that adds the endpoint: ``model add`` for one model (by id, or
the newest matching project/name/tags), ``model auto-update`` to follow new versions of a model name.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from d2ops.model.detector import Detection, Detector, Frame

__all__ = [
    "PREPROCESS_FILE",
    "Preprocess",
    "find_bundle",
]

log = logging.getLogger(__name__)

#: The file clearml-serving uploads as the endpoint's pre/post-processing code: this module.
PREPROCESS_FILE = Path(__file__).resolve()

StatsFn = Callable[[dict[str, Any]], None] | None


# ---------------------------------------------------------------------------------------- the engine


def find_bundle(local: Path, cache_dir: Path) -> Path:
    """The bundle folder in what ClearML downloaded: the folder itself, one folder down, or a zip."""
    from d2ops.model.bundle import ModelBundle, ModelNotFoundError
    from d2ops.model.source import resolve_model

    try:
        return resolve_model(str(ModelBundle.find(local)), cache_dir)
    except ModelNotFoundError as err:
        raise ValueError(f"the endpoint's model is not a d2ops bundle: {err}") from None


class Preprocess:
    """clearml-serving's custom-engine class for d2ops bundles (see the module docstring for the call order).

    One instance per serving process; requests carry their own ``state``, so it keeps no per-request data.
    """

    def __init__(self) -> None:
        from d2ops.serving.payloads import parse_threshold

        self.detector: Detector | None = None
        self.device = os.environ.get("D2OPS_DEVICE", "auto")
        self.default_threshold = parse_threshold(os.environ.get("D2OPS_SCORE_THRESHOLD"), 0.5)
        self.cache_dir = Path(os.environ.get("D2OPS_MODEL_CACHE", Path(tempfile.gettempdir()) / "d2ops-models"))

    def load(self, local_file_name: str | None) -> Detector:
        """Load the endpoint's model (its local copy: a bundle folder or zip) onto ``D2OPS_DEVICE``."""
        from d2ops.model.detector import Detector

        if not local_file_name:
            raise ValueError("the endpoint has no model: register it with --model-id or --project/--name")
        bundle = find_bundle(Path(local_file_name), self.cache_dir)
        self.detector = Detector.from_bundle(bundle, device=self.device)
        log.info("d2ops model loaded from %s (%d labels)", bundle, len(self.detector.labels))
        return self.detector

    def preprocess(self, body: Any, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None) -> Frame:
        """Decode the request (JSON dict, or raw bytes) into a BGR image; the threshold goes into ``state``."""
        from d2ops.serving.payloads import parse_detection_request

        request = parse_detection_request(body, self.default_threshold, allow_raw_image=True)
        state["threshold"] = request.threshold
        return request.image

    def process(
        self, data: Frame, state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> list[Detection]:
        """Run the detector on one image."""
        if self.detector is None:
            raise RuntimeError("Preprocess.process called before load(): clearml-serving found no model to load")
        return self.detector.predict([data], state["threshold"])[0]

    def postprocess(
        self, data: list[Detection], state: dict[str, Any], collect_custom_statistics_fn: StatsFn = None
    ) -> dict[str, Any]:
        """``{"detections": [...]}`` in CVAT's format; the count is offered to clearml-serving's statistics."""
        from d2ops.serving.replies import to_cvat

        if collect_custom_statistics_fn is not None:
            collect_custom_statistics_fn({"detections": len(data)})
        return {"detections": to_cvat(data)}
