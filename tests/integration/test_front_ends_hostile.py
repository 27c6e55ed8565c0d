"""One table of hostile images (``d2ops.testing.HOSTILE_INPUTS``) through every serving front end.

Each front end refuses each image with its own protocol's client error, a message that names the problem, no
traceback, and goes on serving (the validation they share: :mod:`d2ops.serving.service`):

- ``d2ops serve``: a real server process over a socket; 400, or 415 for an unsupported pixel format;
- the nuclio function: nuclio-sdk's own ``Context``, ``Event``, ``Logger`` and ``Response``; 400, JSON
  ``{"error": ...}``, and no traceback in the function's log either (before: 500 for an extreme aspect ratio,
  a traceback in the log);
- the cvat-sdk native function: cvat-sdk's frame context and ``PIL.Image.open`` as cvat-sdk opens a frame;
  ``BadFunctionError``, the one exception type whose message cvat-cli's agent passes on to CVAT (before: an
  ``OSError``, a ``ValueError``, or a 63 Mpx frame run at full size and a NaN image run as black).

clearml-serving's real app answers the same table with 422 in tests/clearml_runtime/test_clearml_serving_app.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from d2ops.testing import HOSTILE_INPUTS, HostileInput

from .test_server import HTTP_TIMEOUT, ServerProcess, _png

CASES = [pytest.param(case, id=case.name) for case in HOSTILE_INPUTS]
CVAT_CASES = [pytest.param(case, id=case.name) for case in HOSTILE_INPUTS if case.reaches_cvat_function]
GOOD_IMAGE = base64.b64encode(_png(5)).decode()


# ------------------------------------------------------------------------------------------ d2ops serve


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess.ready(tiny_bundle, tmp_path_factory.mktemp("hostile-logs")) as proc:
        yield proc


@pytest.mark.parametrize("case", CASES)
def test_d2ops_serve_answers_a_4xx_that_names_the_problem(server: ServerProcess, case: HostileInput) -> None:
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as client:
        reply = client.post("/predict", json={"image": case.image_field()})
        assert reply.status_code == case.http_status, reply.text
        assert case.message in reply.json()["error"] and "Traceback" not in reply.text
        assert client.post("/predict", json={"image": GOOD_IMAGE}).status_code == 200


# ---------------------------------------------------------------------------------------------- nuclio


@pytest.fixture(scope="module")
def nuclio_function(tiny_bundle: Path) -> tuple[Any, io.StringIO]:
    """A nuclio-sdk ``Context`` that ``init_context`` loaded the bundle into, and what its logger writes."""
    nuclio_sdk = pytest.importorskip("nuclio_sdk")
    from d2ops.serving.nuclio import init_context

    log = io.StringIO()
    logger = nuclio_sdk.Logger(logging.DEBUG, "d2ops-hostile")
    logger.set_handler("test", log, nuclio_sdk.logger.HumanReadableFormatter())
    context = nuclio_sdk.Context(logger=logger)
    init_context(context, tiny_bundle, device="cpu", default_threshold=0.0)
    return context, log


def _nuclio_json_event(body: dict[str, Any]) -> Any:
    import nuclio_sdk

    # nuclio's Python wrapper hands an application/json body over decoded (tests/integration/test_nuclio.py)
    return nuclio_sdk.Event(body=body, content_type="application/json", method="POST", path="/")


@pytest.mark.parametrize("case", CASES)
def test_nuclio_function_answers_400_without_a_traceback(
    nuclio_function: tuple[Any, io.StringIO], case: HostileInput
) -> None:
    import nuclio_sdk

    from d2ops.serving.nuclio import handle_event

    context, log = nuclio_function
    logged = len(log.getvalue())
    response = handle_event(context, _nuclio_json_event({"image": case.image_field()}))
    assert isinstance(response, nuclio_sdk.Response)
    assert (response.status_code, response.content_type) == (400, "application/json"), response.body
    assert case.message in json.loads(response.body)["error"]
    assert "Traceback" not in response.body and "Traceback" not in log.getvalue()[logged:]
    assert handle_event(context, _nuclio_json_event({"image": GOOD_IMAGE})).status_code == 200


# ------------------------------------------------------------------------------------- cvat-sdk native


@pytest.fixture(scope="module")
def cvat_function(tiny_bundle: Path) -> Any:
    pytest.importorskip("cvat_sdk.auto_annotation")
    from d2ops.serving.cvat_function import create

    return create(bundle=str(tiny_bundle), threshold=0.0)


def _detect(function: Any, image: Image.Image) -> Any:
    from cvat_sdk.auto_annotation.driver import _DetectionFunctionContextImpl

    context = _DetectionFunctionContextImpl(frame_name="frame_000007.png", conf_threshold=None, conv_mask_to_poly=False)
    return function.detect(context, image)


@pytest.mark.parametrize("case", CVAT_CASES)
def test_cvat_native_function_raises_bad_function_error_with_the_reason(cvat_function: Any, case: HostileInput) -> None:
    from cvat_sdk.auto_annotation import BadFunctionError

    payload = case.payload()
    assert isinstance(payload, bytes)
    # as cvat-sdk opens a task's frame (TaskDataset._load_frame_image_from_server): lazily, not yet decoded
    with pytest.raises(BadFunctionError) as caught:
        _detect(cvat_function, Image.open(io.BytesIO(payload)))
    assert case.message in str(caught.value) and "frame_000007.png" in str(caught.value)
    # cvat-cli's agent runs detect in a worker process: the error must come back as the same type and message
    returned = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(returned, BadFunctionError) and str(returned) == str(caught.value)
    assert _detect(cvat_function, Image.open(io.BytesIO(_png(5))))  # the next frame is served


@pytest.mark.parametrize(
    "case",
    [c for c in HOSTILE_INPUTS if not c.reaches_cvat_function and isinstance(c.payload(), bytes)],
    ids=lambda c: c.name,
)
def test_inputs_cvat_sdk_itself_cannot_open_never_reach_a_native_function(case: HostileInput) -> None:
    """The table's claim: cvat-sdk fails on these bytes before calling any function, so there is nothing to map
    (bad base64 is not a frame at all: CVAT hands native functions images, not request bodies)."""
    with pytest.raises((Image.UnidentifiedImageError, Image.DecompressionBombError)):
        Image.open(io.BytesIO(case.payload()))  # type: ignore[arg-type]


def test_cvat_native_function_serves_16_bit_frames_scaled_like_the_other_front_ends(cvat_function: Any) -> None:
    """The shared decoding scales 16-bit pixels by their range; before, ``convert("RGB")`` clipped them to white."""
    from d2ops.serving.formats import decode_frame

    gray = (np.arange(96 * 128, dtype=np.uint16).reshape(96, 128) * 5).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    shapes = _detect(cvat_function, Image.open(io.BytesIO(buf.getvalue())))
    expected = cvat_function.detector.predict([decode_frame(buf.getvalue())], 0.0)[0]
    assert [list(s.points) for s in shapes] == [d.box for d in expected]
