"""The ClearML stand-in, driven by ClearML's own SDK and runtime code over real HTTP.

Each test uses the ``clearml_server`` fixture (``conftest.py``): an in-memory ClearML API
server on 127.0.0.1 that the SDK in this process logs in to. Nothing in ClearML is patched;
only the server behind the SDK's session is replaced. The test plays the agent (and the
server's own operators) through the fixture's helpers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from urllib3 import encode_multipart_formdata

from .fake_server import SINGLE_SCALAR_ITERATION, ApiError, FakeAgent, FakeClearmlServer, _parse_multipart

PROJECT = "d2ops-runtime-test"

#: PipelineController's ``pool_frequency`` is in minutes: 0.01 polls every 0.6 s.
POOL_FREQUENCY_MIN = 0.01


def _script_task(tmp_path: Path, name: str = "train template", **kwargs: Any) -> Any:
    """A script task made by ``Task.create`` (what d2ops registers as a step template)."""
    from clearml import Task

    script = tmp_path / "train.py"
    script.write_text("print('training')\n")
    return Task.create(
        project_name=PROJECT,
        task_name=name,
        script=str(script),
        working_directory=str(tmp_path),
        add_task_init_call=False,
        **kwargs,
    )


@contextlib.contextmanager
def _running_locally(pipe: Any) -> Iterator[threading.Thread]:
    """Run ``pipe.start_locally(run_pipeline_steps_locally=False)`` in a thread: ClearML's own
    ``_start(wait=True)`` starts the ``_daemon`` thread, waits for it, then ``stop()`` closes the
    controller task. If the test fails first, the pipeline is stopped while the server is still up.
    """
    thread = threading.Thread(
        target=pipe.start_locally, kwargs={"run_pipeline_steps_locally": False}, name="pipeline-under-test", daemon=True
    )
    thread.start()
    try:
        yield thread
    finally:
        if thread.is_alive():
            pipe.stop(timeout=0.5)
            thread.join(timeout=30)


def _assert_no_unknown_endpoints(server: FakeClearmlServer) -> None:
    assert server.unknown_calls == [], f"the SDK called endpoints the stand-in lacks: {server.unknown_calls}"


# ---------------------------------------------------------------------------- acceptance 1


@pytest.mark.timeout(120)
def test_task_init_connect_close_is_held_by_the_server(clearml_server: FakeClearmlServer) -> None:
    from clearml import Task

    task = Task.init(
        project_name=PROJECT,
        task_name="init connect close",
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
        auto_resource_monitoring=False,
    )
    # Task.init in a local process marks the task started, as a real server records it.
    assert clearml_server.tasks[task.id]["status"] == "in_progress"
    assert clearml_server.tasks[task.id]["started"] is not None
    task.connect({"a": 1}, name="General")
    task.close()

    held = clearml_server.tasks[task.id]
    assert held["name"] == "init connect close"
    assert clearml_server.projects[held["project"]]["name"] == PROJECT
    assert held["hyperparams"]["General"]["a"] == {
        "section": "General",
        "name": "a",
        "value": "1",
        "type": "int",
        "description": "",
    }
    assert held["status"] == "completed"
    assert held["completed"] >= held["started"]
    assert clearml_server.endpoint_calls("auth.login"), "the SDK must have logged in with basic auth"
    _assert_no_unknown_endpoints(clearml_server)


# ---------------------------------------------------------------------------- acceptance 2


@pytest.mark.timeout(120)
def test_clone_set_parameters_enqueue(clearml_server: FakeClearmlServer, tmp_path: Path) -> None:
    from clearml import Task

    template = _script_task(tmp_path, packages=["numpy"], docker="python:3.11")
    template.set_parameters({"Args/lr": 0.1, "Args/epochs": 3})
    template.set_configuration_object("detectron2", config_text="SOLVER:\n  BASE_LR: 0.01\n")
    clearml_server.create_queue("gpu")

    clone = Task.clone(source_task=template, name="train run", parent=template.id)
    clone.set_parameters({"Args/lr": 0.5, "Args/epochs": 7})
    Task.enqueue(clone, queue_name="gpu")

    held = clearml_server.tasks[clone.id]
    src = clearml_server.tasks[template.id]
    assert held["status"] == "queued"
    assert clearml_server.queued_task_ids("gpu") == [clone.id]
    assert held["execution"]["queue"] == clearml_server.queue_by_name("gpu")["id"]
    assert clearml_server.hyperparams(clone.id) == {"Args": {"lr": "0.5", "epochs": "7"}}
    assert clearml_server.hyperparams(template.id) == {"Args": {"lr": "0.1", "epochs": "3"}}
    assert held["parent"] == template.id
    assert held["script"] == src["script"] and held["script"]["entry_point"] == "train.py"
    assert held["container"]["image"] == "python:3.11"
    assert held["configuration"]["detectron2"]["value"] == "SOLVER:\n  BASE_LR: 0.01\n"
    # clearml-server's enqueue drops the "development" system tag
    assert "development" not in held["system_tags"]
    _assert_no_unknown_endpoints(clearml_server)


# ---------------------------------------------------------------------------- acceptance 3


@pytest.mark.timeout(120)
def test_pipeline_controller_daemon_runs_steps_the_test_agent_completes(
    clearml_server: FakeClearmlServer, tmp_path: Path
) -> None:
    """ClearML's own ``PipelineController._daemon`` launches, polls and finishes a two-step DAG.

    ``start_locally(run_pipeline_steps_locally=False)`` keeps the controller logic in this
    process (``_start(wait=True)``: the daemon thread, then ``wait()`` and ``stop()``) while the
    steps are cloned and enqueued for an agent, which this test plays through the server.
    """
    from clearml import PipelineController

    template = _script_task(tmp_path)
    template.set_parameters({"Args/lr": 0.1, "Args/epochs": 3})
    clearml_server.create_queue("gpu")

    pipe = PipelineController(
        name="runtime pipeline",
        project=PROJECT,
        version="1.0.0",
        pool_frequency=POOL_FREQUENCY_MIN,
        add_pipeline_tags=False,
    )
    pipe.add_step(name="train", base_task_id=template.id, parameter_override={"Args/lr": 0.3}, execution_queue="gpu")
    pipe.add_step(
        name="evaluate",
        parents=["train"],
        base_task_id=template.id,
        parameter_override={"Args/lr": "${train.parameters.Args/lr}", "Args/epochs": 1},
        execution_queue="gpu",
    )
    ran = []
    with _running_locally(pipe) as controller:
        for _ in range(2):  # the agent: take the next queued step, run it, complete it
            step_id = clearml_server.wait_for(lambda: clearml_server.next_queued("gpu"), timeout=60)
            clearml_server.start_task(step_id)
            assert clearml_server.tasks[step_id]["started"] is not None
            clearml_server.complete_task(step_id)
            ran.append(step_id)
        controller.join(timeout=60)
        assert not controller.is_alive(), "the pipeline controller did not finish"

    controller_id = pipe._task.id
    steps = {clearml_server.tasks[i]["name"]: clearml_server.tasks[i] for i in ran}
    assert list(steps) == ["train", "evaluate"]
    assert all(s["status"] == "completed" for s in steps.values())
    assert all(s["parent"] == controller_id for s in steps.values())
    assert clearml_server.hyperparams(ran[0])["Args"] == {"lr": "0.3", "epochs": "3"}
    assert clearml_server.hyperparams(ran[1])["Args"] == {"lr": "0.3", "epochs": "1"}
    assert clearml_server.tasks[controller_id]["type"] == "controller"
    assert clearml_server.tasks[controller_id]["status"] == "completed"
    _assert_no_unknown_endpoints(clearml_server)


@pytest.mark.timeout(120)
def test_pipeline_marks_controller_failed_when_a_step_fails(clearml_server: FakeClearmlServer, tmp_path: Path) -> None:
    """A step whose process fails (the agent reports its exit code) makes ClearML fail the controller."""
    from clearml import PipelineController

    template = _script_task(tmp_path)
    clearml_server.create_queue("gpu")
    pipe = PipelineController(
        name="failing pipeline", project=PROJECT, version="1.0.0", pool_frequency=POOL_FREQUENCY_MIN
    )
    pipe.add_step(name="train", base_task_id=template.id, execution_queue="gpu")
    pipe.add_step(name="evaluate", parents=["train"], base_task_id=template.id, execution_queue="gpu")

    with (
        FakeAgent(clearml_server, ["gpu"], outcome=lambda task: "failed") as agent,
        _running_locally(pipe) as controller,
    ):
        controller.join(timeout=60)
        assert not controller.is_alive()

    assert len(agent.handled) == 1, "the child step must not run after its parent failed"
    step = clearml_server.tasks[agent.handled[0]]
    assert step["name"] == "train"
    assert step["status"] == "failed"
    assert step["status_reason"] == "worker execution exit code 1"
    ctrl = clearml_server.tasks[pipe._task.id]
    assert ctrl["status"] == "failed"
    assert ctrl["status_reason"] == "Pipeline step failed"
    _assert_no_unknown_endpoints(clearml_server)


# ---------------------------------------------------------------------------- acceptance 4


def _time_limited_pipeline(tmp_path: Path) -> Any:
    from clearml import PipelineController

    template = _script_task(tmp_path)
    pipe = PipelineController(
        name="time limited pipeline", project=PROJECT, version="1.0.0", pool_frequency=POOL_FREQUENCY_MIN
    )
    pipe.add_step(name="train", base_task_id=template.id, execution_queue="gpu", time_limit=600)
    return pipe


@pytest.mark.timeout(120)
def test_clearml_issue_1640_daemon_crashes_on_a_queued_time_limited_step(
    clearml_server: FakeClearmlServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream bug clearml/clearml#1640 in clearml 2.1.12, with plain ClearML code.

    ``PipelineController._daemon`` checks a step's ``time_limit`` with
    ``node.job.task.data.started`` while the step is still queued; the server has no
    ``started`` for a task that never ran, so the daemon thread dies with
    ``AttributeError: 'NoneType' object has no attribute 'tzinfo'``. The controller then
    stops as if the pipeline were done (marked completed) and leaves the step queued.
    """
    clearml_server.create_queue("gpu")
    pipe = _time_limited_pipeline(tmp_path)
    crashes: list[tuple[Any, str]] = []

    def record(args: Any) -> None:
        step = [t for t in clearml_server.tasks.values() if t["name"] == "train"]
        crashes.append((args, step[0]["status"] if step else "missing"))

    monkeypatch.setattr(threading, "excepthook", record)

    with _running_locally(pipe) as controller:
        controller.join(timeout=60)
        assert not controller.is_alive()

    assert len(crashes) == 1
    args, step_status_at_crash = crashes[0]
    assert args.exc_type is AttributeError
    assert str(args.exc_value) == "'NoneType' object has no attribute 'tzinfo'"
    assert args.thread.name.endswith("(_daemon)") or "_daemon" in repr(args.thread)
    frames = []
    tb = args.exc_traceback
    while tb is not None:
        frames.append((Path(tb.tb_frame.f_code.co_filename).name, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    assert frames[-1] == ("controller.py", "_daemon")
    assert step_status_at_crash == "queued"
    (step,) = [t for t in clearml_server.tasks.values() if t["name"] == "train"]
    assert step["status"] == "queued" and step.get("started") is None
    assert clearml_server.tasks[pipe._task.id]["status"] == "completed"


@pytest.mark.timeout(120)
def test_clearml_issue_1640_also_hits_a_running_step_because_the_daemon_never_reloads_started(
    clearml_server: FakeClearmlServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same crash once the agent has started the step and the server holds ``started``.

    ``ClearmlJob`` polls only ``status``/``status_message`` (``tasks.get_all`` with
    ``only_fields``); ``node.job.task.data`` is the snapshot taken when the step was cloned,
    whose ``started`` stays None. A fix in d2ops has to read ``started`` afresh.
    """
    pipe = _time_limited_pipeline(tmp_path)
    crashes: list[tuple[Any, dict]] = []

    def record(args: Any) -> None:
        (step,) = [t for t in clearml_server.tasks.values() if t["name"] == "train"]
        crashes.append((args, dict(step)))

    monkeypatch.setattr(threading, "excepthook", record)

    # the agent starts the step and never ends it
    with FakeAgent(clearml_server, ["gpu"], outcome=lambda task: None), _running_locally(pipe) as controller:
        controller.join(timeout=60)
        assert not controller.is_alive()

    assert len(crashes) == 1
    args, step_at_crash = crashes[0]
    assert args.exc_type is AttributeError
    assert step_at_crash["status"] == "in_progress"
    assert step_at_crash["started"] is not None
    polls = [b for b in clearml_server.endpoint_calls("tasks.get_all") if b.get("id") == [step_at_crash["id"]]]
    assert polls and all(set(b["only_fields"]) <= {"id", "status", "status_message"} for b in polls)


# ---------------------------------------------------------------------------- the server's rules


@pytest.mark.timeout(120)
def test_status_changes_follow_clearml_servers_state_machine(clearml_server: FakeClearmlServer, tmp_path: Path) -> None:
    from clearml import Task

    clearml_server.create_queue("gpu")
    task = _script_task(tmp_path)
    assert clearml_server.tasks[task.id]["status"] == "created"

    Task.enqueue(task, queue_name="gpu")
    held = clearml_server.tasks[task.id]
    assert held["status"] == "queued" and held.get("started") is None

    # queued -> failed / completed is not in the state machine: refused unless forced
    task.mark_failed(status_reason="too early")  # the SDK does not raise; the server refuses
    assert held["status"] == "queued"
    (err,) = [e for name, _, e in clearml_server.errors if name == "tasks.failed"]
    assert (err.code, err.subcode) == (400, 110)
    with pytest.raises(ApiError):
        clearml_server.fail_task(task.id)
    with pytest.raises(ApiError):
        clearml_server.complete_task(task.id)

    # the agent pulls it: off the queue, in_progress, started and last_update set
    before = held["last_update"]
    clearml_server.start_task(task.id, worker="gpu-worker-1")
    assert clearml_server.queued_task_ids("gpu") == []
    assert held["status"] == "in_progress"
    assert held["started"] is not None and held["last_update"] >= before
    assert held["last_worker"] == "gpu-worker-1"
    assert task.get_status() == "in_progress"

    clearml_server.fail_task(task.id, "CUDA out of memory")
    assert held["status"] == "failed"
    assert held["status_reason"] == "CUDA out of memory"
    assert held["completed"] >= held["started"]
    task.reload()
    assert task.data.status_reason == "CUDA out of memory"

    # failed -> queued is allowed; dequeue returns to the status before enqueueing
    Task.enqueue(task, queue_name="gpu")
    assert held["status"] == "queued"
    Task.dequeue(task)
    assert held["status"] == "failed" and clearml_server.queued_task_ids("gpu") == []

    task.reset(force=True)
    assert held["status"] == "created" and held["status_reason"] == "reset"
    assert "started" not in held and "completed" not in held

    # completed -> queued is refused: a finished task must be reset or cloned first
    clearml_server.start_task(task.id)
    clearml_server.complete_task(task.id)
    from clearml.backend_interface.session import SendError

    with pytest.raises(SendError, match="400/110"):
        Task.enqueue(task, queue_name="gpu")
    assert held["status"] == "completed"
    _assert_no_unknown_endpoints(clearml_server)


@pytest.mark.timeout(120)
def test_hyperparameters_round_trip_in_clearml_servers_shape(clearml_server: FakeClearmlServer, tmp_path: Path) -> None:
    from clearml.backend_api.session.client import APIClient

    task = _script_task(tmp_path)
    task.set_parameters({"Args/lr": 0.1, "Args/epochs": 3, "General/seed": 42})
    task.delete_parameter("General/seed")

    client = APIClient()
    (params,) = client.tasks.get_hyper_params(tasks=[task.id]).params
    assert params["task"] == task.id
    assert params["hyperparams"] == [
        {"section": "Args", "name": "epochs", "value": "3", "type": "int", "description": ""},
        {"section": "Args", "name": "lr", "value": "0.1", "type": "float", "description": ""},
    ]
    assert task.get_parameters() == {"Args/epochs": "3", "Args/lr": "0.1"}

    # edit_hyper_params: created only (queued/in_progress with force), except "properties"
    clearml_server.start_task(task.id)
    clearml_server.complete_task(task.id)
    with pytest.raises(Exception, match=r"400/110|Invalid task status"):
        client.tasks.edit_hyper_params(task=task.id, hyperparams=[{"section": "Args", "name": "lr", "value": "9"}])
    client.tasks.edit_hyper_params(task=task.id, hyperparams=[{"section": "Properties", "name": "note", "value": "ok"}])
    # deleting the last parameter of a section leaves the empty section (a MongoDB ``$unset``)
    assert clearml_server.hyperparams(task.id) == {
        "Args": {"epochs": "3", "lr": "0.1"},
        "General": {},
        "properties": {"note": "ok"},
    }
    _assert_no_unknown_endpoints(clearml_server)


@pytest.mark.timeout(120)
def test_reported_scalars_single_values_and_log_reach_the_server(clearml_server: FakeClearmlServer) -> None:
    from clearml import Task

    task = Task.init(
        project_name=PROJECT,
        task_name="report metrics",
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
        auto_resource_monitoring=False,
    )
    logger = task.get_logger()
    for i in range(4):
        logger.report_scalar("loss", "total_loss", value=1.0 / (i + 1), iteration=i)
    logger.report_single_value("bbox/AP", 73.5)
    logger.report_text("hello from the test")
    logger.flush(wait=True)
    task.flush(wait_for_uploads=True)

    # events.scalar_metrics_iter_histogram leaves single values (iteration -2**31) out
    assert task.get_reported_scalars() == {
        "loss": {"total_loss": {"name": "total_loss", "x": [0, 1, 2, 3], "y": [1.0, 0.5, 1 / 3, 0.25]}}
    }
    assert task.get_reported_single_values() == {"bbox/AP": 73.5}
    assert clearml_server.single_values(task.id) == {"bbox/AP": 73.5}
    assert any(e["iter"] == SINGLE_SCALAR_ITERATION for e in clearml_server.scalars(task.id))
    assert task.get_last_scalar_metrics()["loss"]["total_loss"] == {"last": 0.25, "min": 0.25, "max": 1.0}
    task.close()
    assert any("hello from the test" in line for line in clearml_server.log_lines(task.id))
    assert clearml_server.tasks[task.id]["last_iteration"] == 3
    _assert_no_unknown_endpoints(clearml_server)


@pytest.mark.timeout(120)
def test_models_artifacts_and_the_rest_of_the_endpoints_parse_in_the_sdk(
    clearml_server: FakeClearmlServer, tmp_path: Path
) -> None:
    """Every reply shape, read back through the SDK's own response models (APIClient validates)."""
    from clearml import Model, OutputModel, Task
    from clearml.backend_api.session.client import APIClient, APIError

    task = Task.init(
        project_name=PROJECT,
        task_name="models and artifacts",
        reuse_last_task_id=False,
        auto_connect_frameworks=False,
        auto_resource_monitoring=False,
    )
    task.upload_artifact("stats", {"ap": 73.5}, wait_on_upload=True)
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"weights")
    model = OutputModel(task=task, name="detector", framework="PyTorch")
    model.update_weights(weights_filename=str(weights))
    model.set_metadata("bbox_AP", "73.5")
    task.close()

    held = clearml_server.tasks[task.id]
    (artifact,) = held["execution"]["artifacts"].values()
    assert artifact["key"] == "stats" and artifact["uri"].startswith(clearml_server.files_url)
    assert any(k.endswith("stats.json") for k in clearml_server.files)
    assert [m["model"] for m in held["models"]["output"]] == [model.id]
    assert Model(model.id).get_metadata("bbox_AP") == "73.5"

    client = APIClient()
    assert client.queues.get_default().name == "default"
    assert [q.name for q in client.queues.get_all(name="^default$")] == ["default"]
    client.queues.get_queue_metrics(from_date=0, to_date=time.time(), interval=60)
    assert list(client.workers.get_all()) == []
    raw = client.session.send_request("users", "get_current_user", json={}).json()
    assert raw["data"]["user"]["id"] == clearml_server.user["id"]
    assert client.session.send_request("server", "info", json={}).json()["data"]["version"] == "2.3.0"
    raw = client.session.send_request("tasks", "get_all_ex", json={"id": [task.id], "only_fields": ["name"]}).json()
    assert raw["data"]["tasks"] == [{"id": task.id, "name": "models and artifacts"}]
    client.tasks.ping(task=task.id)
    client.tasks.update(task=task.id, comment="updated")
    assert held["comment"] == "updated"
    client.tasks.close(task=task.id, force=True)
    assert held["status"] == "closed"
    client.tasks.archive(tasks=[task.id])
    assert "archived" in held["system_tags"]
    assert str(client.tasks.get_all(id=[task.id], only_fields=["status"])[0].status) == "closed"
    # a closed task cannot take an output model (get_task_for_update: created/queued/in_progress)
    with pytest.raises(APIError, match="400/110"):
        client.models.update_for_task(task=task.id, uri="s3://bucket/m.pth", name="other")
    _assert_no_unknown_endpoints(clearml_server)


@pytest.mark.timeout(60)
def test_unknown_endpoints_are_refused_and_recorded(clearml_server: FakeClearmlServer) -> None:
    from clearml.backend_interface.base import InterfaceBase

    session = InterfaceBase._get_default_session()
    res = session.send_request("tasks", "no_such_action", json={"task": "x"})
    assert res.status_code == 404
    assert res.json()["meta"]["result_msg"].startswith("Unable to find endpoint for name tasks.no_such_action")
    assert clearml_server.unknown_calls == [("tasks.no_such_action", {"task": "x"})]


@pytest.mark.timeout(60)
def test_bad_credentials_are_refused_at_login(clearml_server: FakeClearmlServer) -> None:
    from clearml.backend_api.session import Session
    from clearml.backend_api.session.session import LoginError

    with pytest.raises(LoginError, match="401"):
        Session(api_key=clearml_server.access_key, secret_key="wrong", host=clearml_server.url)


@pytest.mark.timeout(60)
def test_the_agent_reports_the_process_exit_code_as_clearml_agent_does(
    clearml_server: FakeClearmlServer, tmp_path: Path
) -> None:
    from clearml import Task

    clearml_server.create_queue("gpu")
    held = {}
    for exit_code in (0, 1, -2):
        task = _script_task(tmp_path, name=f"exit code {exit_code}")
        Task.enqueue(task, queue_name="gpu")
        clearml_server.start_task(clearml_server.next_queued("gpu"), worker="gpu-1")
        clearml_server.agent_process_exited(task.id, exit_code, worker="gpu-1")
        held[exit_code] = clearml_server.tasks[task.id]
    assert (held[0]["status"], held[0]["status_reason"]) == ("completed", "worker execution done")
    assert (held[1]["status"], held[1]["status_reason"]) == ("failed", "worker execution exit code 1")
    assert (held[-2]["status"], held[-2]["status_reason"]) == ("stopped", "user abort")
    assert all(t["status_message"] == "Changed by clearml-agent gpu-1" for t in held.values())
    assert all(t["completed"] >= t["started"] for t in held.values())


@pytest.mark.parametrize("tail", [b"", b"\n", b"\r\n", b"\r", b"\n\n"])
def test_the_files_host_keeps_every_byte_of_an_upload(tail: bytes) -> None:
    """A weights file may end in CR or LF bytes; the stand-in's fileserver must store them (multipart framed
    by urllib3, as ClearML's uploads through requests are)."""
    data = bytes(range(256)) + tail
    body, content_type = encode_multipart_formdata({"file": ("model_final.pth", data), "other": ("b.bin", tail)})
    assert _parse_multipart(body, content_type) == {"model_final.pth": data, "b.bin": tail}
