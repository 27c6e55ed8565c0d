"""Credentials stay out of the git diff ClearML records with each task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2ops.secrets import known_secret_values, redact

DIFF = """diff --git a/configs/demo.yaml b/configs/demo.yaml
--- a/configs/demo.yaml
+++ b/configs/demo.yaml
@@ -1,3 +1,4 @@
 name: demo
+# aws_secret_access_key: wJalrXUtnSENTINELbPxRfiCY
 solver:
-  max_iter: 300
+  max_iter: 400
"""


def test_redact_removes_only_lines_holding_a_known_value() -> None:
    clean, removed = redact(DIFF, ["wJalrXUtnSENTINELbPxRfiCY"])
    assert removed == 1
    assert "wJalrXUtnSENTINELbPxRfiCY" not in clean
    assert "+  max_iter: 400" in clean and "-  max_iter: 300" in clean
    assert redact(DIFF, []) == (DIFF, 0)


def test_known_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    monkeypatch.setenv("D2OPS_SERVE_TOKEN", "abc")  # too short to match safely: ignored
    values = known_secret_values()
    assert "env-secret-value-123" in values and "abc" not in values


def test_a_recorded_diff_with_a_credential_is_scrubbed_before_the_session_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearml import Task

    from d2ops.clearml_adapter import enable_offline, scrub_recorded_diff

    monkeypatch.delenv("CLEARML_PROC_MASTER_ID", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnSENTINELbPxRfiCY")
    enable_offline(tmp_path / "clearml")
    task = Task.init(project_name="d2ops-test", task_name="diff", reuse_last_task_id=False)
    try:
        task._wait_for_repo_detection(timeout=30)
        task.set_script(diff=DIFF)  # as ClearML records an uncommitted edit
        assert scrub_recorded_diff(task) == 1
        assert scrub_recorded_diff(task) == 0
        folder = Path(task.get_offline_mode_folder())
    finally:
        task.close()
    recorded = json.loads((folder / "task.json").read_text())["script"]["diff"]
    assert "wJalrXUtnSENTINELbPxRfiCY" not in recorded and "+  max_iter: 400" in recorded
