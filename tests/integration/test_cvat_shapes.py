"""CVAT gets one shape per object, masks from segmenting models, from both nuclio and native functions.

Reply shapes are defined by CVAT's own code:
- nuclio detectors: ``cvat/apps/lambda_manager/views.py`` ``LambdaJob._call_detector`` (read at cvat-ai/cvat
  024777e) takes ``rectangle``, ``polygon`` and ``mask`` shapes. For a mask it reads ``anno["mask"]``: the
  row-major 0/255 crop of the inclusive box followed by ``[xtl, ytl, xbr, ybr]``, as CVAT's own functions
  write it (``serverless/openvino/base/shared.py`` ``to_cvat_mask``), and run-length encodes it
  (``mask_tools.mask_to_rle``); with "convert masks to polygons" it takes ``anno["points"]`` instead.
  views.py cannot run here (it needs CVAT's Django server and database): :func:`_lambda_manager_shape`
  repeats that branch line for line, and cvat-sdk's ``decode_mask`` reads the RLE it stores.
- native functions: cvat-sdk 2.80's ``cvat_sdk.auto_annotation``: ``DetectionFunctionSpec`` validation,
  the ``rectangle``/``polygon``/``mask`` builders, and ``driver._AnnotationMapper.validate_and_remap``,
  the label mapping and shape validation ``annotate_task`` runs on every frame's output.
The nuclio function is driven with nuclio-sdk's own ``Event``, ``Context`` and ``Response`` types.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from d2ops.model.detector import Detector
from d2ops.serving.replies import cvat_label_type, to_cvat

cvataa = pytest.importorskip("cvat_sdk.auto_annotation")
nuclio_sdk = pytest.importorskip("nuclio_sdk")
from cvat_sdk import models  # noqa: E402
from cvat_sdk.auto_annotation.driver import _AnnotationMapper  # noqa: E402
from cvat_sdk.masks import decode_mask  # noqa: E402


@pytest.fixture(scope="module")
def mask_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from d2ops.testing import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("maskrcnn"), masks=True)


@pytest.fixture(scope="module")
def mask_detector(mask_bundle: Path) -> Detector:
    return Detector.from_bundle(mask_bundle, device="cpu")


def _image(seed: int = 1, width: int = 160, height: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, ::-1]).save(buf, format="PNG")
    return buf.getvalue()


def _runs(flat: np.ndarray) -> list[int]:
    """Run lengths of a flat 0/non-0 array, starting with the zeros (datumaro ``mask_to_rle``'s counts)."""
    values = (flat != 0).astype(np.int8)
    changes = np.flatnonzero(np.diff(values)) + 1
    bounds = [0, *changes.tolist(), len(values)]
    runs = [b - a for a, b in itertools.pairwise(bounds)]
    return ([0, *runs]) if values[0] else runs


def _lambda_manager_shape(anno: dict[str, Any], conv_mask_to_poly: bool) -> dict[str, Any]:
    """``LambdaJob._call_detector``'s shape conversion (cvat/apps/lambda_manager/views.py), line for line."""
    shape = {"type": anno["type"], "points": anno["mask"] if anno["type"] == "mask" else anno["points"]}
    if anno["type"] == "mask" and "points" in anno and conv_mask_to_poly:
        shape["type"] = "polygon"
        shape["points"] = anno["points"]
    elif anno["type"] == "mask":
        xtl, ytl, xbr, ybr = shape["points"][-4:]
        cut_points = shape["points"][:-4]
        shape["points"] = [*_runs(np.array(cut_points)), xtl, ytl, xbr, ybr]
    return shape


def _cvat_mask_bitmap(anno: dict[str, Any], width: int, height: int) -> np.ndarray:
    """A nuclio mask reply as CVAT stores it, decoded by cvat-sdk: the object's pixels in the frame."""
    *values, xtl, ytl, xbr, ybr = anno["mask"]
    assert all(isinstance(v, int) for v in (xtl, ytl, xbr, ybr))
    assert 0 <= xtl <= xbr < width and 0 <= ytl <= ybr < height
    assert len(values) == (ybr - ytl + 1) * (xbr - xtl + 1) and set(values) <= {0, 255}
    stored = _lambda_manager_shape(anno, conv_mask_to_poly=False)
    assert stored["type"] == "mask"
    return decode_mask(stored["points"], image_width=width, image_height=height)


# ------------------------------------------------------------------------------------- nuclio replies


def test_a_segmenting_model_sends_one_mask_per_object(mask_detector: Detector) -> None:
    image = _image()
    detections = mask_detector.predict([image], 0.0)[0]
    shapes = to_cvat(detections)
    assert len(detections) > 3 and len(shapes) == len(detections)  # before: one polygon per contour
    assert {s["type"] for s in shapes} == {"mask"}
    for det, shape in zip(detections, shapes, strict=True):
        bitmap = _cvat_mask_bitmap(shape, 160, 120)
        xtl, ytl, xbr, ybr = det.mask_box
        assert np.array_equal(bitmap[ytl : ybr + 1, xtl : xbr + 1], det.mask) and bitmap.sum() == det.mask.sum()
        assert shape["label"] == det.label and float(shape["confidence"]) == pytest.approx(det.score, abs=1e-4)
        # CVAT's "convert masks to polygons" switch: the lambda manager takes the outline in "points"
        converted = _lambda_manager_shape(shape, conv_mask_to_poly=True)
        assert converted["type"] == "polygon" and len(converted["points"]) >= 6


def test_masks_of_a_reduced_frame_come_back_in_the_original_frame_without_frame_sized_arrays(
    mask_detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large frame decoded reduced (formats.decode_frame's Frame): masks are mapped to the original frame
    crop by crop. Before, detectron2 pasted every instance's mask into a frame-sized array (an 8000x5100
    frame: 40 MB per instance, 100 instances per image)."""
    from detectron2.structures import ROIMasks

    from d2ops.model.detector import Frame

    pasted: list[tuple[int, int]] = []
    paste = ROIMasks.to_bitmasks  # what detectron2's detector_postprocess pastes every mask with

    def recording_paste(self: ROIMasks, boxes: Any, height: int, width: int, threshold: float = 0.5) -> Any:
        pasted.append((int(height), int(width)))
        return paste(self, boxes, height, width, threshold)  # detectron2's own pasting, only observed

    monkeypatch.setattr(ROIMasks, "to_bitmasks", recording_paste)
    image = _image(6)
    small = mask_detector.predict([image], 0.0)[0]
    large = mask_detector.predict([Frame(image, 1200, 1600)], 0.0)[0]
    assert pasted == [(120, 160), (120, 160)]  # never the 1200x1600 original
    assert len(large) == len(small) > 3
    for big, det in zip(large, small, strict=True):
        assert big.box == pytest.approx([v * 10 for v in det.box], rel=1e-5)
        xtl, ytl, xbr, ybr = big.mask_box
        assert big.mask.shape == (ybr - ytl + 1, xbr - xtl + 1) and 0 <= xtl <= xbr < 1600 and ybr < 1200
        frame_mask = np.zeros((120, 160), dtype=bool)
        frame_mask[det.mask_box[1] : det.mask_box[3] + 1, det.mask_box[0] : det.mask_box[2] + 1] = det.mask
        ys, xs = np.nonzero(big.mask)
        assert frame_mask[(ys + ytl) // 10, (xs + xtl) // 10].all()  # every original pixel lies in the mask
        assert big.mask.sum() == pytest.approx(det.mask.sum() * 100, rel=0.35)
        assert np.array_equal(_cvat_mask_bitmap(to_cvat([big])[0], 1600, 1200)[ytl : ybr + 1, xtl : xbr + 1],
                              big.mask if big.mask.any() else np.ones_like(big.mask))  # fmt: skip


def test_polygons_on_request_are_one_simplified_outline_per_object(mask_detector: Detector) -> None:
    detections = mask_detector.predict([_image()], 0.0)[0]
    shapes = to_cvat(detections, "polygon")
    assert len(shapes) == len(detections) and {s["type"] for s in shapes} == {"polygon"}
    for shape in shapes:
        points = shape["points"]
        assert len(points) >= 6 and len(points) % 2 == 0
        xs, ys = points[0::2], points[1::2]
        assert min(xs) >= 0 and max(xs) <= 160 and min(ys) >= 0 and max(ys) <= 120
    # simplified: far fewer vertices than the mask outline's pixels
    assert sum(len(s["points"]) for s in shapes) / len(shapes) < 60


def test_a_segmenting_model_never_sends_a_rectangle(mask_detector: Detector) -> None:
    detections = mask_detector.predict([_image(5)], 0.0)[0]
    for det in detections:
        det.mask = np.zeros_like(det.mask)  # an object whose mask came out empty
    for shape in ("mask", "polygon"):
        replies = to_cvat(detections, shape)
        assert len(replies) == len(detections) and {r["type"] for r in replies} == {shape}


def test_label_types_match_the_replies() -> None:
    assert cvat_label_type(True) == "mask" and cvat_label_type(True, "polygon") == "polygon"
    assert cvat_label_type(False) == cvat_label_type(False, "polygon") == "rectangle"
    with pytest.raises(ValueError, match="mask, polygon"):
        cvat_label_type(True, "ellipse")


def test_nuclio_function_answers_cvats_request_with_masks(mask_bundle: Path, tmp_path: Path) -> None:
    """nuclio-sdk's Event and Context, CVAT's body ``{"image": <base64>}`` (threshold only when non-zero)."""
    from d2ops.serving import nuclio as d2ops_nuclio

    logger = nuclio_sdk.Logger(logging.DEBUG)
    for shape in ("mask", "polygon"):
        context = nuclio_sdk.Context(platform=None, logger=logger)
        d2ops_nuclio.init_context(context, mask_bundle, device="cpu", default_threshold=0.0, shape=shape)
        image = _image(2)
        body = json.dumps({"image": base64.b64encode(_png(image)).decode()}).encode()
        event = nuclio_sdk.Event(body=body, content_type="application/json", method="POST", path="/")
        response = d2ops_nuclio.handle_event(context, event)
        assert isinstance(response, nuclio_sdk.Response) and response.status_code == 200
        replies = json.loads(response.body)
        expected = context.user_data.model.predict([image], 0.0)[0]
        assert len(replies) == len(expected) and {r["type"] for r in replies} == {shape}


def test_export_declares_mask_labels_for_a_segmenting_model(mask_bundle: Path, tmp_path: Path) -> None:
    import yaml

    from d2ops.serving.nuclio import export_nuclio

    export = export_nuclio(mask_bundle, tmp_path / "fn")
    config = yaml.safe_load((tmp_path / "fn" / "cpu" / "function.yaml").read_text())
    spec = json.loads(config["metadata"]["annotations"]["spec"])
    assert export.shape_type == "mask" and {label["type"] for label in spec} == {"mask"}
    env = {e["name"]: e["value"] for e in config["spec"]["env"]}
    assert env["D2OPS_CVAT_SHAPE"] == "mask"
    polygons = export_nuclio(mask_bundle, tmp_path / "fn2", shape="polygon")
    assert polygons.shape_type == "polygon"


# ----------------------------------------------------------------------------------- native functions


def _task_labels(names: list[str], label_type: str) -> list[Any]:
    return [models.Label(id=100 + i, name=n, type=label_type, attributes=[], sublabels=[], color="#ff0000",
                         _check_type=False) for i, n in enumerate(names)]  # fmt: skip


def _annotate(function: Any, image: np.ndarray, ds_labels: list[Any], *, to_polygon: bool) -> list[Any]:
    """One frame through cvat-sdk's driver: its context type, the function, then its label mapping and checks."""
    from cvat_sdk.auto_annotation.driver import _DetectionFunctionContextImpl

    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, ds_labels,
                               allow_unmatched_labels=False, conv_mask_to_poly=to_polygon)  # fmt: skip
    context = _DetectionFunctionContextImpl(frame_name="f.png", conf_threshold=0.0, conv_mask_to_poly=to_polygon)
    output = function.detect(context, Image.fromarray(image[:, :, ::-1]))
    _, shapes = mapper.validate_and_remap(output, 3)
    return shapes


def test_native_function_gives_cvat_masks_one_per_object(mask_bundle: Path, mask_detector: Detector) -> None:
    from d2ops.serving.cvat_function import create

    function = create(bundle=str(mask_bundle), threshold=0.0)
    assert isinstance(function.spec, cvataa.DetectionFunctionSpec)
    assert {label.type for label in function.spec.labels} == {"mask"}
    image = _image(3)
    expected = mask_detector.predict([image], 0.0)[0]
    labels = mask_detector.labels
    shapes = _annotate(function, image, _task_labels(labels, "mask"), to_polygon=False)
    assert len(shapes) == len(expected) and {s.type.value for s in shapes} == {"mask"}
    for shape, det in zip(shapes, expected, strict=True):
        assert shape.label_id == 100 + labels.index(det.label) and shape.frame == 3
        # cvat-sdk's decoder gives back exactly the object's mask, in its place in the frame
        bitmap = decode_mask(shape.points, image_width=160, image_height=120)
        xtl, ytl, xbr, ybr = det.mask_box
        crop = det.mask if det.mask.any() else np.ones_like(det.mask)
        assert np.array_equal(bitmap[ytl : ybr + 1, xtl : xbr + 1], crop) and bitmap.sum() == crop.sum()
    # CVAT's "convert masks to polygons": one polygon per object, and the driver accepts it
    polygons = _annotate(function, image, _task_labels(labels, "polygon"), to_polygon=True)
    assert len(polygons) == len(expected) and {s.type.value for s in polygons} == {"polygon"}


def test_native_function_can_declare_and_send_polygons(mask_bundle: Path, mask_detector: Detector) -> None:
    from cvat_sdk.auto_annotation import BadFunctionError

    from d2ops.serving.cvat_function import create

    function = create(bundle=str(mask_bundle), threshold=0.0, shape="polygon")
    assert {label.type for label in function.spec.labels} == {"polygon"}
    image, labels = _image(3), mask_detector.labels
    expected = mask_detector.predict([image], 0.0)[0]
    shapes = _annotate(function, image, _task_labels(labels, "polygon"), to_polygon=False)
    assert len(shapes) == len(expected) and {s.type.value for s in shapes} == {"polygon"}
    # cvat-sdk's driver refuses a mask function for a task whose labels are polygons (_are_label_types_compatible)
    with pytest.raises(BadFunctionError, match="'mask' in the function"):
        _annotate(create(bundle=str(mask_bundle), threshold=0.0), image, _task_labels(labels, "polygon"),
                  to_polygon=False)  # fmt: skip
    with pytest.raises(ValueError, match="mask, polygon"):
        create(bundle=str(mask_bundle), shape="ellipse")


def test_native_function_of_a_box_model_gives_rectangles(tiny_bundle: Path) -> None:
    from cvat_sdk.auto_annotation import BadFunctionError

    from d2ops.serving.cvat_function import create

    function = create(bundle=str(tiny_bundle), threshold=0.0)
    labels = [label.name for label in function.spec.labels]
    shapes = _annotate(function, _image(4), _task_labels(labels, "rectangle"), to_polygon=False)
    assert shapes and {s.type.value for s in shapes} == {"rectangle"}
    # the driver refuses a task whose labels want another shape: the spec says what the function sends
    with pytest.raises(BadFunctionError, match="rectangle"):
        _annotate(function, _image(4), _task_labels(labels, "polygon"), to_polygon=False)


def test_native_function_needs_a_bundle_and_says_how_to_pass_it() -> None:
    from d2ops.serving.cvat_function import create

    with pytest.raises(ValueError, match="-p bundle=str:"):
        create()
