"""The clearml-serving engine and ``d2ops serving register``, driven by clearml-serving's own code.

clearml-serving loads d2ops/serving/clearml_engine.py the way it does in a serving container
(``CustomPreprocessRequest._instantiate_custom_preprocess_cls``: the preprocess artifact imported
as a standalone module) and runs requests through ``ModelRequestProcessor._process_request``; the one
stand-in is the model registry download (``_get_local_model_file`` returns the tiny bundle). The
register commands are parsed by clearml-serving's own CLI parser, with its server calls replaced.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from d2ops.clearml.serving import EndpointRegistration, RegistrationError, build_register_command
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


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path) -> Detector:
    return Detector.from_bundle(tiny_bundle, device="cpu")


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


def _processor(model_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """clearml-serving's custom-engine request object with d2ops/serving/clearml_engine.py as preprocess code."""
    from clearml_serving.serving.endpoints import ModelEndpoint
    from clearml_serving.serving.preprocess_service import BasePreprocessRequest, CustomPreprocessRequest

    monkeypatch.setenv("D2OPS_DEVICE", "cpu")
    monkeypatch.setenv("D2OPS_SCORE_THRESHOLD", "0.1")
    monkeypatch.setenv("D2OPS_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(BasePreprocessRequest, "_get_local_model_file", lambda self: str(model_path))
    endpoint = ModelEndpoint(
        engine_type="custom", serving_url="shapes", model_id=MODEL_ID, preprocess_artifact="py_code_shapes"
    )
    task = SimpleNamespace(id="serving-task", artifacts={"py_code_shapes": _Artifact(PREPROCESS_FILE)})
    return CustomPreprocessRequest(model_endpoint=endpoint, task=task)


def _serve(processor: Any, body: Any, stats: queue.Queue[dict[str, Any]] | None = None) -> Any:
    """One request through clearml-serving's ``_process_request`` (with statistics collection when ``stats``)."""
    from clearml_serving.serving.model_request_processor import ModelRequestProcessor

    server = SimpleNamespace(
        _metric_logging={},
        _kafka_stats_url="kafka:9092" if stats is not None else None,
        _metric_log_freq=1.0,
        _stats_queue=stats,
    )
    coroutine = ModelRequestProcessor._process_request(server, processor=processor, url="shapes", body=body)
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def bundle_zip(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = shutil.make_archive(str(tmp_path_factory.mktemp("zip") / "tiny"), "zip", root_dir=tiny_bundle)
    return Path(archive)


@pytest.mark.parametrize("local_copy", ["folder", "zip"])
def test_loaded_by_clearml_serving_and_matches_the_detector(
    local_copy: str,
    tiny_bundle: Path,
    bundle_zip: Path,
    reference: Detector,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    processor = _processor(tiny_bundle if local_copy == "folder" else bundle_zip, monkeypatch, tmp_path)
    user = processor._preprocess
    assert type(user).__module__ == "Preprocess"  # imported from the file, as in a serving container
    assert processor._model is user.detector and user.detector.labels == ["square", "circle", "triangle"]

    png = _png()
    reply = _serve(processor, {"image": base64.b64encode(png).decode(), "threshold": 0.0})
    expected = to_cvat(reference.predict([decode_image(png)], 0.0)[0])
    assert expected and reply == {"detections": expected}


def test_raw_image_bytes_and_json_bytes(
    tiny_bundle: Path, reference: Detector, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    processor = _processor(tiny_bundle, monkeypatch, tmp_path)
    png = _png(seed=4)
    detections = reference.predict([decode_image(png)], 0.0)[0]
    at_default = to_cvat([d for d in detections if d.score >= 0.1])  # D2OPS_SCORE_THRESHOLD
    assert _serve(processor, png) == {"detections": at_default}
    as_json_bytes = json.dumps({"image": base64.b64encode(png).decode(), "threshold": 0.0}).encode()
    assert _serve(processor, as_json_bytes) == {"detections": to_cvat(detections)}


def test_custom_statistics_reach_clearml_serving(
    tiny_bundle: Path, reference: Detector, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    processor = _processor(tiny_bundle, monkeypatch, tmp_path)
    stats: queue.Queue[dict[str, Any]] = queue.Queue()
    reply = _serve(processor, {"image": base64.b64encode(_png()).decode(), "threshold": 0.0}, stats)
    sent = stats.get_nowait()
    assert sent["detections"] == len(reply["detections"]) and sent["_url"] == "shapes"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"image": "%%%"}, "not valid base64"),
        ({"threshold": 0.3}, "no 'image' field"),
        ({"image": base64.b64encode(_png()).decode(), "threshold": "high"}, "between 0 and 1"),
        (_png()[:300], "truncated or corrupt"),
        (b"GIF89a broken", "not an image"),
        (b"", "empty image"),
    ],
)
def test_bad_requests_raise_value_error_which_clearml_serving_answers_422(
    body: Any, message: str, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    processor = _processor(tiny_bundle, monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=message):
        _serve(processor, body)


def test_a_model_that_is_not_a_bundle_fails_to_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "weights.pkl").write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="not a d2ops bundle"):
        _processor(tmp_path / "weights.pkl", monkeypatch, tmp_path)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_fastapi_hands_json_as_dict_and_other_bodies_as_bytes(
    tiny_bundle: Path, reference: Detector, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """clearml-serving's route signature, ``request: Union[bytes, Dict]``, on the installed FastAPI."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    processor = _processor(tiny_bundle, monkeypatch, tmp_path)
    app = fastapi.FastAPI()

    @app.post("/serve/{model_id}")
    async def serve_model(model_id: str, request: bytes | dict[Any, Any] | None = None) -> Any:
        try:
            return _serve_sync(processor, request)
        except ValueError as ex:  # clearml_serving/serving/main.py: ValueError -> 422
            raise fastapi.HTTPException(status_code=422, detail=f"Error [{type(ex)}] processing request: {ex}") from ex

    png = _png(seed=5)
    expected = to_cvat([d for d in reference.predict([decode_image(png)], 0.0)[0] if d.score >= 0.1])
    with TestClient(app) as client:
        raw = client.post("/serve/shapes", content=png, headers={"Content-Type": "image/png"})
        assert raw.status_code == 200 and raw.json() == {"detections": expected}
        as_json = client.post("/serve/shapes", json={"image": base64.b64encode(png).decode()})
        assert as_json.status_code == 200 and as_json.json() == {"detections": expected}
        bad = client.post("/serve/shapes", json={"image": "%%%"})
        assert bad.status_code == 422 and "not valid base64" in bad.json()["detail"]


def _serve_sync(processor: Any, body: Any) -> Any:
    state: dict[str, Any] = {}
    data = processor.preprocess(body, state, None)
    return processor.postprocess(processor.process(data, state, None), state, None)


# --------------------------------------------------------------------------------------- registration


def _parsed_by_clearml_serving(cmd: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """Parse ``cmd`` with clearml-serving's CLI, recording which command it would run with which args."""
    import clearml_serving.__main__ as cs_cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(cs_cli, "func_model_endpoint_add", lambda args: seen.update(command="add", args=args))
    monkeypatch.setattr(cs_cli, "func_model_auto_update_add", lambda args: seen.update(command="auto", args=args))
    monkeypatch.setattr(sys, "argv", ["clearml-serving", *cmd[1:]])
    cs_cli.cli()
    return seen["command"], seen["args"]


def test_model_add_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = build_register_command(EndpointRegistration("detector/shapes", model_id=MODEL_ID, serving_service="svc1"))
    assert cmd == [
        "clearml-serving", "--id", "svc1", "model", "add", "--engine", "custom", "--endpoint", "detector/shapes",
        "--preprocess", str(PREPROCESS_FILE), "--model-id", MODEL_ID,
    ]  # fmt: skip
    command, args = _parsed_by_clearml_serving(cmd, monkeypatch)
    assert command == "add"
    assert (args.id, args.engine, args.endpoint, args.model_id) == ("svc1", "custom", "detector/shapes", MODEL_ID)
    assert Path(args.preprocess) == PREPROCESS_FILE and PREPROCESS_FILE.is_file()


def test_model_add_by_name_serves_published_models(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = EndpointRegistration("shapes", project="d2ops", name="shapes-frcnn", tags=("prod", "v2"), version="1")
    command, args = _parsed_by_clearml_serving(build_register_command(reg), monkeypatch)
    assert command == "add"
    assert (args.project, args.name, args.tags, args.published, args.version) == (
        "d2ops",
        "shapes-frcnn",
        ["prod", "v2"],
        True,
        "1",
    )
    assert args.model_id is None


def test_auto_update(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = EndpointRegistration(
        "shapes", project="d2ops", name="shapes-frcnn", auto_update=True, max_versions=3, published=False
    )
    command, args = _parsed_by_clearml_serving(build_register_command(reg), monkeypatch)
    assert command == "auto"
    assert (args.engine, args.endpoint, args.project, args.name) == ("custom", "shapes", "d2ops", "shapes-frcnn")
    assert (args.max_versions, args.published, args.tags) == (3, False, None)
    assert Path(args.preprocess) == PREPROCESS_FILE


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
        (EndpointRegistration("shapes", model_id=MODEL_ID, max_versions=2), "only applies with --auto-update"),
        (EndpointRegistration("s", project="p", name="n", auto_update=True, max_versions=0), "at least 1"),
    ],
)
def test_invalid_registrations(reg: EndpointRegistration, message: str) -> None:
    with pytest.raises(RegistrationError, match=message.replace("(", r"\(")):
        build_register_command(reg)


def test_cli_dry_run_prints_and_runs_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("--dry-run must not run anything")

    monkeypatch.setattr(subprocess, "run", no_run)
    argv = ["serving", "register", "--endpoint", "shapes", "--project", "d2ops", "--name", "shapes-frcnn"]
    assert cli_main([*argv, "--auto-update", "--max-versions", "2", "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip()
    assert "model auto-update --engine custom --endpoint shapes --preprocess" in printed
    assert printed.endswith("--project d2ops --name shapes-frcnn --published --max-versions 2")

    assert cli_main(["serving", "register", "--endpoint", "shapes", "--dry-run"]) == 2
    assert "exactly one of --model-id ID or --project P --name N" in capsys.readouterr().err


def test_cli_runs_the_command_as_an_argument_list(
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

    assert cli_main(["serving", "register", "--endpoint", "shapes", "--model-id", MODEL_ID, "--version", "2"]) == 2
    assert "clearml-serving exited with status 1" in capsys.readouterr().err
