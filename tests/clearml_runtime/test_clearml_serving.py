"""The clearml-serving engine and ``d2ops serving register``, driven by clearml-serving 1.3.5's own code.

Requests go through ``ModelRequestProcessor.process_request`` (clearml_serving/serving/
model_request_processor.py), the public coroutine its FastAPI route awaits: endpoint lookup, canary,
the engine class (``CustomPreprocessRequest`` / ``CustomAsyncPreprocessRequest`` in
preprocess_service.py, which import d2ops/serving/clearml_engine.py as a standalone module) and
``_process_request`` with its statistics. Endpoints and metric logging are added with the processor's
own ``add_endpoint`` and ``add_metric_logging``. Two things are replaced, the outermost boundaries:
``_get_control_plane_task`` (a ClearML server query) answers with an object holding the task id and
the preprocess artifact, and ``BasePreprocessRequest._get_local_model_file`` (the model registry
download) answers with the tiny bundle. What that cannot show: the server side of ClearML (artifact
upload and download, the model registry); tests/clearml_runtime/test_clearml_serving_app.py runs registration and
the real uvicorn app against an offline task.

The register commands are parsed by clearml-serving's own CLI parser (``clearml_serving/__main__.py``
``cli``), with the command functions it would dispatch to recorded instead of run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from d2ops.clearml.serving import EndpointRegistration, RegistrationError, build_register_commands
from d2ops.cli import main as cli_main
from d2ops.model.detector import Detector
from d2ops.serving.clearml_engine import PREPROCESS_FILE
from d2ops.serving.formats import decode_image
from d2ops.serving.replies import to_cvat

pytest.importorskip("clearml_serving")

MODEL_ID = "0123456789abcdef0123456789abcdef"


def _png(seed: int = 3, width: int = 150, height: int = 110) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[20:80, 30:100] = (200, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _multipart(
    files: list[bytes], fields: dict[str, str] | None = None, boundary: str = "d2opsBoundary7MA4YWxk"
) -> bytes:
    """A form as curl -F / requests write it (RFC 7578)."""
    out = b""
    for name, value in (fields or {}).items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for i, data in enumerate(files):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="img{i}.png"\r\n'
        out += head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path) -> Detector:
    return Detector.from_bundle(tiny_bundle, device="cpu")


def _expected(reference: Detector, png: bytes, threshold: float) -> list[dict[str, Any]]:
    return to_cvat(reference.predict([decode_image(png)], threshold)[0])


def _expected_batch(reference: Detector, pngs: list[bytes], threshold: float) -> list[list[dict[str, Any]]]:
    """One forward pass over all images, as the engine runs a batch (padding changes the last float digits)."""
    return [to_cvat(dets) for dets in reference.predict([decode_image(p) for p in pngs], threshold)]


# ------------------------------------------------------------------ the engine, inside clearml-serving


class _Artifact:
    """What ``task.artifacts[name]`` gives clearml-serving: a local copy and its hash."""

    def __init__(self, path: Path) -> None:
        from clearml.binding.artifacts import Artifacts
        from clearml.storage.util import sha256sum

        self.path = path
        self.hash = sha256sum(str(path), block_size=Artifacts._hash_block_size)[0]

    def get_local_copy(self, extract_archive: bool = True, force_download: bool = False) -> str:
        return str(self.path)


def _server(
    model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *,
    engine: str = "custom",
    metrics: dict[str, Any] | None = None,
) -> Any:
    """clearml-serving's ModelRequestProcessor serving endpoint ``shapes`` with d2ops's engine.

    ``metrics``: metric logging of the endpoint (``add_metric_logging``, what ``metrics add`` runs),
    with statistics collection switched on as a Kafka server address in the service configuration does.
    """
    from clearml_serving.serving.endpoints import EndpointMetricLogging, ModelEndpoint
    from clearml_serving.serving.model_request_processor import ModelRequestProcessor
    from clearml_serving.serving.preprocess_service import BasePreprocessRequest

    monkeypatch.setenv("D2OPS_DEVICE", "cpu")
    monkeypatch.setenv("D2OPS_SCORE_THRESHOLD", "0.1")
    monkeypatch.setenv("D2OPS_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(BasePreprocessRequest, "_get_local_model_file", lambda self: str(model_path))
    control = SimpleNamespace(
        id="serving-task",
        artifacts={"py_code_shapes": _Artifact(PREPROCESS_FILE)},
        get_logger=lambda: SimpleNamespace(report_text=print),
    )
    monkeypatch.setattr(ModelRequestProcessor, "_get_control_plane_task", classmethod(lambda cls, **kw: control))
    server = ModelRequestProcessor(task_id="serving-task")
    server.add_endpoint(
        ModelEndpoint(engine_type=engine, serving_url="shapes", model_id=MODEL_ID, preprocess_artifact="py_code_shapes")
    )
    config: dict[str, Any] = {}
    if metrics is not None:
        server.add_metric_logging(EndpointMetricLogging(endpoint="shapes", metrics=metrics))
        config["kafka_service_server"] = "kafka:9092"
    server._deserialize_conf_dict(config)  # what deserialize() does with the service's General section
    return server


def _serve(server: Any, body: Any, endpoint: str = "shapes") -> Any:
    return asyncio.run(server.process_request(base_url=endpoint, version=None, request_body=body))


@pytest.fixture(scope="module")
def bundle_zip(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = shutil.make_archive(str(tmp_path_factory.mktemp("zip") / "tiny"), "zip", root_dir=tiny_bundle)
    return Path(archive)


@pytest.mark.parametrize(
    ("local_copy", "engine"), [("folder", "custom"), ("zip", "custom"), ("folder", "custom_async")]
)
def test_loaded_by_clearml_serving_and_matches_the_detector(
    local_copy: str,
    engine: str,
    tiny_bundle: Path,
    bundle_zip: Path,
    reference: Detector,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    server = _server(tiny_bundle if local_copy == "folder" else bundle_zip, monkeypatch, tmp_path, engine=engine)
    png = _png()
    reply = _serve(server, {"image": _b64(png), "threshold": 0.0})
    expected = _expected(reference, png, 0.0)
    assert expected and reply == {"detections": expected}
    processor = server._engine_processor_lookup["shapes"]
    assert (
        type(processor).__name__
        == {"custom": "CustomPreprocessRequest", "custom_async": "CustomAsyncPreprocessRequest"}[engine]
    )
    assert type(processor._preprocess).__module__ == "Preprocess"  # imported from the file, as in a serving container
    assert processor._model is processor._preprocess.detector


def test_raw_image_bytes_and_json_bytes(
    tiny_bundle: Path, reference: Detector, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = _server(tiny_bundle, monkeypatch, tmp_path)
    png = _png(seed=4)
    assert _serve(server, png) == {"detections": _expected(reference, png, 0.1)}  # D2OPS_SCORE_THRESHOLD
    as_json_bytes = json.dumps({"image": _b64(png), "threshold": 0.0}).encode()
    assert _serve(server, as_json_bytes) == {"detections": _expected(reference, png, 0.0)}


@pytest.mark.parametrize("engine", ["custom", "custom_async"])
def test_images_batch_gets_one_list_per_image_like_d2ops_serve(
    engine: str, tiny_bundle: Path, reference: Detector, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``{"images": [...]}``: one reply list per image, as ``POST /predict`` of d2ops serve answers (failed before:
    the engine took only ``image``)."""
    server = _server(tiny_bundle, monkeypatch, tmp_path, engine=engine)
    pngs = [_png(seed=s) for s in (5, 6, 7)]
    reply = _serve(server, {"images": [_b64(p) for p in pngs], "threshold": 0.0})
    assert reply == {"detections": _expected_batch(reference, pngs, 0.0)}
    one = _serve(server, {"images": [_b64(pngs[0])], "threshold": 0.0})
    assert one == {"detections": [_expected(reference, pngs[0], 0.0)]}  # a list of one list, as d2ops serve


def test_multipart_uploads_like_the_torchserve_route(
    tiny_bundle: Path, reference: Detector, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """clearml-serving hands a multipart body over as bytes (``serve_model(request: Union[bytes, Dict])``);
    one file -> one list, several -> one list each, an optional ``threshold`` field (failed before: 422)."""
    server = _server(tiny_bundle, monkeypatch, tmp_path)
    pngs = [_png(seed=8), _png(seed=9)]
    assert _serve(server, _multipart(pngs[:1])) == {"detections": _expected(reference, pngs[0], 0.1)}
    reply = _serve(server, _multipart(pngs, {"threshold": "0.0"}))
    assert reply == {"detections": _expected_batch(reference, pngs, 0.0)}


def test_custom_statistic_reaches_the_stats_queue_as_a_number(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With metric logging configured for the endpoint (``add_metric_logging``, what ``clearml-serving metrics
    add`` runs), ``_process_request`` copies every request and reply key named like a logged metric over the
    custom statistics. The statistic used to be called ``detections``, the reply's key, so a list of shapes
    reached the queue and the Prometheus histogram could never observe it; ``detection_count`` stays a number.
    """
    logged = {
        "detection_count": {"type": "scalar", "buckets": [0, 1, 2, 5, 10, 20, 50, 100]},
        "detections": {"type": "scalar", "buckets": [0, 1, 2, 5, 10, 20, 50, 100]},  # a user logging the old name
    }
    server = _server(tiny_bundle, monkeypatch, tmp_path, metrics=logged)
    reply = _serve(server, {"image": _b64(_png()), "threshold": 0.0})
    sent = server._stats_queue.get(block=False)
    assert sent["_url"] == "shapes" and isinstance(sent["_latency"], float)
    assert type(sent["detection_count"]) is int and sent["detection_count"] == len(reply["detections"]) > 0
    assert sent["image_count"] == 1

    batch = _serve(server, {"images": [_b64(_png(seed=1)), _b64(_png(seed=2))], "threshold": 0.0})
    sent = server._stats_queue.get(block=False)
    assert sent["detection_count"] == sum(len(r) for r in batch["detections"]) and sent["image_count"] == 2


def test_async_engine_keeps_the_event_loop_free(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under ``custom_async`` clearml-serving awaits the three calls (``CustomAsyncPreprocessRequest``); the model
    runs in a thread, so while one request's forward pass is held, the loop still runs other coroutines."""
    server = _server(tiny_bundle, monkeypatch, tmp_path, engine="custom_async")
    _serve(server, {"image": _b64(_png()), "threshold": 0.0})  # loads the engine
    detector = server._engine_processor_lookup["shapes"]._preprocess.detector
    release = threading.Event()
    real_predict = detector.predict

    def slow_predict(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(detector, "predict", slow_predict)

    async def scenario() -> tuple[float, Any]:
        slow = asyncio.ensure_future(
            server.process_request(base_url="shapes", version=None, request_body={"image": _b64(_png())})
        )
        start = time.monotonic()
        await asyncio.sleep(0.2)  # would not return before the forward pass if it ran on the loop
        ticked = time.monotonic() - start
        release.set()
        return ticked, await slow

    ticked, reply = asyncio.run(scenario())
    assert ticked < 2 and reply["detections"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"image": "%%%"}, "not valid base64"),
        ({"threshold": 0.3}, "exactly one of 'image'"),
        ({"image": _b64(_png()), "images": []}, "exactly one of 'image'"),
        ({"images": []}, "non-empty list"),
        ({"images": [_b64(_png()), "%%%"]}, r"images\[1\]: 'image' is not valid base64"),
        ({"images": [_b64(_png())] * 17}, "17 images in one request is over the limit of 16"),
        ({"image": _b64(_png()), "threshold": "high"}, "between 0 and 1"),
        (_png()[:300], "truncated or corrupt"),
        (b"GIF89a broken", "not an image"),
        (b"", "empty image"),
        (_multipart([]), "has no file"),
        (_multipart([_png()])[:200], "truncated"),
        (_multipart([_png(), b"not an image"]), "file 2 of the form"),
        (_multipart([_png()], {"threshold": "2"}), "between 0 and 1"),
        (b"--\r\nnot a form", "first line is not a boundary"),
    ],
)
def test_bad_requests_raise_value_error_which_clearml_serving_answers_422(
    body: Any, message: str, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = _server(tiny_bundle, monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=message):
        _serve(server, body)


def test_a_model_that_is_not_a_bundle_fails_to_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "weights.pkl").write_bytes(b"not a bundle")
    server = _server(tmp_path / "weights.pkl", monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="not a d2ops bundle"):
        _serve(server, _png())


def test_auto_update_sync_chokes_on_a_slash_in_the_endpoint_while_holding_the_lock() -> None:
    """Why ``/`` is refused: ``ModelRequestProcessor._sync_monitored_models`` (run by ``deserialize`` after it set
    ``_update_lock_flag``, which every ``process_request`` waits on) reads the version as
    ``int(url.split("/", 1)[1])``: ``detector/shapes/1`` gives ``int('shapes/1')``."""
    from clearml_serving.serving.model_request_processor import ModelRequestProcessor

    server = ModelRequestProcessor.__new__(ModelRequestProcessor)
    server._model_monitoring_update_request = True
    server._model_monitoring_versions = {"detector/shapes": {2: MODEL_ID}}
    server._model_monitoring_endpoints = {"detector/shapes/1": None}
    with pytest.raises(ValueError, match="invalid literal for int"):
        server._sync_monitored_models()
    with pytest.raises(RegistrationError, match="'/' is not allowed"):
        build_register_commands(EndpointRegistration("detector/shapes", project="p", name="n", auto_update=True))


# --------------------------------------------------------------------------------------- registration


def _parsed_by_clearml_serving(cmd: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """Parse ``cmd`` with clearml-serving's CLI, recording which command it would run with which args."""
    import clearml_serving.__main__ as cs_cli

    seen: dict[str, Any] = {}
    for name, label in (
        ("func_model_endpoint_add", "add"),
        ("func_model_auto_update_add", "auto"),
        ("func_canary_add", "canary"),
    ):
        monkeypatch.setattr(cs_cli, name, lambda args, label=label: seen.update(command=label, args=args))
    monkeypatch.setattr(sys, "argv", ["clearml-serving", *cmd[1:]])
    cs_cli.cli()
    assert cs_cli.answer_yes is True  # --yes: verify_session_version answers its y/n prompt itself
    return seen["command"], seen["args"]


def test_model_add_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    (cmd,) = build_register_commands(EndpointRegistration("shapes", model_id=MODEL_ID, serving_service="svc1"))
    assert cmd == [
        "clearml-serving", "--yes", "--id", "svc1", "model", "add", "--engine", "custom_async",
        "--endpoint", "shapes", "--preprocess", str(PREPROCESS_FILE), "--model-id", MODEL_ID,
    ]  # fmt: skip
    command, args = _parsed_by_clearml_serving(cmd, monkeypatch)
    assert command == "add" and args.yes
    assert (args.id, args.engine, args.endpoint, args.model_id) == ("svc1", "custom_async", "shapes", MODEL_ID)
    assert Path(args.preprocess) == PREPROCESS_FILE and PREPROCESS_FILE.is_file()


def test_model_add_by_name_serves_published_models(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = EndpointRegistration(
        "shapes", project="d2ops", name="shapes-frcnn", tags=("prod", "v2"), version="1", engine="custom"
    )
    (cmd,) = build_register_commands(reg)
    command, args = _parsed_by_clearml_serving(cmd, monkeypatch)
    assert command == "add" and args.engine == "custom"
    assert (args.project, args.name, args.tags, args.published, args.version) == (
        "d2ops",
        "shapes-frcnn",
        ["prod", "v2"],
        True,
        "1",
    )
    assert args.model_id is None


def test_auto_update_adds_a_canary_from_the_plain_name_to_the_newest_version(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = EndpointRegistration(
        "shapes", project="d2ops", name="shapes-frcnn", auto_update=True, max_versions=3, published=False
    )
    auto, canary = build_register_commands(reg)
    command, args = _parsed_by_clearml_serving(auto, monkeypatch)
    assert command == "auto"
    assert (args.engine, args.endpoint, args.project, args.name) == ("custom_async", "shapes", "d2ops", "shapes-frcnn")
    assert (args.max_versions, args.published, args.tags) == (3, False, None)
    assert Path(args.preprocess) == PREPROCESS_FILE
    command, args = _parsed_by_clearml_serving(canary, monkeypatch)
    assert command == "canary"
    assert (args.endpoint, args.weights, args.input_endpoint_prefix, args.input_endpoints) == (
        "shapes",
        [1.0],
        "shapes/",
        None,
    )


def test_canary_routes_the_plain_name_to_the_newest_version(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The canary the auto-update registration adds, run through clearml-serving's ``add_canary_endpoint``,
    ``_update_canary_lookup`` and ``process_request``: ``/serve/shapes`` goes to the newest ``shapes/<N>``."""
    from clearml_serving.serving.endpoints import CanaryEP, ModelEndpoint

    server = _server(tiny_bundle, monkeypatch, tmp_path)
    for version in ("1", "2", "10"):
        url = f"shapes/{version}"
        server._model_monitoring_endpoints[url] = ModelEndpoint(
            engine_type="custom", serving_url="shapes", version=version, model_id=MODEL_ID,
            preprocess_artifact="py_code_shapes",
        )  # fmt: skip  # what _sync_monitored_models builds from the monitored model versions
    server._endpoints.pop("shapes")
    (_, canary) = build_register_commands(EndpointRegistration("shapes", project="p", name="n", auto_update=True))
    prefix = canary[canary.index("--input-endpoint-prefix") + 1]
    server.add_canary_endpoint(CanaryEP(endpoint="shapes", weights=[1.0], load_endpoint_prefix=prefix))
    server._update_canary_lookup()
    assert server._canary_route["shapes"] == {"endpoints": ["shapes/10"], "weights": [1.0]}
    assert _serve(server, {"image": _b64(_png()), "threshold": 0.0})["detections"]
    assert list(server._engine_processor_lookup) == ["shapes/10"]


@pytest.mark.parametrize(
    ("reg", "message"),
    [
        (EndpointRegistration("shapes"), "exactly one of --model-id"),
        (EndpointRegistration("shapes", model_id=MODEL_ID, project="p", name="n"), "exactly one of --model-id"),
        (EndpointRegistration("shapes", project="p"), "--project and --name go together"),
        (EndpointRegistration("shapes", name="n"), "--project and --name go together"),
        (EndpointRegistration("shapes", model_id="not-an-id"), "not a ClearML model id"),
        (EndpointRegistration("shapes", model_id=MODEL_ID, auto_update=True), "--auto-update follows"),
        (EndpointRegistration("shapes", model_id=MODEL_ID, tags=("a",)), "drop them with --model-id"),
        (EndpointRegistration("bad endpoint", model_id=MODEL_ID), "--endpoint 'bad endpoint'"),
        (EndpointRegistration("detector/shapes", model_id=MODEL_ID), "'/' is not allowed.*'detector-shapes'"),
        (EndpointRegistration("shapes", model_id=MODEL_ID, version="v/1"), "--version 'v/1': use one path segment"),
        (EndpointRegistration("shapes", model_id=MODEL_ID, engine="triton"), "--engine 'triton'"),
        (EndpointRegistration("shapes", model_id=MODEL_ID, max_versions=2), "only applies with --auto-update"),
        (EndpointRegistration("s", project="p", name="n", auto_update=True, max_versions=0), "at least 1"),
    ],
)
def test_invalid_registrations(reg: EndpointRegistration, message: str) -> None:
    with pytest.raises(RegistrationError, match=message.replace("(", r"\(")):
        build_register_commands(reg)


def test_cli_dry_run_prints_and_runs_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("--dry-run must not run anything")

    monkeypatch.setattr(subprocess, "run", no_run)
    argv = ["serving", "register", "--endpoint", "shapes", "--project", "d2ops", "--name", "shapes-frcnn"]
    assert cli_main([*argv, "--auto-update", "--max-versions", "2", "--dry-run"]) == 0
    auto, canary = capsys.readouterr().out.strip().splitlines()
    assert "--yes model auto-update --engine custom_async --endpoint shapes --preprocess" in auto
    assert auto.endswith("--project d2ops --name shapes-frcnn --published --max-versions 2")
    assert canary.endswith("--yes model canary --endpoint shapes --weights 1 --input-endpoint-prefix shapes/")

    assert cli_main(["serving", "register", "--endpoint", "shapes", "--dry-run"]) == 2
    assert "exactly one of --model-id ID or --project P --name N" in capsys.readouterr().err
    assert cli_main(["serving", "register", "--endpoint", "a/b", "--model-id", MODEL_ID, "--dry-run"]) == 2
    assert "'/' is not allowed" in capsys.readouterr().err


def test_cli_runs_the_commands_as_argument_lists(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []

    def record(cmd: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, kwargs))
        return subprocess.CompletedProcess(cmd, 1 if "--version" in cmd else 0)

    monkeypatch.setattr(subprocess, "run", record)
    assert cli_main(["serving", "register", "--endpoint", "shapes", "--model-id", MODEL_ID]) == 0
    cmd, kwargs = calls[0]
    assert isinstance(cmd, list) and not kwargs.get("shell")
    assert cmd[-4:] == ["--preprocess", str(PREPROCESS_FILE), "--model-id", MODEL_ID]
    assert capsys.readouterr().out.strip().endswith(f"--model-id {MODEL_ID}")

    calls.clear()
    argv = ["serving", "register", "--endpoint", "shapes", "--project", "p", "--name", "n", "--auto-update"]
    assert cli_main([*argv, "--engine", "custom"]) == 0
    assert [c[c.index("model") + 1] for c, _ in calls] == ["auto-update", "canary"]

    assert cli_main(["serving", "register", "--endpoint", "shapes", "--model-id", MODEL_ID, "--version", "2"]) == 2
    assert "clearml-serving exited with status 1" in capsys.readouterr().err
