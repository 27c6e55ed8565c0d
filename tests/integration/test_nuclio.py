"""The CVAT nuclio export: function.yaml as CVAT reads it, and the exported main.py run as nuclio runs it.

main.py is imported from the export folder with the exported copy of d2ops first on sys.path (and the
repository's d2ops modules set aside), then driven with a context and events shaped like nuclio's.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from d2ops.cli import main as cli_main
from d2ops.model.detector import Detector
from d2ops.serving.formats import decode_image
from d2ops.serving.nuclio import (
    EXPORT_MANIFEST,
    MAX_REQUEST_BODY_BYTES,
    ExportError,
    build_function_config,
    bundle_shape_type,
    export_nuclio,
)
from d2ops.serving.replies import to_cvat


def _png(seed: int = 1, width: int = 160, height: int = 120) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[30:90, 40:110] = (20, 200, 40)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------- nuclio's call shapes


class Logger:
    """nuclio's ``context.logger`` (the methods the function uses)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def info(self, message: str, *args: Any) -> None:
        self.records.append(("info", message))

    def error(self, message: str, *args: Any) -> None:
        self.records.append(("error", message))


class Response:
    """nuclio's ``context.Response``."""

    def __init__(
        self, body: Any = None, headers: dict[str, str] | None = None, content_type: str = "", status_code: int = 200
    ) -> None:
        self.body, self.headers, self.content_type, self.status_code = body, headers, content_type, status_code


class Context:
    def __init__(self) -> None:
        self.user_data = SimpleNamespace()
        self.logger = Logger()
        self.Response = Response


class Event:
    def __init__(self, body: Any, content_type: str = "application/json") -> None:
        self.body, self.content_type, self.method = body, content_type, "POST"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def export_dir(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nuclio") / "fn"
    export_nuclio(tiny_bundle, out, threshold=0.25)
    return out


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path) -> Detector:
    return Detector.from_bundle(tiny_bundle, device="cpu")


@contextlib.contextmanager
def exported_main(function_dir: Path) -> Iterator[ModuleType]:
    """Import ``function_dir/main.py`` as nuclio does, with the exported d2ops copy in place of ours.

    While inside, ``import d2ops`` means the exported copy and ``main`` is in ``sys.modules`` (nuclio's
    test platform finds ``init_context`` there); on exit the repository's d2ops is put back.
    """
    ours = {name: mod for name, mod in sys.modules.items() if name == "d2ops" or name.startswith("d2ops.")}
    saved_path = list(sys.path)
    for name in ours:
        del sys.modules[name]
    module_name = f"nuclio_main_{function_dir.name}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, function_dir / "main.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == "d2ops" or n.startswith("d2ops.")]:
            del sys.modules[name]
        sys.modules.pop(module_name, None)
        sys.modules.update(ours)
        sys.path[:] = saved_path


@pytest.fixture(scope="class")
def function(export_dir: Path) -> Iterator[tuple[ModuleType, Context]]:
    """The exported CPU function, initialised with a context shaped like nuclio's.

    Class-scoped: while it lives, ``import d2ops`` means the exported copy, so only the tests of
    one class run in that state.
    """
    with exported_main(export_dir / "cpu") as main:
        context = Context()
        main.init_context(context)
        yield main, context


# ----------------------------------------------------------------------------------------- the export


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_function_yaml_is_what_cvat_reads(export_dir: Path, tiny_bundle: Path, variant: str) -> None:
    config = yaml.safe_load((export_dir / variant / "function.yaml").read_text())
    meta = config["metadata"]
    assert meta["namespace"] == "cvat"
    assert meta["name"] == "d2ops-tiny"  # from the bundle's metadata.json "experiment"
    annotations = meta["annotations"]
    assert (annotations["type"], annotations["framework"]) == ("detector", "pytorch")
    labels = json.loads((tiny_bundle / "labels.json").read_text())
    spec_labels = json.loads(annotations["spec"])
    assert [item["name"] for item in spec_labels] == labels
    assert [item["id"] for item in spec_labels] == list(range(len(labels)))
    assert {item["type"] for item in spec_labels} == {"rectangle"}

    spec = config["spec"]
    assert spec["handler"] == "main:handler"
    assert spec["runtime"].startswith("python:3.")
    assert spec["eventTimeout"] == "30s"
    trigger = spec["triggers"]["myHttpTrigger"]
    assert trigger["kind"] == "http"
    assert trigger["attributes"]["maxRequestBodySize"] == MAX_REQUEST_BODY_BYTES == 33554432
    assert trigger["workerAvailabilityTimeoutMilliseconds"] == 10000
    assert spec["platform"]["attributes"]["mountMode"] == "volume"
    assert spec["platform"]["attributes"]["restartPolicy"]["name"] == "always"
    assert spec["build"]["baseImage"] == "d2ops/detectron2:latest"
    assert {d["kind"] for d in spec["build"]["directives"]["preCopy"]} >= {"WORKDIR", "RUN"}
    env = {item["name"]: item["value"] for item in spec["env"]}
    assert env["D2OPS_SCORE_THRESHOLD"] == "0.25"
    if variant == "gpu":
        assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["D2OPS_DEVICE"] == "cuda"
        assert spec["build"]["image"].endswith(":latest-gpu")
    else:
        assert "resources" not in spec
        assert env["D2OPS_DEVICE"] == "cpu"
        assert trigger["maxWorkers"] == 2


def test_each_function_folder_ships_bundle_package_and_entry_point(export_dir: Path, tiny_bundle: Path) -> None:
    for variant in ("cpu", "gpu"):
        folder = export_dir / variant
        assert (folder / "main.py").is_file()
        assert (folder / "d2ops" / "model" / "detector.py").is_file()
        assert (folder / "d2ops" / "serving" / "formats.py").is_file()
        assert not list(folder.rglob("__pycache__"))
        assert export_dir.stat().st_mode & 0o755 == 0o755
        for name in ("model_final.pth", "config.yaml", "labels.json"):
            assert (folder / "model" / name).read_bytes() == (tiny_bundle / name).read_bytes()
    manifest = json.loads((export_dir / EXPORT_MANIFEST).read_text())
    assert manifest["name"] == "d2ops-tiny" and manifest["variants"] == ["cpu", "gpu"]


def test_mask_models_are_mask_functions_or_polygon_ones_on_request(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("MODEL:\n  MASK_ON: true\n")
    assert bundle_shape_type(tmp_path) == "mask"
    assert bundle_shape_type(tmp_path, "polygon") == "polygon"
    (tmp_path / "config.yaml").write_text("MODEL:\n  MASK_ON: false\n")
    assert bundle_shape_type(tmp_path) == "rectangle"


def test_instance_segmentation_labels_are_polygons() -> None:
    config = build_function_config(name="seg", labels=["balloon"], shape_type="polygon", variant="cpu")
    assert json.loads(config["metadata"]["annotations"]["spec"]) == [{"id": 0, "name": "balloon", "type": "polygon"}]


def test_bad_names_and_thresholds_fail_before_writing(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"not a valid nuclio function name.*'my-model'"):
        export_nuclio(tiny_bundle, tmp_path / "a", name="My_Model")
    with pytest.raises(ValueError, match="between 0 and 1"):
        export_nuclio(tiny_bundle, tmp_path / "b", threshold=1.5)
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["export", "nuclio", "--model", str(tiny_bundle), "--out", str(out), "--name", "shapes"]) == 0
    printed = capsys.readouterr().out
    assert f"nuctl deploy --project-name cvat --path {out / 'cpu'}" in printed
    assert yaml.safe_load((out / "gpu" / "function.yaml").read_text())["metadata"]["name"] == "shapes"
    assert cli_main(["export", "nuclio", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the function, in nuclio


class TestExportedFunction:
    """main.py called the way nuclio calls it: init_context once, then handler per event."""

    def test_main_runs_the_exported_package_copy(self, function: tuple[ModuleType, Context], export_dir: Path) -> None:
        main, context = function
        assert Path(main.d2ops_nuclio.__file__).is_relative_to(export_dir / "cpu" / "d2ops")
        assert context.user_data.model.labels == ["square", "circle", "triangle"]
        assert context.user_data.default_threshold == 0.25
        assert any("model ready" in message for level, message in context.logger.records if level == "info")

    @pytest.mark.parametrize("shape", ["dict", "bytes"])
    def test_handler_matches_the_in_process_detector(
        self, function: tuple[ModuleType, Context], reference: Detector, shape: str
    ) -> None:
        main, context = function
        png = _png()
        payload = {"image": _b64(png), "threshold": 0.0}
        body = payload if shape == "dict" else json.dumps(payload).encode()
        response = main.handler(context, Event(body))
        assert (response.status_code, response.content_type, response.headers) == (200, "application/json", {})
        expected = to_cvat(reference.predict([decode_image(png)], 0.0)[0])
        assert expected, "the tiny bundle predicts boxes at threshold 0"
        assert json.loads(response.body) == expected
        assert {item["type"] for item in expected} == {"rectangle"}

    def test_handler_default_threshold_and_cvat_string_threshold(
        self, function: tuple[ModuleType, Context], reference: Detector
    ) -> None:
        main, context = function
        png = _png(seed=2)
        detections = reference.predict([decode_image(png)], 0.0)[0]
        default = json.loads(main.handler(context, Event({"image": _b64(png)})).body)
        assert default == to_cvat([d for d in detections if d.score >= 0.25])
        as_string = json.loads(main.handler(context, Event({"image": _b64(png), "threshold": "0.25"})).body)
        assert as_string == default

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"image": "not base64!!"}, "not valid base64"),
            ({"image": _b64(b"plain text, not a picture")}, "not an image"),
            ({"picture": "x"}, "no 'image' field"),
            ({"image": _b64(_png()), "threshold": 7}, "between 0 and 1"),
            (b"{not json", "not valid JSON"),
            (b"\x89PNG raw bytes", "not JSON"),
            (b"", "empty"),
            (b"[1, 2]", "not JSON"),
        ],
    )
    def test_bad_requests_get_400_with_a_json_reason(
        self, function: tuple[ModuleType, Context], body: Any, message: str
    ) -> None:
        main, context = function
        response = main.handler(context, Event(body))
        assert response.status_code == 400
        error = json.loads(response.body)["error"]
        assert message in error and "Traceback" not in error

    def test_model_failure_is_a_500_without_a_traceback(
        self, function: tuple[ModuleType, Context], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        main, context = function

        def explode(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("CUDA error: device-side assert triggered")

        monkeypatch.setattr(context.user_data.model, "predict", explode)
        response = main.handler(context, Event({"image": _b64(_png())}))
        assert response.status_code == 500
        assert "CUDA" not in response.body and "Traceback" not in response.body
        assert any(level == "error" and "Traceback" in message for level, message in context.logger.records)


# ------------------------------------------------------------------------- with nuclio's own SDK classes


def _nuclio_event(body: bytes, content_type: str) -> Any:
    """An event as nuclio's Python wrapper decodes the processor's message (JSON bodies become dicts)."""
    import nuclio_sdk

    message = {
        "body": body,
        "content_type": content_type,
        "trigger": {"kind": "http", "name": "myHttpTrigger"},
        "fields": {},
        "headers": {"Content-Type": content_type},
        "id": "event-1",
        "method": "POST",
        "path": "/",
        "size": len(body),
        "timestamp": 0,
        "url": "http://function/",
        "shard_id": 0,
        "num_shards": 1,
        "type": "",
        "type_version": "",
        "version": "",
    }
    return nuclio_sdk.Event.deserialize(message, kind=nuclio_sdk.EventDeserializerKinds.msgpack)


@pytest.fixture(scope="class")
def nuclio_platform(export_dir: Path) -> Iterator[tuple[ModuleType, Any]]:
    """nuclio-sdk's test platform: it calls main.init_context with a real ``nuclio_sdk.Context`` on first use."""
    pytest.importorskip("nuclio_sdk")
    from nuclio_sdk.test import Platform

    with exported_main(export_dir / "gpu") as main, pytest.MonkeyPatch.context() as mp:
        mp.setenv("D2OPS_DEVICE", "cpu")  # the GPU variant's code, on this machine's CPU
        yield main, Platform()


class TestUnderNuclioSdk:
    """The same function driven by nuclio-sdk's Context, Response, Logger and event decoding."""

    def test_json_event_arrives_as_dict(self, nuclio_platform: tuple[ModuleType, Any], reference: Detector) -> None:
        main, platform = nuclio_platform
        png = _png(seed=7)
        event = _nuclio_event(json.dumps({"image": _b64(png), "threshold": 0.0}).encode(), "application/json")
        assert isinstance(event.body, dict)
        response = platform.call_handler(main.handler, event)
        assert (response.status_code, response.content_type) == (200, "application/json")
        assert json.loads(response.body) == to_cvat(reference.predict([decode_image(png)], 0.0)[0])

    def test_other_content_types_arrive_as_bytes(
        self, nuclio_platform: tuple[ModuleType, Any], reference: Detector
    ) -> None:
        main, platform = nuclio_platform
        png = _png(seed=8)
        event = _nuclio_event(json.dumps({"image": _b64(png), "threshold": 0.0}).encode(), "text/plain")
        assert isinstance(event.body, bytes)
        response = platform.call_handler(main.handler, event)
        assert json.loads(response.body) == to_cvat(reference.predict([decode_image(png)], 0.0)[0])

    def test_unparseable_json_is_a_400(self, nuclio_platform: tuple[ModuleType, Any]) -> None:
        main, platform = nuclio_platform
        event = _nuclio_event(b'{"image": ', "application/json")  # nuclio hands the bytes over undecoded
        response = platform.call_handler(main.handler, event)
        assert response.status_code == 400 and "not valid JSON" in json.loads(response.body)["error"]


# ------------------------------------------------------ a segmenting model, under nuclio-sdk, as CVAT parses it


@pytest.fixture(scope="module")
def mask_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Detector]:
    from d2ops.testing import build_tiny_bundle

    bundle = build_tiny_bundle(tmp_path_factory.mktemp("maskrcnn"), masks=True)
    out = tmp_path_factory.mktemp("nuclio-mask") / "fn"
    export_nuclio(bundle, out, threshold=0.0)
    return out, Detector.from_bundle(bundle, device="cpu")


class TestMaskFunctionUnderNuclioSdk:
    """The exported Mask R-CNN function under nuclio-sdk's test Platform (its Context, Logger, Response).

    Reply shapes as CVAT's ``cvat/apps/lambda_manager/views.py`` ``LambdaJob._call_detector`` reads them: a
    ``mask`` shape's ``mask`` is the row-major 0/255 crop of the inclusive box followed by
    ``[xtl, ytl, xbr, ybr]``, its ``points`` the outline used for "convert masks to polygons"; a
    ``polygon`` shape's ``points`` are ``x, y`` pairs. Before, every outer contour was its own polygon.
    """

    @pytest.mark.parametrize("shape", ["mask", "polygon"])
    def test_one_shape_per_object_in_the_shape_the_env_asks_for(
        self, mask_export: tuple[Path, Detector], shape: str
    ) -> None:
        pytest.importorskip("nuclio_sdk")
        from nuclio_sdk.test import Platform

        out, reference = mask_export
        png = _png(seed=11)
        expected = reference.predict([decode_image(png)], 0.0)[0]
        with exported_main(out / "cpu") as main, pytest.MonkeyPatch.context() as mp:
            mp.setenv("D2OPS_CVAT_SHAPE", shape)
            event = _nuclio_event(json.dumps({"image": _b64(png)}).encode(), "application/json")
            response = Platform().call_handler(main.handler, event)
        assert (response.status_code, response.content_type) == (200, "application/json")
        replies = json.loads(response.body)
        assert len(expected) > 3 and len(replies) == len(expected)  # one shape per object
        assert replies == json.loads(json.dumps(to_cvat(expected, shape)))
        for reply, det in zip(replies, expected, strict=True):
            assert reply["type"] == shape and reply["label"] == det.label
            outline = reply["points"]
            assert len(outline) >= 6 and len(outline) % 2 == 0
            if shape == "mask":
                *crop, xtl, ytl, xbr, ybr = reply["mask"]
                assert [xtl, ytl, xbr, ybr] == list(det.mask_box) and set(crop) <= {0, 255}
                values = np.asarray(crop, dtype=np.uint8).reshape(ybr - ytl + 1, xbr - xtl + 1)
                assert np.array_equal(values == 255, det.mask if det.mask.any() else np.ones_like(det.mask))
            else:
                assert "mask" not in reply

    def test_an_unknown_shape_stops_the_function_at_start(self, mask_export: tuple[Path, Detector]) -> None:
        pytest.importorskip("nuclio_sdk")
        import nuclio_sdk

        out, _ = mask_export
        with exported_main(out / "cpu") as main, pytest.MonkeyPatch.context() as mp:
            mp.setenv("D2OPS_CVAT_SHAPE", "ellipse")
            context = nuclio_sdk.Context(platform=None, logger=nuclio_sdk.Logger(10))
            with pytest.raises(ValueError, match=r"D2OPS_CVAT_SHAPE.*mask, polygon"):
                main.init_context(context)
