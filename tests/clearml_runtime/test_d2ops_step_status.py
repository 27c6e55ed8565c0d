"""How a stopped or timed-out step leaves its task on the server: the status a user and the pipeline read.

A real step process (d2ops's step runner, ``mode="local"``: a server-connected task in this
checkout) runs against the server stand-in of ``fake_server.py`` and is signalled from outside.
What a real server could still do differently: clearml-server answers a user's abort of a task a
worker runs with ``status_message="stopping"`` (and the agent then kills the process); the stand-in
stops it at once, and d2ops treats both as "a user asked" (``_abort_requested`` reads either).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .fake_server import FakeClearmlServer

REPO = Path(__file__).resolve().parents[2]

_STEP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from d2ops.clearml.step import run_step
    from d2ops.pipeline.runner import step_parameters

    started, minutes = Path(sys.argv[1]), sys.argv[2]

    def body(ctx):
        started.write_text(ctx.runtime.run.task.id)
        while True:
            time.sleep(0.05)

    overrides = [f"runtime.output_dir={started.parent / 'run'}", f"clearml.steps.download.time_limit_min={minutes}"]
    run_step("download", step_parameters("download", "configs/smoke.yaml", overrides), mode="local", function=body)
    """
)


def _start(server: FakeClearmlServer, tmp_path: Path, minutes: str = "60") -> tuple[subprocess.Popen[str], Path]:
    (tmp_path / "clearml.conf").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(server.env(), CLEARML_CONFIG_FILE=str(tmp_path / "clearml.conf"), CLEARML_CACHE_DIR=str(tmp_path))
    started, script = tmp_path / "started", tmp_path / "step.py"
    script.write_text(_STEP)  # a file, as tasks/<step>.py is: ClearML's repository detection then finishes at once
    proc = subprocess.Popen(
        [sys.executable, str(script), str(started), minutes],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, started


def _task_id_once_running(proc: subprocess.Popen[str], started: Path) -> str:
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "the step did not start"
        time.sleep(0.1)
    return started.read_text()


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
@pytest.mark.timeout(240)
def test_a_pre_empted_step_fails_with_its_reason_so_the_pipeline_retries_it(
    clearml_server: FakeClearmlServer, tmp_path: Path
) -> None:
    proc, started = _start(clearml_server, tmp_path)
    task_id = _task_id_once_running(proc, started)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    task = clearml_server.tasks[task_id]
    assert task["status"] == "failed", output
    assert task["status_reason"].startswith("StepStopped: step download received SIGTERM")
    assert "d2ops:stopped" in task["tags"]


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
@pytest.mark.timeout(240)
def test_a_step_the_user_aborted_ends_aborted_not_failed(clearml_server: FakeClearmlServer, tmp_path: Path) -> None:
    proc, started = _start(clearml_server, tmp_path)
    task_id = _task_id_once_running(proc, started)
    clearml_server.stop_task(task_id, "user abort")  # the UI's Abort, then the agent's SIGTERM
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    task = clearml_server.tasks[task_id]
    assert task["status"] == "stopped", output
    assert "d2ops:stopped" in task["tags"]


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
@pytest.mark.timeout(240)
def test_a_step_past_its_time_limit_is_failed_and_tagged_on_the_server(
    clearml_server: FakeClearmlServer, tmp_path: Path
) -> None:
    proc, started = _start(clearml_server, tmp_path, minutes="0.03")
    task_id = _task_id_once_running(proc, started)
    output, _ = proc.communicate(timeout=120)
    task = clearml_server.tasks[task_id]
    assert task["status"] == "failed", output
    assert task["status_reason"].startswith("StepTimeLimitExceeded: step download ran past its time limit")
    assert "d2ops:time-limit" in task["tags"]
