"""The cluster rehearsal: README's cluster path on one machine, through real clearml-agent 3.0.3 daemons.

One module-scoped cluster (see :mod:`tests.cluster.rehearsal`): the API stand-in, moto as MinIO, a git origin,
an agent in ``--services-mode`` on ``services`` and one on the steps' queues. The tests run in order on it:

1. the laptop launches a shipped cluster config with ``pipelines/run_pipeline.py --config ... --set ...``; the
   controller runs on the services agent, the five steps on the worker agent, the model is registered and
   promoted, and the agents never call an endpoint the stand-in lacks;
2. ``d2ops schedule cron`` hands a scheduler to the services agent, and the clone it fires runs to the end;
3. a user's abort (``tasks.stop``, as the web UI sends it) of a running step reaches the step's process through
   the agent, and the pipeline does not end completed;
4. ``scripts/cluster-smoke.sh``, unchanged, passes against the rehearsal with only its endpoint variables set.

What it cannot show: docker mode (the d2ops image, ``docker_args``, the compose network), GPUs, and a real
clearml-server (MongoDB/Elasticsearch, its watchdogs, permissions). README says so.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from d2ops.config import load_config
from tests.cluster.rehearsal import (
    PIPELINE_TIMEOUT_S,
    REPO_ROOT,
    SHIPPED_S3_ENDPOINT,
    Cluster,
    read_env_file,
    rehearsal_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]

#: configs/roboflow.yaml as shipped, made CPU-sized from the command line: the laptop's launch exactly as a
#: user types it, with --set for what a rehearsal on 2 CPU cores cannot afford (a ResNet-50 from COCO weights)
TINY = [
    "--set",
    "model.overrides={MODEL.RESNETS.DEPTH: 18, MODEL.RESNETS.RES2_OUT_CHANNELS: 64, MODEL.RESNETS.NORM: GN, "
    "MODEL.FPN.NORM: GN, MODEL.FPN.OUT_CHANNELS: 64, MODEL.ROI_BOX_HEAD.FC_DIM: 128, MODEL.BACKBONE.FREEZE_AT: 0, "
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE: 32, INPUT.MIN_SIZE_TRAIN: [128], INPUT.MAX_SIZE_TRAIN: 256, "
    "INPUT.MIN_SIZE_TEST: 128, INPUT.MAX_SIZE_TEST: 256}",
    "--set", "model.weights=null",
    "--set", "solver.max_iter=10",
    "--set", "solver.warmup_iters=5",
    "--set", "solver.steps=[]",
    "--set", "solver.checkpoint_period=10",
    "--set", "solver.eval_period=0",
    "--set", "solver.num_workers=0",
    "--set", "solver.ims_per_batch=2",
    "--set", "runtime.device=cpu",
    "--set", "registry.quality_gate.min_value=0",
]  # fmt: skip
STEPS = ("download", "train", "evaluate", "infer", "register")


def _upload_shapes(cluster: Cluster, root: Path, prefix: str) -> str:
    from d2ops.data.synthetic import generate_shapes_dataset

    dataset = generate_shapes_dataset(root / prefix)
    client = cluster.s3_client()
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "datasets", f"{prefix}/{path.relative_to(dataset).as_posix()}")
    return cluster.s3_uri("datasets", f"{prefix}/")


def _output_uri(cluster: Cluster) -> str:
    """The launches' clearml.output_uri: inside the agents' default_output_uri bucket, but not it."""
    return cluster.s3_uri("clearml", "rehearsal")


def _launch(cluster: Cluster, dataset_uri: str, *extra: str) -> str:
    result = cluster.run(
        sys.executable,
        "pipelines/run_pipeline.py",
        "--config",
        "configs/roboflow.yaml",
        "--dataset-uri",
        dataset_uri,
        *TINY,
        "--set",
        f"clearml.output_uri={_output_uri(cluster)}",
        *extra,
    )
    launched = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"pipeline_task_id"')]
    assert launched, f"run_pipeline.py printed no pipeline task id:\n{result.stdout[-3000:]}"
    return launched[0]["pipeline_task_id"]


def _wait_pipeline(cluster: Cluster, controller_id: str) -> dict:
    return cluster.wait_status(controller_id, ("completed", "failed", "stopped", "closed"), PIPELINE_TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with rehearsal_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running
        assert not running.server.unknown_calls, (
            f"endpoints the stand-in lacks: {sorted({e for e, _ in running.server.unknown_calls})}"
        )


@pytest.fixture(scope="module")
def shapes(cluster: Cluster) -> str:
    return _upload_shapes(cluster, cluster.root, "shapes")


@pytest.fixture(scope="module")
def first_run(cluster: Cluster, shapes: str) -> dict:
    tic = time.monotonic()
    controller_id = _launch(cluster, shapes)
    controller = _wait_pipeline(cluster, controller_id)
    return {"id": controller_id, "controller": controller, "seconds": time.monotonic() - tic}


def test_the_pipeline_runs_on_the_agents_and_registers_a_promoted_model(cluster: Cluster, first_run: dict) -> None:
    controller = first_run["controller"]
    assert controller["status"] == "completed", cluster.diagnostics()
    # the services agent ran the controller (services mode names the worker <agent>:service:<task id>)
    assert controller["status_message"].startswith("Changed by clearml-agent agent-services"), controller
    steps = cluster.children(first_run["id"])
    assert sorted(steps) == sorted(STEPS), sorted(steps)
    for name, step in steps.items():
        assert step["status"] == "completed", (name, cluster.diagnostics())
        # each on the agent of its queue (configs/base/cluster.yaml: download and register on cpu, the rest on gpu)
        agent = "agent-cpu" if name in ("download", "register") else "agent-gpu"
        assert step["status_message"] == f"Changed by clearml-agent {agent}", (name, step["status_message"])
        # the agent checked out the commit the task records, from the origin the laptop pushed to
        script = step["script"]
        assert script["repository"] == str(cluster.origin), script
        assert len(script["version_num"]) == 40, script
        log = cluster.task_log(step["id"])
        assert f"commit: {script['version_num']}" in log or script["version_num"][:7] in log, log[-3000:]
        # the launch config's name travels to every step; the controller shows only the experiment in Args/
        assert cluster.server.hyperparams(step["id"])["General"]["config"] == "configs/roboflow.yaml", name
    controller_args = cluster.server.hyperparams(first_run["id"])["Args"]
    assert not {"config", "overrides", "dataset_uri", "offline", "local"} & set(controller_args), controller_args
    assert controller_args["solver/max_iter"] == "10"
    # the model: registered by the register step, published and promoted, its weights under output_uri
    with cluster.server.lock:
        models = [m for m in cluster.server.models.values() if m.get("task") == steps["register"]["id"]]
    assert len(models) == 1, models
    model = models[0]
    assert model["ready"] is True, model
    assert "production" in (model.get("tags") or []), model
    # under the config's output_uri, not the agents' default_output_uri (s3://.../clearml): step tasks have no
    # output destination of their own, and the model went to a file in the agent's checkout before
    assert model["uri"].startswith(_output_uri(cluster)), model["uri"]
    key = model["uri"][len(f"s3://{cluster.s3_host}/") :]
    bucket, _, name = key.partition("/")
    head = cluster.s3_client().head_object(Bucket=bucket, Key=name)
    assert head["ContentLength"] > 1000


def test_a_cron_schedule_fires_a_clone_that_runs_to_the_end(cluster: Cluster, first_run: dict) -> None:
    assert first_run["controller"]["status"] == "completed"
    # TaskScheduler fires at a fixed minute of each hour ('M * * * *'): the next minute that leaves the
    # services agent time to start the scheduler (a few seconds here)
    fire = datetime.now(timezone.utc) + timedelta(seconds=75)
    expr = f"{fire.minute} * * * *"
    with cluster.server.lock:
        before = set(cluster.server.tasks)
    result = cluster.run(
        sys.executable, "-m", "d2ops", "schedule", "cron", "--pipeline-id", first_run["id"], "--expr", expr
    )
    name = f"retrain {first_run['id'][:8]} '{expr}'"  # d2ops.clearml.schedules.build_cron_scheduler
    scheduler = cluster.wait_for(
        "the scheduler task to run on the services agent",
        lambda: next(
            (t for t in cluster.server.tasks.values() if t.get("name") == name and t["status"] == "in_progress"),
            None,
        ),
        120,
    )
    try:
        clone = cluster.wait_for(
            "the schedule to clone the pipeline",
            lambda: next(
                (
                    t
                    for t in cluster.server.tasks.values()
                    if t["id"] not in before and t.get("type") == "controller" and t["status"] != "created"
                ),
                None,
            ),
            240,
        )
        assert clone["name"] == first_run["controller"]["name"], clone  # ClearML's clone of the template
        ended = _wait_pipeline(cluster, clone["id"])
        assert ended["status"] == "completed", cluster.diagnostics()
        steps = cluster.children(clone["id"])
        # the data did not change, so ClearML reused the template's download step (its cache key is the dataset
        # identity); the other four ran again
        assert sorted(steps) == sorted(set(STEPS) - {"download"}), sorted(steps)
        assert all(s["status"] == "completed" for s in steps.values()), cluster.diagnostics()
        assert result.returncode == 0
    finally:
        # the user stops the schedule in the UI: the services agent ends it, and it fires no more
        cluster.api("tasks.stop", task=scheduler["id"], force=True)
        stopped = cluster.wait_status(scheduler["id"], ("stopped", "failed", "completed"), 60)
        assert stopped["status"] == "stopped", cluster.diagnostics()


def test_a_ui_clone_of_the_train_step_with_an_edit_is_a_new_run(cluster: Cluster, first_run: dict) -> None:
    """The UI's clone of a pipeline's train step (``tasks.clone``, an edited hyperparameter, ``tasks.enqueue``),
    run by the gpu agent while the agents mirror checkpoints to ``default_output_uri``: it trains anew; it neither
    reuses the original's finished model nor resumes or refuses its checkpoints."""
    original = cluster.children(first_run["id"])["train"]
    assert "train/reused_checkpoint" not in cluster.server.single_values(original["id"])
    clone_id = cluster.api("tasks.clone", task=original["id"], new_task_name="train (edited)")["id"]
    assert cluster.task(clone_id)["parent"] == first_run["id"]  # ClearML keeps the original's parent
    # a step records the experiment as <section>/<key> (the UI's "eval" section, "score_threshold")
    assert "score_threshold" in cluster.server.hyperparams(clone_id)["eval"]
    cluster.api(
        "tasks.edit_hyper_params",
        task=clone_id,
        hyperparams=[{"section": "eval", "name": "score_threshold", "value": "0.3"}],
    )
    cluster.api("tasks.enqueue", task=clone_id, queue_name="gpu")
    ended = cluster.wait_status(clone_id, ("completed", "failed", "stopped"), PIPELINE_TIMEOUT_S)
    assert ended["status"] == "completed", cluster.diagnostics()
    assert "train/reused_checkpoint" not in cluster.server.single_values(clone_id), cluster.task_log(clone_id)[-3000:]
    assert ended["last_iteration"] >= 9, ended["last_iteration"]  # it trained its own 10 iterations


def test_a_pipeline_past_its_time_limit_ends_failed(cluster: Cluster, shapes: str) -> None:
    controller_id = _launch(
        cluster,
        shapes,
        "--set", "solver.max_iter=5000",
        "--set", "name=too-slow",
        "--set", "clearml.pipeline_time_limit_min=0.75",
    )  # fmt: skip
    controller = _wait_pipeline(cluster, controller_id)
    assert controller["status"] == "failed", cluster.diagnostics()
    assert "clearml.pipeline_time_limit_min" in controller["status_reason"] + controller["status_message"], controller
    # The controller marks its task failed, then exits 1 (tests/clearml_runtime/test_d2ops_pipeline.py checks
    # the exit code). Here the services agent ends the process first: clearml-agent's TaskStopSignal treats a
    # task that turned failed while running as a signal to stop it (commands/worker.py, unexpected_statuses).
    steps = cluster.children(controller_id)
    assert steps["train"]["status"] in ("stopped", "failed"), cluster.diagnostics()
    assert "register" not in steps or steps["register"]["status"] not in ("completed", "in_progress")


def test_a_user_abort_reaches_the_running_step_through_the_agent(cluster: Cluster, shapes: str) -> None:
    import psutil

    controller_id = _launch(cluster, shapes, "--set", "solver.max_iter=5000", "--set", "name=abort-me")
    train = cluster.wait_for(
        "the train step to be training",
        lambda: next(
            (
                t
                for t in cluster.server.tasks.values()
                if t.get("parent") == controller_id
                and t["name"] == "train"
                and t["status"] == "in_progress"
                and (t.get("last_iteration") or 0) > 0
            ),
            None,
        ),
        PIPELINE_TIMEOUT_S,
    )
    # the web UI's Abort: tasks.stop on the task, over HTTP, with the user's token
    reply = cluster.api("tasks.stop", task=train["id"])
    assert reply["fields"]["status_message"] == "stopping", reply  # a live worker runs it: the agent must act
    stopped = cluster.wait_status(train["id"], ("stopped", "failed", "completed"), 120)
    assert stopped["status"] == "stopped", cluster.diagnostics()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "tasks/train.py" in " ".join(p.info["cmdline"] or [])]
    controller = _wait_pipeline(cluster, controller_id)
    assert controller["status"] != "completed", cluster.diagnostics()
    assert "register" not in cluster.children(controller_id) or (
        cluster.children(controller_id)["register"]["status"] in ("created", "stopped", "skipped")
    )


def test_readme_walkthrough_ran_as_written_with_docker_aside(cluster: Cluster) -> None:
    walkthrough = cluster.walkthrough
    assert walkthrough is not None
    ran = list(walkthrough.ran)
    assert ran[:3] == [
        "bash scripts/cluster-setup.sh init",
        "bash scripts/cluster-setup.sh",
        "bash scripts/cluster-setup.sh weights",
    ], ran
    assert all(command.startswith(("docker ", "echo ")) for command in walkthrough.aside), walkthrough.aside
    # what cluster-setup.sh left: laptop keys that log in, the queues, the configs' weights, no secret printed
    dotenv = read_env_file(cluster.laptop / "docker" / ".env")
    assert dotenv["CLEARML_API_ACCESS_KEY"] in cluster.server.credentials
    assert dotenv["CLEARML_API_ACCESS_KEY"] != dotenv["CLEARML_AGENT_ACCESS_KEY"]
    with cluster.server.lock:
        queues = {q["name"] for q in cluster.server.queues.values()}
    assert {"services", "cpu", "gpu"} <= queues
    for name in ("balloon", "roboflow"):
        weights = load_config(cluster.laptop / "configs" / f"{name}.yaml").model.weights
        assert weights and weights.startswith(f"s3://{SHIPPED_S3_ENDPOINT}/models/"), weights
        key = weights.removeprefix(f"s3://{SHIPPED_S3_ENDPOINT}/models/")
        assert cluster.s3_client().head_object(Bucket="models", Key=key)["ContentLength"] > 0
    printed = "\n".join(done.stdout + done.stderr for done in walkthrough.ran.values())
    for secret in ("CLEARML_API_SECRET_KEY", "CLEARML_AGENT_SECRET_KEY", "D2OPS_S3_SECRET_KEY"):
        assert dotenv[secret] not in printed, secret


def test_cluster_smoke_script_passes_unchanged_against_the_rehearsal(cluster: Cluster) -> None:
    """The walkthrough's last command, ``bash scripts/cluster-smoke.sh`` as shipped, with only the endpoints
    (``CLEARML_API_HOST``, ``CLEARML_WEB_HOST``, ``CLEARML_FILES_HOST``, ``S3_ENDPOINT``) pointed at the rehearsal:
    the keys and the interpreter come from where the walkthrough left them (docker/.env, .venv)."""
    assert cluster.walkthrough is not None
    result = cluster.walkthrough.ran["bash scripts/cluster-smoke.sh"]
    assert result.returncode == 0, f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}\n{cluster.diagnostics()}"
    assert "[cluster-smoke] OK" in result.stdout
    shipped = (REPO_ROOT / "scripts/cluster-smoke.sh").read_bytes()
    assert (cluster.laptop / "scripts/cluster-smoke.sh").read_bytes() == shipped
