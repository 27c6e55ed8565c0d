"""How a step ends when it is told to stop or runs out of time, in a real process holding a ClearML task.

Agents abort tasks, and clouds pre-empt workers, with SIGTERM. ClearML's exit hook (installed by
``Task.init``) catches SIGTERM and keeps such a process running: before d2ops handled it, a step
was still alive 20 s after ``kill -TERM``. These tests start a real step process (ClearML offline
session, the step runner of ``tasks/<step>.py``) and signal it from outside.

What a server could still do differently: an offline session keeps the task's tags but no status,
so the status (failed, or aborted after a user's abort) is checked against a server stand-in in
tests/clearml_runtime; on a real server the agent also records its own exit-code message, which
the tag survives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from d2ops.utils.offline_session import session_file

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")

# A step whose body runs until stopped: the step runner, session and signal handling are d2ops's own.
_STEP_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from d2ops.clearml.step import run_step
    from d2ops.pipeline.runner import step_parameters

    started = Path(sys.argv[1])
    minutes = sys.argv[2]

    def body(ctx):
        started.write_text("running")
        while True:
            time.sleep(0.05)

    overrides = [f"runtime.output_dir={started.parent / 'run'}", f"clearml.steps.download.time_limit_min={minutes}"]
    try:
        run_step("download", step_parameters("download", sys.argv[3], overrides), mode="offline", function=body)
    except BaseException as err:
        print(f"step ended: {type(err).__name__}: {err}", flush=True)
        sys.exit(3)
    """
)


def _clean_env() -> dict[str, str]:
    """This environment minus ClearML's master-process marker, which an earlier ``Task.init`` in the
    test process leaves behind and which would make the child's ``Task.init`` return a stub."""
    return {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}


def _start(tmp_path: Path, minutes: str = "60") -> tuple[subprocess.Popen[str], Path]:
    started = tmp_path / "started"
    env = {**_clean_env(), "CLEARML_CACHE_DIR": str(tmp_path / "clearml"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _STEP_SCRIPT, str(started), minutes, SMOKE],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, started


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the step exited before it started: {proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the step did not start in time")
        time.sleep(0.1)


def _session_task(tmp_path: Path) -> dict:
    (session,) = (tmp_path / "clearml" / "offline").glob("*.zip")  # the session d2ops keeps: its zip
    return json.loads(session_file(session, "task.json") or b"{}")


@pytest.mark.timeout(240)
def test_sigterm_stops_the_step_within_seconds_and_closes_its_session(tmp_path: Path) -> None:
    proc, started = _start(tmp_path)
    _wait_for(started, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the step was still running 20 s after SIGTERM")
    assert time.monotonic() - sent < 20
    assert proc.returncode == 3
    assert "step ended: StepStopped: step download received SIGTERM" in output
    # The session was closed (ClearML zips an offline session on close) and records how it ended.
    assert list((tmp_path / "clearml" / "offline").glob("*.zip")), "the offline session was not closed"
    task = _session_task(tmp_path)
    assert "d2ops:stopped" in task.get("tags", [])


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
@pytest.mark.timeout(240)
def test_a_step_past_its_time_limit_fails_tagged_so_it_is_not_retried(tmp_path: Path) -> None:
    proc, started = _start(tmp_path, minutes="0.02")  # 1.2 s
    output, _ = proc.communicate(timeout=180)
    assert started.exists()
    assert proc.returncode == 3
    assert "StepTimeLimitExceeded: step download ran past its time limit of 0.02 min" in output
    task = _session_task(tmp_path)
    assert "d2ops:time-limit" in task.get("tags", [])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_during_training_leaves_a_checkpoint_the_rerun_resumes_from(tmp_path: Path) -> None:
    """The real train step (``tasks/train.py --offline``) gets SIGTERM between periodic checkpoints:
    it saves the iteration it reached, mirrors it to ``output_uri``, and the rerun continues there."""
    from d2ops.data.synthetic import generate_shapes_dataset

    dataset = generate_shapes_dataset(tmp_path / "shapes", counts={"train": 8, "valid": 4, "test": 4})
    mirror, workdir = tmp_path / "mirror", tmp_path / "run"
    cmd = [sys.executable, "tasks/train.py", "--config", SMOKE, "--offline", "--dataset-uri", str(dataset)]
    for item in (
        "solver.max_iter=40",
        "solver.checkpoint_period=1000",  # no periodic checkpoint before the stop
        "solver.eval_period=0",
        f"clearml.output_uri={mirror}",
        f"runtime.output_dir={workdir}",
    ):
        cmd += ["--set", item]
    env = {**_clean_env(), "CLEARML_CACHE_DIR": str(tmp_path / "clearml"), "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        # detectron2's metric printer logs "iter: 19" in iteration 19's hooks: stop there, mid-run (iteration
        # 18 or 19 is the last completed one). A fixed sleep stopped a loaded machine inside iteration 0,
        # where there is nothing to save yet.
        while "iter: 19 " not in log_path.read_text() and first.poll() is None:
            assert time.monotonic() < deadline, "training did not reach iteration 19"
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()
            pytest.fail("the train step was still running 60 s after SIGTERM")
    text = log_path.read_text()
    assert first.returncode == 2, text[-3000:]
    assert "StepStopped" in text and "saved a checkpoint at iteration" in text, text[-3000:]
    (run_dir,) = [p for p in mirror.rglob("d2ops_run.json")]
    record = json.loads(run_dir.read_text())
    pointer = (run_dir.parent / "last_checkpoint").read_text().strip()
    stopped_at = record["checkpoints"][pointer]
    assert 18 <= stopped_at < 39 and (run_dir.parent / pointer).is_file()

    shutil.rmtree(workdir)  # the retry runs on another machine: only the mirror has the checkpoint
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Starting training from iteration {stopped_at + 1}" in second.stdout + second.stderr
