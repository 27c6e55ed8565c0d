"""Pre-emption: a killed train step resumes from its last checkpoint on S3, never from another run's.

The train step runs as a user runs it (``python tasks/train.py --offline``, a real subprocess)
with ``clearml.output_uri`` on a real local S3 endpoint (moto). It is SIGKILLed as soon as its
first checkpoint is on S3, then rerun with the same config after its local folder is removed, as
a retried step on another machine would be. One killed-and-resumed run is shared by the tests of
this module; it is also the "probe" that a later run with another max_iter or output_dir must not
warm-start from (only an explicit ``resume_from`` continues it, and that is recorded).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from d2ops.utils.offline_session import session_file, session_names

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
MAX_ITER = 12
PREFIX = "d2ops/smoke/smoke/checkpoints/"  # <output_uri>/<clearml.project>/<name>/checkpoints/<run key>/


def _env(tmp: Path) -> dict[str, str]:
    """This process's environment (with the S3 endpoint's dummy keys), minus ClearML's master-process
    marker, which would make the child's Task.init return a stub."""
    env = {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}
    return {**env, "CLEARML_CACHE_DIR": str(tmp / "clearml")}


def _train_sets(output_uri: str, workdir: Path, *extra: str) -> list[str]:
    return [
        f"solver.max_iter={MAX_ITER}",
        "solver.checkpoint_period=3",
        "solver.eval_period=0",
        f"clearml.output_uri={output_uri}",
        f"runtime.output_dir={workdir}",
        *extra,
    ]


def _train_cmd(dataset: Path, output_uri: str, workdir: Path, *extra: str) -> list[str]:
    args = [sys.executable, "tasks/train.py", "--config", SMOKE, "--offline", "--dataset-uri", str(dataset)]
    for item in _train_sets(output_uri, workdir, *extra):
        args += ["--set", item]
    return args


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=600)


def _step_result(proc: subprocess.CompletedProcess[str], tmp: Path) -> dict[str, Any]:
    """The train step's ``step_result`` artifact, read from its offline ClearML session."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    task_id = json.loads(proc.stdout[proc.stdout.index("{") :])["task_id"]
    session = tmp / "clearml" / "offline" / f"{task_id}.zip"  # the session d2ops keeps: its zip
    (name,) = [n for n in session_names(session) if "/artifacts/step_result/" in n and n.endswith(".json")]
    return dict(json.loads(session_file(session, name) or b"{}"))


def _s3_objects(client: Any) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket="ckpt", Prefix=PREFIX).get("Contents", [])
    small = {
        o["Key"]: client.get_object(Bucket="ckpt", Key=o["Key"])["Body"].read() for o in listing if o["Size"] < 4096
    }
    return {**{o["Key"]: b"" for o in listing}, **small}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from d2ops.data.synthetic import generate_shapes_dataset

    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), counts={"train": 8, "valid": 4, "test": 4})


@pytest.fixture(scope="module")
def killed_and_resumed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run the step, SIGKILL it once its first checkpoint is on S3, rerun it on a "fresh machine"
    (same config, its local folder gone)."""
    import boto3

    from d2ops.storage.local_s3 import local_s3_endpoint

    tmp = tmp_path_factory.mktemp("resume")
    with local_s3_endpoint() as s3:
        client = boto3.client("s3", endpoint_url=s3.endpoint_url)
        client.create_bucket(Bucket="ckpt")
        output_uri = s3.uri("ckpt")
        log = (tmp / "first.log").open("w")
        first = subprocess.Popen(
            _train_cmd(dataset, output_uri, tmp / "first"), cwd=REPO, env=_env(tmp), stdout=log, stderr=log
        )
        deadline = time.monotonic() + 300
        pointers: list[str] = []
        while not pointers and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            pointers = [k for k in _s3_objects(client) if k.endswith("/last_checkpoint")]
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()
        assert pointers, f"no checkpoint reached S3; log:\n{(tmp / 'first.log').read_text()[-3000:]}"
        location = pointers[0].rsplit("/", 1)[0]
        after_kill = _s3_objects(client)
        name = after_kill[f"{location}/last_checkpoint"].decode()
        record = json.loads(after_kill[f"{location}/d2ops_run.json"])
        killed_at = record["checkpoints"][name]
        # Keep the checkpoint the rerun resumes from, to compare its optimizer/scheduler state later.
        saved = tmp / "resumed_from.pth"
        client.download_file("ckpt", f"{location}/{name}", str(saved))

        shutil.rmtree(tmp / "first")  # the retry runs on another machine: only S3 has the checkpoints
        second = _run(_train_cmd(dataset, output_uri, tmp / "first"), tmp)
        yield {
            "tmp": tmp,
            "client": client,
            "output_uri": output_uri,
            "location": location,
            "first_returncode": first.returncode,
            "after_kill": after_kill,
            "killed_at": killed_at,
            "resumed_from": name,
            "saved_checkpoint": saved,
            "second": second,
            "second_result": _step_result(second, tmp),
        }


@pytest.mark.slow
def test_killed_step_resumes_at_the_next_iteration_and_ends_at_max_iter(killed_and_resumed: dict[str, Any]) -> None:
    run = killed_and_resumed
    assert run["first_returncode"] == -signal.SIGKILL
    assert not any(k.endswith("/model_final.pth") for k in run["after_kill"]), "killed after it had finished"
    n = run["killed_at"]
    assert run["resumed_from"] == f"model_{n:07d}.pth"
    result = run["second_result"]
    assert result["resumed_checkpoint"] == run["resumed_from"]
    assert result["resumed_from"] is None  # its own run's checkpoint: nothing for the lineage
    assert result["start_iter"] == n + 1
    assert result["iterations"] == MAX_ITER - (n + 1)
    assert result["reused"] is False
    # The training iterations detectron2's EventStorage logged in the rerun: after the checkpoint, up to max_iter - 1.
    lines = [json.loads(line) for line in (run["tmp"] / "first" / "train" / "metrics.json").open()]
    iterations = [line["iteration"] for line in lines if "total_loss" in line]
    assert iterations and n + 1 <= min(iterations) and max(iterations) == MAX_ITER - 1
    assert f"Starting training from iteration {n + 1}" in run["second"].stderr
    # The finished run is on S3: model_final at the last iteration, listed in the run record.
    objects = _s3_objects(run["client"])
    record = json.loads(objects[f"{run['location']}/d2ops_run.json"])
    assert objects[f"{run['location']}/last_checkpoint"] == b"model_final.pth"
    assert record["checkpoints"]["model_final.pth"] == MAX_ITER - 1
    assert record["run_key"] == result["run_key"] == run["location"].rsplit("/", 1)[1]


@pytest.mark.slow
def test_resume_restores_optimizer_and_scheduler_state(killed_and_resumed: dict[str, Any], dataset: Path) -> None:
    from d2ops.config import load_config
    from d2ops.data.registration import register_splits
    from d2ops.engine.checkpoints import ResumePoint
    from d2ops.engine.d2config import build_d2_config
    from d2ops.engine.trainer import Trainer, load_resume_point

    n, path = killed_and_resumed["killed_at"], killed_and_resumed["saved_checkpoint"]
    cfg = load_config(SMOKE, [f"data.source={dataset}", f"solver.max_iter={MAX_ITER}"])
    d2 = build_d2_config(cfg, register_splits(dataset, cfg.data), killed_and_resumed["tmp"] / "probe")
    trainer = Trainer(d2)
    assert trainer.optimizer.state_dict()["state"] == {}  # a fresh optimizer has no momentum yet
    load_resume_point(trainer, ResumePoint(path, n, reusable=False))
    saved = torch.load(path, map_location="cpu", weights_only=False)["trainer"]
    saved_optimizer = saved["_trainer"]["optimizer"]
    assert trainer.iter == n and trainer.start_iter == n + 1
    assert trainer.scheduler.last_epoch == saved["hooks"]["LRScheduler"]["last_epoch"] == n + 1
    lrs = [group["lr"] for group in trainer.optimizer.param_groups]
    assert lrs == [group["lr"] for group in saved_optimizer["param_groups"]]
    assert lrs[0] > cfg.solver.base_lr * 0.001  # past warmup's first step: not a restart from zero
    state, saved_state = trainer.optimizer.state_dict()["state"], saved_optimizer["state"]
    assert saved_state and state.keys() == saved_state.keys()
    for key, buffers in saved_state.items():
        assert torch.equal(state[key]["momentum_buffer"], buffers["momentum_buffer"])


@pytest.mark.slow
def test_a_retried_finished_step_reuses_its_training_explicitly(
    killed_and_resumed: dict[str, Any], dataset: Path
) -> None:
    run, tmp = killed_and_resumed, killed_and_resumed["tmp"]
    shutil.rmtree(tmp / "first")  # again on a fresh machine
    third = _run(_train_cmd(dataset, run["output_uri"], tmp / "first"), tmp)
    result = _step_result(third, tmp)
    assert result["reused"] is True and result["iterations"] == 0
    assert result["start_iter"] == MAX_ITER and result["resumed_checkpoint"] == "model_final.pth"
    assert "reusing" in third.stderr and "nothing is trained again" in third.stderr
    assert Path(result["weights"]).is_file()


def _in_process(dataset: Path, output_uri: str, workdir: Path, *extra: str) -> Any:  # an ExperimentConfig
    """The config tasks/train.py builds from :func:`_train_cmd`'s settings, for calling train() here."""
    from d2ops.config import load_config

    return load_config(SMOKE, [f"data.source={dataset}", *_train_sets(output_uri, workdir, *extra)])


def _dataset_identity(dataset: Path) -> str:
    from d2ops.storage import s3 as storage

    return storage.sync(str(dataset), dataset)[0].identity


@pytest.mark.slow
def test_a_probe_run_never_warm_starts_a_run_with_another_max_iter_or_folder(
    killed_and_resumed: dict[str, Any], dataset: Path
) -> None:
    """The reported defect: a finished short run (folder A, max_iter N) on the same output_uri, then a run
    of the same training in folder B with a higher max_iter. It is another run: it trains from iteration 0."""
    run, tmp = killed_and_resumed, killed_and_resumed["tmp"]
    proc = _run(_train_cmd(dataset, run["output_uri"], tmp / "next", f"solver.max_iter={MAX_ITER + 3}"), tmp)
    result = _step_result(proc, tmp)
    assert (result["start_iter"], result["iterations"], result["reused"]) == (0, MAX_ITER + 3, False)
    assert result["training_identity"] == run["second_result"]["training_identity"]  # the same training
    assert result["run_key"] != run["second_result"]["run_key"]  # but another run
    assert result["resumed_from"] is None and result["resumed_checkpoint"] is None
    assert "Starting training from iteration 0" in proc.stderr
    objects = _s3_objects(run["client"])
    assert objects[f"{PREFIX}{result['run_key']}/last_checkpoint"] == b"model_final.pth"
    assert objects[f"{run['location']}/last_checkpoint"] == b"model_final.pth"  # the probe's run is untouched


@pytest.mark.slow
def test_an_explicit_resume_from_another_run_is_warned_and_recorded(
    killed_and_resumed: dict[str, Any], dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``resume_from`` = the finished run's key: the new run (higher max_iter) continues its model_final at
    iteration MAX_ITER, says so at WARNING, and records where it came from in its result and its run record;
    a retry of the new run keeps that record."""
    from d2ops.data.registration import register_splits
    from d2ops.engine.checkpoints import new_run_record
    from d2ops.engine.trainer import train

    run, tmp = killed_and_resumed, killed_and_resumed["tmp"]
    probe_key = run["location"].rsplit("/", 1)[1]
    cfg = _in_process(dataset, run["output_uri"], tmp / "explicit", f"solver.max_iter={MAX_ITER + 3}")
    record = new_run_record(cfg, _dataset_identity(dataset), resume_from=probe_key)
    assert record.identity == run["second_result"]["training_identity"] and record.run_key != probe_key
    uri = f"{run['output_uri'].rstrip('/')}/{PREFIX}{record.run_key}"
    with caplog.at_level(logging.INFO):
        result = train(
            cfg, register_splits(dataset, cfg.data), tmp / "explicit" / "train", checkpoint_uri=uri, run=record
        )
    origin = {
        "run_key": probe_key,
        "checkpoint": f"{run['output_uri'].rstrip('/')}/{run['location']}/model_final.pth",
        "iteration": MAX_ITER - 1,
    }
    assert result.resumed_from == origin
    assert (result.start_iter, result.iterations, result.resumed_checkpoint) == (MAX_ITER, 3, "model_final.pth")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(probe_key in m and "runtime.resume_from" in m and f"iteration {MAX_ITER}" in m for m in warnings), (
        warnings
    )
    assert json.loads(Path(result.run_record).read_text())["resumed_from"] == origin  # the file for the lineage
    on_s3 = json.loads(_s3_objects(run["client"])[f"{PREFIX}{record.run_key}/d2ops_run.json"])
    assert on_s3["resumed_from"] == origin and on_s3["resume_from"] == probe_key
    assert on_s3["checkpoints"]["model_final.pth"] == MAX_ITER + 2

    # A retry of this run on a fresh machine finds its own finished training: reused, origin kept.
    retry = train(cfg, register_splits(dataset, cfg.data), tmp / "explicit-retry", checkpoint_uri=uri, run=record)
    assert retry.reused is True and retry.resumed_from == origin and retry.start_iter == MAX_ITER + 3


@pytest.mark.slow
def test_a_checkpoint_past_max_iter_fails_with_advice(killed_and_resumed: dict[str, Any], dataset: Path) -> None:
    """A lower max_iter in the same run (a pipeline step whose max_iter was edited before a retry), or an
    explicit resume_from of a training already past max_iter: a clear error, nothing trained."""
    from d2ops.data.registration import register_splits
    from d2ops.engine.checkpoints import CheckpointConflict, new_run_record
    from d2ops.engine.trainer import train

    run, tmp = killed_and_resumed, killed_and_resumed["tmp"]
    key = run["location"].rsplit("/", 1)[1]
    uri = f"{run['output_uri'].rstrip('/')}/{run['location']}"
    cfg = _in_process(dataset, run["output_uri"], tmp / "fourth", "solver.max_iter=9")
    dataset_identity = _dataset_identity(dataset)
    for record, where in (
        (new_run_record(cfg, dataset_identity, run_key=key), uri),
        (new_run_record(cfg, dataset_identity, resume_from=key), f"{run['output_uri'].rstrip('/')}/{PREFIX}new"),
    ):
        with pytest.raises(CheckpointConflict) as err:
            train(cfg, register_splits(dataset, cfg.data), tmp / "fourth", checkpoint_uri=where, run=record)
        message = str(err.value)
        assert f"has already trained {MAX_ITER} iterations, and solver.max_iter is 9" in message
        assert "model_final.pth" in message and "Raise solver.max_iter" in message
        assert not (tmp / "fourth" / "metrics.json").exists()  # nothing was trained


def test_the_run_outside_a_pipeline_is_its_training_max_iter_output_dir_and_resume_from() -> None:
    """The rule for which checkpoints a run resumes, outside a pipeline: its run key hashes the training
    identity, solver.max_iter, runtime.output_dir and runtime.resume_from. In a pipeline, the pipeline run."""
    from d2ops.config import load_config
    from d2ops.engine.checkpoints import new_run_record

    def record(*sets: str, **kwargs: Any) -> Any:
        return new_run_record(load_config(SMOKE, list(sets)), "data-v1", **kwargs)

    base = record("runtime.output_dir=/runs/a")
    assert base.run_key == record("runtime.output_dir=/runs/a").run_key != base.identity
    assert record("runtime.output_dir=/runs/a", "solver.checkpoint_period=7").run_key == base.run_key
    others = [
        record("runtime.output_dir=/runs/a", "solver.max_iter=20"),
        record("runtime.output_dir=/runs/b"),
        record("runtime.output_dir=/runs/a", "solver.base_lr=0.001"),
        record("runtime.output_dir=/runs/a", resume_from="0123456789abcdef"),
    ]
    assert len({base.run_key, *(other.run_key for other in others)}) == 5
    assert [other.identity == base.identity for other in others] == [True, True, False, True]
    assert others[3].resume_from == "0123456789abcdef" and base.resume_from == ""
    # In a pipeline the run key is the pipeline run: a retried step (same run) finds the same checkpoints.
    assert record("runtime.output_dir=/x", "solver.max_iter=20", run_key="pipe-1").run_key == "pipe-1"


@pytest.mark.slow
def test_a_checkpoint_of_another_training_is_never_used(killed_and_resumed: dict[str, Any], dataset: Path) -> None:
    """Another training's finished checkpoints where this run looks (same run key, as when a pipeline
    step's parameters were edited before a retry): a clear error before anything is fetched or trained."""
    from d2ops.config import load_config
    from d2ops.data.registration import register_splits
    from d2ops.engine.checkpoints import CheckpointConflict, new_run_record
    from d2ops.engine.trainer import train

    run, tmp = killed_and_resumed, killed_and_resumed["tmp"]
    cfg = load_config(SMOKE, [f"data.source={dataset}", f"solver.max_iter={MAX_ITER}", "solver.base_lr=0.004"])
    record = new_run_record(cfg, "data-v1", run_key=run["location"].rsplit("/", 1)[1])
    uri = f"{run['output_uri'].rstrip('/')}/{run['location']}"
    with pytest.raises(CheckpointConflict, match="belong to another training") as err:
        train(cfg, register_splits(dataset, cfg.data), tmp / "other", checkpoint_uri=uri, run=record)
    assert record.identity in str(err.value) and "runtime.resume=false" in str(err.value)
    assert not (tmp / "other" / "model_final.pth").exists()


_SAVE_FOREVER = textwrap.dedent(
    """
    import sys, torch
    from d2ops.engine.checkpoints import AtomicCheckpointer, RunRecord
    model = torch.nn.Linear(2048, 4096)
    ckpt = AtomicCheckpointer(model, sys.argv[1], record=RunRecord("run", "identity", max_iter=10**6))
    i = 0
    while True:
        ckpt.save(f"model_{i:07d}", iteration=i)
        i += 1
    """
)


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_a_kill_mid_write_never_leaves_a_torn_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process that does nothing but write 32 MB checkpoints: after every kill, the pointer
    names a complete, loadable checkpoint of the run; the torn temp file is ignored, then removed."""
    from d2ops.engine.checkpoints import RunRecord, find_resume_point, prepare_output_dir

    folder = tmp_path / "ckpt"
    folder.mkdir()
    expected = RunRecord("run", "identity", max_iter=10**6)
    torn = 0
    for delay in (0.7, 1.1, 1.6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(folder)], cwd=REPO)
        deadline = time.monotonic() + 120
        while not (folder / "last_checkpoint").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        torn += len(list(folder.glob(".*.tmp")))
        point = find_resume_point(folder, expected)
        assert point is not None and point.path.name == (folder / "last_checkpoint").read_text()
        state = torch.load(point.path, map_location="cpu", weights_only=False)
        assert state["iteration"] == point.iteration and state["model"]["weight"].shape == (4096, 2048)
        prepare_output_dir(folder, resume=True)
        assert not list(folder.glob(".*.tmp"))
        assert find_resume_point(folder, expected) == point
    assert torn > 0, "no kill landed mid-write; the test proved nothing"


def test_a_new_pipeline_run_sets_an_earlier_runs_local_folder_aside(tmp_path: Path) -> None:
    """Run 2 of a pipeline in the same checkout/agent folder: run 1's local checkpoints are kept
    beside, not resumed and not an error; the same run key with another identity still stops."""
    from d2ops.engine.checkpoints import (
        RUN_RECORD,
        CheckpointConflict,
        RunRecord,
        find_resume_point,
        prepare_output_dir,
    )

    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "model_0000009.pth").write_bytes(b"run 1")
    (folder / RUN_RECORD).write_text(RunRecord("pipeline-run-1", "identity", max_iter=20).to_json())
    run2 = RunRecord("pipeline-run-2", "identity", max_iter=20)
    prepare_output_dir(folder, resume=True, expected=run2)
    assert list(folder.iterdir()) == []
    aside = tmp_path / "train.run-pipeline-run-1"
    assert (aside / "model_0000009.pth").read_bytes() == b"run 1"
    assert find_resume_point(folder, run2) is None

    (folder / RUN_RECORD).write_text(RunRecord("pipeline-run-2", "other-identity", max_iter=20).to_json())
    prepare_output_dir(folder, resume=True, expected=run2)
    with pytest.raises(CheckpointConflict, match="belong to another training"):
        find_resume_point(folder, run2)


def _probe_folder(folder: Path, identity: str, *, key: str = "probe-run", iteration: int = 4) -> None:
    """A finished probe run's local checkpoint folder, as AtomicCheckpointer leaves it (dummy weights)."""
    from d2ops.engine.checkpoints import FINAL, POINTER, RUN_RECORD, RunRecord

    folder.mkdir(parents=True)
    (folder / FINAL).write_bytes(b"probe weights")
    record = RunRecord(key, identity, max_iter=iteration + 1, checkpoints={FINAL: iteration})
    (folder / RUN_RECORD).write_text(record.to_json())
    (folder / POINTER).write_text(FINAL)


def test_resume_from_a_local_folder_continues_it_and_records_where_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Train a finished local run further: same output_dir, higher max_iter, runtime.resume_from = its folder.
    The new run sets the folder aside (another run key), continues the checkpoint from there, says so at
    WARNING and records it; the wrong training, a key with no output_uri, or nothing left to train refuse."""
    from d2ops.config import load_config
    from d2ops.engine.checkpoints import CheckpointConflict, new_run_record, training_identity
    from d2ops.engine.trainer import _resume_point

    def cfg(max_iter: int) -> Any:
        return load_config(SMOKE, [f"runtime.output_dir={tmp_path / 'out'}", f"solver.max_iter={max_iter}"])

    folder = tmp_path / "out" / "train"
    _probe_folder(folder, training_identity(cfg(10), "data-v1"))
    record = new_run_record(cfg(10), "data-v1", resume_from=str(folder))
    with caplog.at_level(logging.INFO):
        point = _resume_point(folder, None, record, resume=True)
    aside = tmp_path / "out" / "train.run-probe-run"
    assert point is not None and point.path == aside / "model_final.pth" and point.start_iter == 5
    assert record.resumed_from == {"run_key": "probe-run", "checkpoint": f"{aside}/model_final.pth", "iteration": 4}
    warning = next(
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ANOTHER" in r.getMessage()
    )
    assert "probe-run" in warning and "runtime.resume_from" in warning and "from iteration 5 to 10" in warning

    other = tmp_path / "other" / "train"
    _probe_folder(other, training_identity(load_config(SMOKE, ["solver.base_lr=0.001"]), "data-v1"))
    cases = [
        (new_run_record(cfg(10), "data-v1", resume_from=str(other)), "holds another training"),
        (new_run_record(cfg(10), "data-v1", resume_from="probe-run"), "is a run key"),
        (new_run_record(cfg(5), "data-v1", resume_from=f"{aside}/model_final.pth"), "has already trained 5 iterations"),
        (new_run_record(cfg(10), "data-v1", resume_from=str(tmp_path / "nothing")), "no d2ops run record"),
    ]
    for i, (wrong, message) in enumerate(cases):
        with pytest.raises(CheckpointConflict, match=message):
            _resume_point(tmp_path / f"run{i}", None, wrong, resume=True)
