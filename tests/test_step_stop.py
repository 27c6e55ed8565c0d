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
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")

# A step whose body runs until stopped: the step runner, session and signal handling are d2ops's own.
_STEP_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from d2ops.clearml.step import run_step
    from d2ops.pipeline import step_parameters

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


def _start(tmp_path: Path, minutes: str = "60") -> tuple[subprocess.Popen[str], Path]:
    started = tmp_path / "started"
    env = {**os.environ, "CLEARML_CACHE_DIR": str(tmp_path / "clearml"), "PYTHONUNBUFFERED": "1"}
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
    (task_json,) = (tmp_path / "clearml" / "offline").glob("*/task.json")
    return json.loads(task_json.read_text())


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


@pytest.mark.timeout(240)
def test_a_step_past_its_time_limit_fails_tagged_so_it_is_not_retried(tmp_path: Path) -> None:
    proc, started = _start(tmp_path, minutes="0.02")  # 1.2 s
    output, _ = proc.communicate(timeout=180)
    assert started.exists()
    assert proc.returncode == 3
    assert "StepTimeLimitExceeded: step download ran past its time limit of 0.02 min" in output
    task = _session_task(tmp_path)
    assert "d2ops:time-limit" in task.get("tags", [])
