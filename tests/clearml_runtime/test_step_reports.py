"""A step's reports reach its offline session whatever an earlier ``sys.exit`` in the same process left.

``Task.init`` replaces ``sys.exit`` with ClearML's ``ExitHooks.exit`` (clearml
``utilities/process/exit_hooks.py``), which records the code and never resets it. ``Task.close`` reads
it in ``Task.__shutdown`` (clearml ``task.py``): a non-zero code means "crashed", so it skips
``flush(wait_for_uploads=True)`` and stops the reporter without waiting, and reports still queued are
lost. The offline pipeline runs every step in one process, and any library or CLI that calls
``sys.exit`` (caught) in it armed that trap: the register step's gate values vanished from its session.

The test runs ClearML's own shutdown in a fresh process: a first step installs the hook, a caught
``sys.exit(3)`` records a code, then a second step reports single values and a scalar series.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from d2ops.clearml.step import run_step
    from d2ops.pipeline.runner import step_parameters
    from d2ops.pipeline.steps import StepOutput
    from d2ops.utils.offline_session import session_file

    out = Path(sys.argv[1])
    overrides = [f"runtime.output_dir={out / 'run'}"]

    def quiet(ctx):
        return StepOutput()

    def reporting(ctx):
        for i in range(3):
            ctx.reporter.scalar("loss", "train", 1.0 / (i + 1), i)
        ctx.reporter.single_value("gate/promoted", 1.0)
        return StepOutput()

    params = step_parameters("download", sys.argv[2], overrides)
    run_step("download", params, mode="offline", function=quiet)
    try:
        sys.exit(3)  # what a CLI's main() does on bad input, caught by its caller
    except SystemExit:
        pass
    result = run_step("download", params, mode="offline", function=reporting)
    # read at once, as the next step or the caller does
    metrics = session_file(result.session, "metrics.jsonl")
    print("METRICS " + json.dumps(metrics.decode() if metrics is not None else None), flush=True)
    """
)


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_reports_survive_an_earlier_caught_sys_exit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(CLEARML_CACHE_DIR=str(tmp_path / "clearml"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), str(REPO / "configs" / "smoke.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("METRICS ")]
    metrics = json.loads(line.removeprefix("METRICS "))
    assert metrics is not None, "the step returned before its reports were written to its session"
    events = [e for ln in metrics.splitlines() for e in json.loads(ln)]
    summary = {e["variant"]: e["value"] for e in events if e.get("metric") == "Summary"}
    assert summary["gate/promoted"] == 1.0
    losses = [e for e in events if e.get("metric") == "loss" and e.get("variant") == "train"]
    assert [e["value"] for e in losses] == [1.0, 0.5, 1 / 3], "every queued scalar reached the session"
