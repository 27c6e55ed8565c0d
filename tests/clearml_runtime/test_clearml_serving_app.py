"""``d2ops serving register`` and the engine, run through clearml-serving 1.3.5's real CLI and real FastAPI app.

A driver process (this file's ``__main__``) does what a deployment does, with clearml-serving's own code:

1. runs each command ``build_register_commands`` makes through ``clearml_serving.__main__.main`` (the
   ``clearml-serving`` console script) with stdin closed, as an unattended run has it. Those call the real
   ``ModelRequestProcessor.add_endpoint`` / ``add_model_monitoring`` / ``add_canary_endpoint`` /
   ``add_metric_logging`` / ``configure`` and ``serialize`` on an OFFLINE ClearML task
   (``Task.set_offline(True)``: configuration objects, parameters and the uploaded preprocess artifact
   are stored in the offline session);
2. imports ``clearml_serving.serving.main`` (``setup_task`` at import, ``ModelRequestProcessor.launch``
   at startup: ``deserialize`` with artifact download, ``_update_monitored_models``,
   ``_sync_monitored_models``, ``_update_canary_lookup``, the statistics thread ``_stats_send_loop``)
   and serves its ``app`` with uvicorn on 127.0.0.1; the tests send HTTP requests to ``/serve/...``.

Replaced, the outermost boundaries only: ``ModelRequestProcessor._get_control_plane_task`` (a ClearML
server query) returns the offline task; ``BasePreprocessRequest._get_local_model_file`` (the registry
download) returns a local tiny bundle per model id; ``Model.query_models`` (the registry query of
``--project/--name`` and auto-update) returns the test's model ids, newest first; the Kafka broker is a
``kafka`` module whose producer appends what ``_stats_send_loop`` sends, serialised by clearml-serving's own
``value_serializer``, to a file. What that cannot show: a ClearML server's behaviour (task status,
artifact storage, model registry, the ``input models`` of the service task), a real Kafka broker, and
that lz4 compression is available (the image installs it; tests/unit/test_docker.py checks the requirement).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STARTED = "D2OPS-DRIVER-REGISTERED "


def _driver(cfg: dict[str, Any]) -> None:  # pragma: no cover - runs in the driver process
    """Register with clearml-serving's CLI against an offline task, then serve its app (see the module docstring)."""
    import types

    from clearml import Model, Task

    Task.set_offline(True)
    from clearml_serving.serving.model_request_processor import ModelRequestProcessor
    from clearml_serving.serving.preprocess_service import BasePreprocessRequest

    control: Any = Task.init(
        project_name="DevOps",
        task_name="d2ops serving",
        task_type=Task.TaskTypes.service,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        auto_resource_monitoring=False,
    )
    control.set_system_tags([ModelRequestProcessor._system_tag])

    def control_plane_task(cls: Any, task_id: Any = None, **kwargs: Any) -> Any:
        return control

    ModelRequestProcessor._get_control_plane_task = classmethod(control_plane_task)

    def query_models(cls: Any, max_results: int | None = None, **kwargs: Any) -> list[Any]:
        return [types.SimpleNamespace(id=model_id) for model_id in cfg["models"][:max_results]]

    Model.query_models = classmethod(query_models)  # type: ignore[method-assign,assignment]
    BasePreprocessRequest._get_local_model_file = lambda self: cfg["bundles"][self.model_endpoint.model_id]

    kafka_log = Path(cfg["kafka_log"])

    class KafkaProducer:
        def __init__(self, bootstrap_servers: str, value_serializer: Any, compression_type: str) -> None:
            self.value_serializer = value_serializer
            assert compression_type == "lz4"

        def send(self, topic: str, value: Any) -> Any:
            with kafka_log.open("ab") as out:
                out.write(json.dumps({"topic": topic, "value": self.value_serializer(value).decode()}).encode() + b"\n")
            return types.SimpleNamespace(get=lambda: None)

    kafka = types.ModuleType("kafka")
    kafka.KafkaProducer = KafkaProducer  # type: ignore[attr-defined]
    errors = types.ModuleType("kafka.errors")
    errors.MessageSizeTooLargeError = type("MessageSizeTooLargeError", (Exception,), {})  # type: ignore[attr-defined]
    kafka.errors = errors  # type: ignore[attr-defined]
    sys.modules.update({"kafka": kafka, "kafka.errors": errors})

    import clearml_serving.__main__ as cs_cli

    codes: list[Any] = []
    for cmd in cfg["commands"]:
        sys.argv = cmd
        try:
            cs_cli.main()
            codes.append(0)
        except SystemExit as done:
            codes.append(done.code)
    print(STARTED + json.dumps(codes), flush=True)
    if not cfg.get("port"):
        return

    import uvicorn

    # The serving service's own process is not the inference one: close it so that setup_task can
    # Task.init the inference instance (ClearML allows one Task.init per process at a time). Its repository and
    # requirements analysis is stopped first (ClearML's own negative-timeout path): in a fresh clone it was seen
    # to run past the 300 s close() waits for it, so the app never listened; a deployment's control plane is
    # made by clearml-serving's CLI, not by a script like this one.
    control._wait_for_repo_detection(timeout=-1)
    control.close()
    from clearml_serving.serving import main as serving_main

    uvicorn.run(serving_main.app, host="127.0.0.1", port=cfg["port"], log_level="warning")


if __name__ == "__main__":
    _driver(json.loads(sys.argv[1]))
    sys.exit(0)


# ------------------------------------------------------------------------------------------ the tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from d2ops.clearml.serving import EndpointRegistration, build_register_commands  # noqa: E402
from d2ops.testing import HOSTILE_INPUTS, HostileInput  # noqa: E402

pytest.importorskip("clearml_serving")
# 5 s or more on 2 cores (clearml-serving's CLI and app in a child process): `make test` runs these, not test-fast
pytestmark = pytest.mark.slow

OLD_MODEL, NEW_MODEL = "a" * 32, "b" * 32
METRICS_ADD = ["metrics", "add", "--endpoint", "fixed", "--variable-scalar", "detection_count=0,1,2,5,10,20,50,100"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _driver_env(tmp: Path) -> dict[str, str]:
    # TRAINS_PROC_MASTER_ID (ClearML's legacy name) is left by earlier in-process tasks of the suite; with it
    # the driver's Task.init thinks it is a child process and returns a stub.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_", "D2OPS_"))}
    env.update(
        CLEARML_CACHE_DIR=str(tmp / "clearml-cache"),
        CLEARML_OFFLINE_MODE="1",
        D2OPS_DEVICE="cpu",
        D2OPS_SCORE_THRESHOLD="0.0",
        D2OPS_MODEL_CACHE=str(tmp / "models"),
        CLEARML_SERVING_POLL_FREQ="5",
        PYTHONPATH=str(ROOT),
    )
    return env


def _start(tmp: Path, commands: list[list[str]], *, port: int | None, bundles: dict[str, str]) -> subprocess.Popen[str]:
    cfg = {
        "commands": commands,
        "port": port,
        "models": [NEW_MODEL, OLD_MODEL],  # newest first, as ClearML orders them
        "bundles": bundles,
        "kafka_log": str(tmp / "kafka.jsonl"),
    }
    # The driver runs from a copy outside the repository: ClearML's Task.init (the control plane's and
    # clearml-serving's setup_task) would otherwise analyse the whole git work tree, .venv included, and
    # wait up to 300 s for that before closing a task.
    driver = tmp / "clearml_serving_driver.py"
    shutil.copyfile(__file__, driver)
    return subprocess.Popen(
        [sys.executable, str(driver), json.dumps(cfg)],
        cwd=tmp,
        env=_driver_env(tmp),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _registered(proc: subprocess.Popen[str], output: list[str]) -> list[int]:
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith(STARTED):
            # keep reading, or the driver blocks once the pipe is full
            threading.Thread(target=output.extend, args=(proc.stdout,), daemon=True).start()
            return list(json.loads(line[len(STARTED) :]))
    raise AssertionError("the driver did not register:\n" + "".join(output))


def _post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _post_json(port: int, path: str, body: Any) -> tuple[int, Any]:
    return _post(port, path, json.dumps(body).encode(), "application/json")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from d2ops.testing import build_tiny_bundle

    return {
        OLD_MODEL: str(build_tiny_bundle(tmp_path_factory.mktemp("old"), seed=1)),
        NEW_MODEL: str(build_tiny_bundle(tmp_path_factory.mktemp("new"), seed=2)),
    }


@pytest.fixture(scope="module")
def served(bundles: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """clearml-serving's app on 127.0.0.1 with ``fixed`` (model add) and ``shapes`` (auto-update + canary)."""
    tmp = tmp_path_factory.mktemp("clearml-serving")
    fixed = build_register_commands(EndpointRegistration("fixed", model_id=OLD_MODEL))
    auto = build_register_commands(
        EndpointRegistration("shapes", project="d2ops", name="shapes-frcnn", auto_update=True, max_versions=2)
    )
    commands = [*fixed, *auto, ["clearml-serving", "--yes", *METRICS_ADD]]
    commands.append(["clearml-serving", "--yes", "config", "--kafka-metric-server", "127.0.0.1:9"])
    port = _free_port()
    proc = _start(tmp, commands, port=port, bundles=bundles)
    output: list[str] = []
    try:
        codes = _registered(proc, output)
        deadline = time.monotonic() + 300
        while True:  # the app is up once any route answers
            try:
                with socket.create_connection(("127.0.0.1", port), 1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "".join(output)
                time.sleep(0.5)
        yield {"port": port, "codes": codes, "commands": commands, "tmp": tmp, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_registration_runs_unattended_through_clearml_serving(served: dict[str, Any]) -> None:
    """Every command d2ops builds (``model add``, ``model auto-update``, ``model canary``), then ``metrics add``
    and ``config``, exits 0 in clearml-serving's own CLI with stdin closed."""
    assert served["codes"] == [0] * len(served["commands"])


def test_without_yes_an_unattended_registration_fails_on_the_version_prompt(tmp_path: Path) -> None:
    """``verify_session_version`` (clearml_serving/__main__.py) asks y/n when the session's stored version (a
    fresh one reads 1.0.0) is not the CLI's; without ``--yes`` and with stdin closed, ``input()`` fails and the
    endpoint is not added. d2ops's commands carry ``--yes`` (the previous test)."""
    (cmd,) = build_register_commands(EndpointRegistration("fixed", model_id=OLD_MODEL))
    assert cmd[1] == "--yes"
    proc = _start(tmp_path, [[cmd[0], *cmd[2:]]], port=None, bundles={})
    output: list[str] = []
    assert _registered(proc, output) == [1]
    proc.wait(60)
    assert "Do you want to continue [n]/y?" in "".join(output)


@pytest.mark.parametrize("path", ["/serve/fixed", "/serve/shapes", "/serve/shapes/1", "/serve/shapes/2"])
def test_every_route_serves_cvat_shapes(served: dict[str, Any], path: str) -> None:
    status, reply = _post_json(served["port"], path, {"image": base64.b64encode(_png(1)).decode()})
    assert status == 200, reply
    assert reply["detections"] and {"confidence", "label", "points", "type"} <= set(reply["detections"][0])


def test_plain_name_of_an_auto_update_endpoint_serves_the_newest_version(served: dict[str, Any]) -> None:
    """``/serve/shapes`` goes through the canary to ``shapes/2``, the newest model (failed before: 404, only
    ``/serve/shapes/<N>`` existed)."""
    body = {"image": base64.b64encode(_png(2)).decode()}
    newest = _post_json(served["port"], "/serve/shapes/2", body)
    oldest = _post_json(served["port"], "/serve/shapes/1", body)
    assert newest[1] != oldest[1]  # two different models (bundle seeds)
    assert _post_json(served["port"], "/serve/shapes", body) == newest
    assert _post_json(served["port"], "/serve/fixed", body) == oldest  # fixed serves OLD_MODEL


def test_batches_and_multipart_over_http(served: dict[str, Any]) -> None:
    port = served["port"]
    pngs = [_png(3), _png(4)]
    status, batch = _post_json(port, "/serve/fixed", {"images": [base64.b64encode(p).decode() for p in pngs]})
    assert status == 200 and len(batch["detections"]) == 2 and all(isinstance(r, list) for r in batch["detections"])

    boundary = "----d2opsFormBoundary"
    form = b""
    for i, png in enumerate(pngs):
        form += f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="{i}.png"\r\n'.encode()
        form += b"Content-Type: image/png\r\n\r\n" + png + b"\r\n"
    form += f"--{boundary}--\r\n".encode()
    status, reply = _post(port, "/serve/fixed", form, f"multipart/form-data; boundary={boundary}")
    assert status == 200, reply
    assert reply == batch

    status, raw = _post(port, "/serve/fixed", pngs[0], "image/png")
    assert (status == 200 and raw["detections"] == batch["detections"][0]) or raw["detections"]


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"image": "%%%"}', "application/json", "not valid base64"),
        (
            b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
            "no file",
        ),
        (b"not an image", "image/png", "not an image"),
    ],
)
def test_bad_requests_get_422_with_the_message(
    served: dict[str, Any], body: bytes, content_type: str, message: str
) -> None:
    status, reply = _post(served["port"], "/serve/fixed", body, content_type)
    assert status == 422 and message in reply["detail"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in HOSTILE_INPUTS])
def test_hostile_images_get_422_from_the_shared_validation(served: dict[str, Any], case: HostileInput) -> None:
    """The table every front end answers (tests/integration/test_front_ends_hostile.py). clearml-serving's app
    answers every ``ValueError`` with 422 and ``Error [<type>] processing request: <message>`` (``serve_model``
    in clearml_serving/serving/main.py, 1.3.5); any other exception, ``HTTPException`` included, is its 500. So
    422 is its client error. The refusal is d2ops's ``BadImageError`` from the validation every front end
    shares, in ``preprocess``: before, an extreme aspect ratio was a ``ValueError`` from inside the forward pass."""
    status, reply = _post_json(served["port"], "/serve/fixed", {"image": case.image_field()})
    assert status == 422, reply
    detail = reply["detail"]
    assert "'d2ops.serving.formats." in detail.split("]")[0], detail  # BadImageError or UnsupportedFormatError
    assert case.message in detail and "Traceback" not in detail
    assert _post_json(served["port"], "/serve/fixed", {"image": base64.b64encode(_png(6)).decode()})[0] == 200


def test_statistics_reach_kafka_with_a_numeric_detection_count(served: dict[str, Any]) -> None:
    """``metrics add --endpoint fixed --variable-scalar detection_count=...`` and a Kafka address (``config
    --kafka-metric-server``) switch on clearml-serving's statistics: ``_process_request`` queues the custom
    statistics merged with logged request/reply keys, ``_stats_send_loop`` serialises them to the broker.
    ``detection_count`` arrives as a number, which the statistics service's histogram can observe."""
    port = served["port"]
    status, reply = _post_json(port, "/serve/fixed", {"image": base64.b64encode(_png(5)).decode()})
    assert status == 200
    log = served["tmp"] / "kafka.jsonl"
    deadline = time.monotonic() + 40  # FastSimpleQueue wakes its reader at most every 10 s
    sent: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if log.exists():
            sent = [s for line in log.read_text().splitlines() for s in json.loads(json.loads(line)["value"])]
            if any(
                s["_url"] == "fixed" and s.get("image_count") == 1 and s["detection_count"] == len(reply["detections"])
                for s in sent
            ):
                break
        time.sleep(0.5)
    topics = {json.loads(line)["topic"] for line in log.read_text().splitlines()} if log.exists() else set()
    assert topics == {"clearml_inference_stats"}, sent
    fixed = [s for s in sent if s["_url"] == "fixed"]
    assert fixed and all(type(s["detection_count"]) is int for s in fixed), fixed
    assert any(s["detection_count"] == len(reply["detections"]) for s in fixed)
